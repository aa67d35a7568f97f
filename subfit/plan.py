"""The plan: per layer, which units are kept, bypassed or deleted, plus the bypass weights.

On disk a plan is a folder with `plan.json` (human-readable decisions and accounting) and
`bypass.safetensors` (the weights). Loading reads JSON and safetensors only, never pickle, so a
plan cannot run code when it is loaded; and it validates everything before anything runs: every
field's type, every tensor's name, shape, dtype (floating point only) and values (finite and
within `MAX_ABS_VALUE`). Every problem is a `PlanError` that names the file and the field. The
accounting (parameters removed, bypass parameters, KV cache) is computed here and nowhere else.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from subfit.files import FolderFormat, staged_folder
from subfit.models import same_weights

FORMAT_VERSION = 1
ACTIONS = ("keep", "bypass", "delete")
PLAN_FILE = "plan.json"
WEIGHTS_FILE = "bypass.safetensors"
FFN_BASIS = "ffn.basis"
# Bypass weights run in float16 on some devices, so every value must be finite there: float16's
# largest value bounds them. Real fitted weights are far smaller (stories260K plans: below 2;
# residual-stream activations of large LLMs peak around 1e4), so a value beyond the bound means a
# corrupt or hand-edited file, not a plan.
MAX_ABS_VALUE = float(torch.finfo(torch.float16).max)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
LAYER_FIELDS = ("layer", "attn", "ffn", "attn_rank", "ffn_rank")
PLAN_FIELDS = ("format_version", "base", "method", "unit_params", "block_params", "accounting", "layers")
OPTIONAL_PLAN_FIELDS = ("accounting",)  # derived: written for people to read, recomputed on load


def bypass_tensor_names(kind: str, layer: int) -> dict[str, str]:
    """The names of a bypass's tensors in `bypass.safetensors`: the one place they are built."""
    down = f"attn.{layer}.down" if kind == "attn" else FFN_BASIS
    return {"down": down, "up": f"{kind}.{layer}.up", "bias": f"{kind}.{layer}.bias"}


class PlanError(ValueError):
    """A plan is malformed, incomplete, or does not match the model it is applied to."""


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_int(value) -> bool:
    return _is_int(value) and value >= 1


def _text(value) -> bool:
    return isinstance(value, str) and value != ""


def _signature(value) -> bool:
    """Entries of `Decoder.weight_signature` are normalised projections (|x| <= 64 by construction);
    the bound keeps comparisons of corrupt entries finite."""
    return isinstance(value, list) and len(value) > 0 and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and abs(x) <= 1e6 for x in value)


# base field -> (test, what is expected)
BASE_FIELDS = {
    "path": (_text, "the base model's location (a non-empty string)"),
    "gguf_file": (lambda v: v is None or _text(v), "a .gguf file name or null"),
    "model_type": (_text, "a model type such as 'llama'"),
    "fingerprint": (_text, "the base model's fingerprint (a string)"),
    "weight_signature": (_signature, "a non-empty list of numbers within +-1e6"),
    "num_layers": (_positive_int, "a positive integer"),
    "hidden_size": (_positive_int, "a positive integer"),
    "num_key_value_heads": (_positive_int, "a positive integer"),
    "head_dim": (_positive_int, "a positive integer"),
}


def _shown(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _expect(ok: bool, where: str, name: str, value, expected: str) -> None:
    if not ok:
        raise PlanError(f"{where}: {name} is {_shown(value)}; expected {expected}.")


def _check_keys(obj: dict, where: str, name: str, required, allowed=None) -> None:
    missing = [k for k in required if k not in obj]
    if missing:
        raise PlanError(f"{where}: {name} lacks the field {missing[0]!r}; the plan is incomplete.")
    unknown = sorted(str(k) for k in obj if k not in (allowed or required))
    if unknown:
        raise PlanError(f"{where}: {name} has the unknown field {unknown[0]!r}; it holds only "
                        f"{', '.join(allowed or required)}.")


def base_shape(decoder) -> dict:
    """The base model's sizes that a plan's shapes and KV-cache accounting depend on."""
    cfg = decoder.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return {"num_layers": decoder.num_layers, "hidden_size": decoder.hidden_size,
            "num_key_value_heads": cfg.num_key_value_heads, "head_dim": head_dim}


def _holds_plan(folder: Path) -> bool:
    """Whether `folder` holds a subfit plan (possibly a damaged one): its plan.json is a JSON object
    with a format version. A stray file of another tool's with the same name is not one."""
    try:
        meta = json.loads((folder / PLAN_FILE).read_bytes())
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(meta, dict) and "format_version" in meta


PLAN_FOLDER = FolderFormat("subfit plan", (PLAN_FILE, WEIGHTS_FILE), _holds_plan)


@dataclass
class Bypass:
    """`out = h + (norm(h) @ down) @ up + bias`: the linear map that stands in for a removed unit."""

    down: torch.Tensor  # [hidden, rank]
    up: torch.Tensor  # [rank, hidden]
    bias: torch.Tensor  # [hidden]

    def __call__(self, normed: torch.Tensor) -> torch.Tensor:
        return (normed @ self.down.to(normed.dtype)) @ self.up.to(normed.dtype) + self.bias.to(normed.dtype)

    @property
    def rank(self) -> int:
        return self.down.shape[1]


@dataclass
class Plan:
    """Decisions for every unit of a base model, and the bypass weights.

    `tensors` holds `attn.{i}.down|up|bias`, `ffn.{i}.up|bias` and one `ffn.basis` (the input
    basis shared by every bypassed FeedForward; it is the `down` of each FFN bypass).
    """

    base: dict  # source path, gguf_file, model_type, fingerprint, weight_signature, shapes
    attn: list[str]
    ffn: list[str]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    unit_params: dict[str, int] = field(default_factory=dict)  # {"attn": n, "ffn": n} per unit
    block_params: int = 0
    method: dict = field(default_factory=dict)  # name, target sparsity, options, calibration

    # construction ----------------------------------------------------------------------
    @classmethod
    def empty(cls, decoder, source) -> "Plan":
        """A plan that keeps everything: runs exactly like the dense model."""
        n = decoder.num_layers
        return cls(
            base={
                "path": source.path,
                "gguf_file": source.gguf_file,
                "model_type": decoder.config.model_type,
                "fingerprint": decoder.fingerprint(),
                "weight_signature": decoder.weight_signature(),
                **base_shape(decoder),
            },
            attn=["keep"] * n,
            ffn=["keep"] * n,
            unit_params={"attn": decoder.unit_params("attn", 0), "ffn": decoder.unit_params("ffn", 0)},
            block_params=decoder.block_params(),
            method={"name": "none", "sparsity": 0.0},
        )
    def without_bypasses(self) -> "Plan":
        """The same removals with every bypass dropped (units deleted): what the bypasses add."""
        method = {**self.method, "bypass": False}
        method.pop("bypass_errors", None)
        return replace(self, base=dict(self.base), attn=["delete" if a != "keep" else a for a in self.attn],
                       ffn=["delete" if a != "keep" else a for a in self.ffn], tensors={}, method=method)

    def actions(self, kind: str) -> list[str]:
        return self.attn if kind == "attn" else self.ffn

    def bypass(self, kind: str, layer: int) -> Bypass:
        names = bypass_tensor_names(kind, layer)
        return Bypass(*(self.tensors[names[part]] for part in ("down", "up", "bias")))

    def set_bypass(self, kind: str, layer: int, bypass: Bypass) -> None:
        """Mark a unit bypassed and store its weights. Every FeedForward bypass's `down` is the one
        shared basis, so setting it again replaces it for all of them."""
        self.actions(kind)[layer] = "bypass"
        for part, name in bypass_tensor_names(kind, layer).items():
            self.tensors[name] = getattr(bypass, part).detach().float().contiguous()

    def layer_map(self) -> str:
        """Two characters per layer: '.' kept, lower case bypassed, upper case deleted (a/A
        attention, f/F FeedForward)."""
        def mark(action: str, letter: str) -> str:
            return "." if action == "keep" else (letter.upper() if action == "delete" else letter)

        return " ".join(mark(a, "a") + mark(f, "f") for a, f in zip(self.attn, self.ffn))

    @property
    def num_layers(self) -> int:
        return len(self.attn)

    # accounting: the one place these numbers are computed ---------------------------------
    def accounting(self) -> dict:
        removed = {k: sum(a != "keep" for a in self.actions(k)) for k in ("attn", "ffn")}
        removed_params = sum(removed[k] * self.unit_params[k] for k in removed)
        bypass_params = sum(t.numel() for t in self.tensors.values())
        n, kv_heads, head_dim = self.num_layers, self.base["num_key_value_heads"], self.base["head_dim"]
        kept_attn = n - removed["attn"]
        return {
            "removed_attn": removed["attn"],
            "removed_ffn": removed["ffn"],
            "removed_params": removed_params,
            "bypass_params": bypass_params,
            "block_params": self.block_params,
            "sparsity": removed_params / self.block_params,
            "net_sparsity": (removed_params - bypass_params) / self.block_params,
            "kv_reduction": removed["attn"] / n,
            "kv_slots": kept_attn,
            # K and V, per token, for every retained attention, in elements (x dtype bytes).
            "kv_elements_per_token": 2 * kept_attn * kv_heads * head_dim,
            "dense_kv_elements_per_token": 2 * n * kv_heads * head_dim,
        }

    def removed_units(self) -> list[str]:
        return [f"{k}.{i}" for i in range(self.num_layers) for k in ("attn", "ffn") if self.actions(k)[i] != "keep"]


    # persistence -----------------------------------------------------------------------
    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the plan folder atomically (into a temporary folder beside `path`, then renamed).
        `path` may be new or an empty folder; an existing plan is replaced only with `overwrite`,
        and anything else there is refused (`subfit.files`, the overwrite rule)."""
        self.validate()
        meta = {
            "format_version": FORMAT_VERSION,
            "base": self.base,
            "method": self.method,
            "unit_params": self.unit_params,
            "block_params": self.block_params,
            "accounting": self.accounting(),
            "layers": [
                {"layer": i, "attn": self.attn[i], "ffn": self.ffn[i],
                 "attn_rank": self._rank("attn", i), "ffn_rank": self._rank("ffn", i)}
                for i in range(self.num_layers)
            ],
        }
        text = json.dumps(meta, indent=1)
        tensors = {k: v.detach().to(torch.float32).contiguous().cpu() for k, v in self.tensors.items()}
        with staged_folder(path, PLAN_FOLDER, overwrite=overwrite) as staging:
            save_file(tensors, str(staging / WEIGHTS_FILE), metadata={"format_version": str(FORMAT_VERSION)})
            (staging / PLAN_FILE).write_text(text, encoding="utf-8")
        return Path(path)

    def _rank(self, kind: str, layer: int) -> int | None:
        return self.bypass(kind, layer).rank if self.actions(kind)[layer] == "bypass" else None

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Plan":
        """Read and validate a plan folder; any problem is a PlanError naming the file and field."""
        path = Path(path)
        meta_file, weights_file = path / PLAN_FILE, path / WEIGHTS_FILE
        meta = _read_meta(meta_file)
        layers = meta["layers"]
        tensors: dict[str, torch.Tensor] = {}
        if weights_file.exists():
            tensors = _read_tensors(weights_file)
        elif any("bypass" in (entry["attn"], entry["ffn"]) for entry in layers):
            raise PlanError(f"{weights_file} is missing, but the plan bypasses units and their weights are "
                            "stored there; the plan is incomplete: compress again.")
        plan = cls(base=meta["base"], attn=[entry["attn"] for entry in layers], ffn=[entry["ffn"] for entry in layers],
                   tensors=tensors, unit_params=meta["unit_params"], block_params=meta["block_params"],
                   method=meta["method"])
        plan.validate(path)
        for i, entry in enumerate(layers):
            for kind in ("attn", "ffn"):
                _expect(entry[f"{kind}_rank"] == plan._rank(kind, i), str(meta_file), f"layers[{i}].{kind}_rank",
                        entry[f"{kind}_rank"], f"{plan._rank(kind, i)}, the rank of the unit's bypass weights"
                        if plan.actions(kind)[i] == "bypass" else "null: the unit is not bypassed")
        return plan

    # validation ------------------------------------------------------------------------
    def validate(self, source: str | os.PathLike | None = None) -> None:
        """Check every field and tensor, and that decisions and tensors agree, naming the first thing
        that is wrong (with the plan folder `source`, by file: plan.json or bypass.safetensors)."""
        fields_at = str(Path(source) / PLAN_FILE) if source is not None else "plan"
        tensors_at = str(Path(source) / WEIGHTS_FILE) if source is not None else "plan tensors"
        self._validate_fields(fields_at)
        self._validate_tensors(tensors_at)

    def _validate_fields(self, where: str) -> None:
        _expect(isinstance(self.base, dict), where, "base", self.base, "an object")
        _check_keys(self.base, where, "base", tuple(BASE_FIELDS))
        for name, (test, expected) in BASE_FIELDS.items():
            _expect(test(self.base[name]), where, f"base.{name}", self.base[name], expected)
        n = self.base["num_layers"]
        for kind in ("attn", "ffn"):
            actions = self.actions(kind)
            _expect(isinstance(actions, list), where, f"the {kind} decisions", actions, "a list")
            if len(actions) != n:
                raise PlanError(f"{where}: the base model has {n} layers but the plan lists {len(self.attn)} "
                                f"attention and {len(self.ffn)} feedforward decisions.")
            for i, action in enumerate(actions):
                _expect(action in ACTIONS, where, f"layer {i} {kind} action", action, f"one of {ACTIONS}")
        _expect(isinstance(self.unit_params, dict), where, "unit_params", self.unit_params, "an object")
        _check_keys(self.unit_params, where, "unit_params", ("attn", "ffn"))
        for kind in ("attn", "ffn"):
            _expect(_positive_int(self.unit_params[kind]), where, f"unit_params.{kind}", self.unit_params[kind],
                    "the parameter count of one unit (a positive integer)")
        units = n * (self.unit_params["attn"] + self.unit_params["ffn"])
        _expect(_is_int(self.block_params) and self.block_params >= units, where, "block_params", self.block_params,
                f"an integer of at least num_layers x (unit_params.attn + unit_params.ffn) = {units}")
        _expect(isinstance(self.method, dict), where, "method", self.method, "an object")

    def _validate_tensors(self, where: str) -> None:
        _expect(isinstance(self.tensors, dict), where, "tensors", type(self.tensors), "a dict of name -> tensor")
        for name, tensor in self.tensors.items():
            _expect(isinstance(tensor, torch.Tensor), where, f"tensor {name!r}", type(tensor), "a torch.Tensor")
            if tensor.dtype not in FLOAT_DTYPES:
                raise PlanError(f"{where}: tensor {name!r} has dtype {tensor.dtype}; bypass weights are floating "
                                "point (float32, float16, bfloat16): the file is corrupt or was not made by subfit.")
            if not torch.isfinite(tensor).all():
                raise PlanError(f"{where}: tensor {name!r} holds NaN or Inf values; the plan is corrupt.")
            if tensor.numel() and float(tensor.abs().max()) > MAX_ABS_VALUE:
                raise PlanError(f"{where}: tensor {name!r} holds a value of magnitude {float(tensor.abs().max()):.3g}, "
                                f"beyond {MAX_ABS_VALUE:g} (float16's range, far above any fitted bypass): "
                                "the plan is corrupt.")
        hidden = self.base["hidden_size"]
        expected: dict[str, tuple] = {}
        for kind in ("attn", "ffn"):
            for i, action in enumerate(self.actions(kind)):
                if action != "bypass":
                    continue
                names = bypass_tensor_names(kind, i)
                down_name = names["down"]
                down = self.tensors.get(down_name)
                if down is None:
                    raise PlanError(f"{where}: layer {i} {'attention' if kind == 'attn' else 'feedforward'} is "
                                    f"bypassed but tensor {down_name!r} is missing.")
                rank = down.shape[-1] if down.dim() == 2 else 0
                if rank < 1:
                    raise PlanError(f"{where}: tensor {down_name!r} has shape {tuple(down.shape)}; expected "
                                    f"[{hidden}, rank] with rank >= 1.")
                expected.update({down_name: (hidden, rank), names["up"]: (rank, hidden), names["bias"]: (hidden,)})
        for name, shape in expected.items():
            tensor = self.tensors.get(name)
            if tensor is None:
                raise PlanError(f"{where}: tensor {name!r} is missing from {WEIGHTS_FILE}.")
            if tuple(tensor.shape) != shape:
                raise PlanError(f"{where}: tensor {name!r} has shape {tuple(tensor.shape)}, expected {shape}.")
        extra = sorted(set(self.tensors) - set(expected))
        if extra:
            raise PlanError(f"{where}: tensors {_shown(extra)} belong to no bypassed unit; the plan and its weights "
                            "disagree.")

    def check_base(self, decoder) -> None:
        """Refuse to apply this plan to a model other than the one it was made for."""
        if decoder.fingerprint() != self.base["fingerprint"]:
            raise PlanError(
                f"This plan was made for a {self.base['model_type']} model with fingerprint {self.base['fingerprint']} "
                f"({self.base.get('path')}), but the model given has fingerprint {decoder.fingerprint()} "
                "(different config or weight shapes). Load the plan's base model."
            )
        if not same_weights(decoder.weight_signature(), self.base["weight_signature"]):
            raise PlanError(
                "The model given has the plan's shapes but different weights (another checkpoint of the same "
                f"architecture?). The plan was made on {self.base.get('path')} {self.base.get('gguf_file') or ''}."
            )
        actual = {**{f"base.{k}": v for k, v in base_shape(decoder).items()},
                  "unit_params.attn": decoder.unit_params("attn", 0), "unit_params.ffn": decoder.unit_params("ffn", 0),
                  "block_params": decoder.block_params()}
        recorded = {**{f"base.{k}": self.base[k] for k in base_shape(decoder)}, "block_params": self.block_params,
                    **{f"unit_params.{k}": v for k, v in self.unit_params.items()}}
        for name, value in actual.items():
            if recorded[name] != value:
                raise PlanError(f"The plan's {name} is {recorded[name]} but its base model has {value}, although "
                                "the fingerprints match: the plan was edited by hand. Compress again.")


def _read_meta(meta_file: Path) -> dict:
    """plan.json as a dict whose top-level fields and `layers` entries have the right keys and types
    (the fields inside `base`, `unit_params` and the tensors are checked by `Plan.validate`)."""
    where = str(meta_file)
    if not meta_file.is_file():
        if meta_file.exists():
            raise PlanError(f"{meta_file} is not a file; the plan folder is damaged.")
        raise PlanError(f"{meta_file.parent} is not a plan directory: {PLAN_FILE} is missing. "
                        "Make one with `subfit compress`.")
    try:
        text = meta_file.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise PlanError(f"{meta_file} is not UTF-8 text (byte {e.start}); the plan is corrupt: compress again.") from e
    except OSError as e:
        raise PlanError(f"{meta_file} cannot be read ({e.strerror}).") from e
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as e:
        raise PlanError(f"{meta_file} is not valid JSON ({e}); the plan is corrupt, compress again.") from e
    except RecursionError as e:
        raise PlanError(f"{meta_file} is nested too deeply to be a plan; the plan is corrupt.") from e
    _expect(isinstance(meta, dict), where, "the top level", type(meta).__name__, "a JSON object")
    if "format_version" not in meta:
        raise PlanError(f"{meta_file} lacks the field 'format_version': it is not a subfit plan, or a damaged one.")
    version = meta["format_version"]
    if not _is_int(version) or version != FORMAT_VERSION:
        raise PlanError(f"{meta_file} has format_version {_shown(version)}; this subfit reads version "
                        f"{FORMAT_VERSION}. Re-create the plan with this version of subfit.")
    _check_keys(meta, where, "the plan", [k for k in PLAN_FIELDS if k not in OPTIONAL_PLAN_FIELDS], PLAN_FIELDS)
    if "accounting" in meta:
        _expect(isinstance(meta["accounting"], dict), where, "accounting", meta["accounting"], "an object")
    for name in ("base", "unit_params", "method"):
        _expect(isinstance(meta[name], dict), where, name, meta[name], "an object")
    layers = meta["layers"]
    _expect(isinstance(layers, list), where, "layers", layers, "a list with one object per layer")
    for i, entry in enumerate(layers):
        _expect(isinstance(entry, dict), where, f"layers[{i}]", entry, "an object with fields " + ", ".join(LAYER_FIELDS))
        _check_keys(entry, where, f"layers[{i}]", LAYER_FIELDS)
        _expect(_is_int(entry["layer"]) and entry["layer"] == i, where, f"layers[{i}].layer", entry["layer"], str(i))
        for kind in ("attn", "ffn"):
            _expect(entry[kind] in ACTIONS, where, f"layers[{i}].{kind}", entry[kind], f"one of {ACTIONS}")
            rank = entry[f"{kind}_rank"]
            _expect(rank is None or _positive_int(rank), where, f"layers[{i}].{kind}_rank", rank,
                    "a positive integer or null")
    return meta


def _read_tensors(weights_file: Path) -> dict[str, torch.Tensor]:
    """The safetensors file's tensors (safetensors stores raw arrays: reading it runs no code)."""
    try:
        return load_file(str(weights_file))
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as e:
        raise PlanError(f"{weights_file} cannot be read as safetensors ({e}); the file is corrupt.") from e
