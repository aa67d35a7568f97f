"""The plan: per layer, which units are kept, bypassed or deleted, plus the bypass weights.

On disk a plan is a directory with `plan.json` (human-readable decisions and accounting) and
`bypass.safetensors` (the weights). Loading validates everything before anything runs, and the
accounting (parameters removed, bypass parameters, KV cache) is computed here and nowhere else.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from subfit.models import same_weights

FORMAT_VERSION = 1
ACTIONS = ("keep", "bypass", "delete")
PLAN_FILE = "plan.json"
WEIGHTS_FILE = "bypass.safetensors"
FFN_BASIS = "ffn.basis"


def bypass_tensor_names(kind: str, layer: int) -> dict[str, str]:
    """The names of a bypass's tensors in `bypass.safetensors`: the one place they are built."""
    down = f"attn.{layer}.down" if kind == "attn" else FFN_BASIS
    return {"down": down, "up": f"{kind}.{layer}.up", "bias": f"{kind}.{layer}.bias"}


class PlanError(ValueError):
    """A plan is malformed, incomplete, or does not match the model it is applied to."""


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
        cfg = decoder.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return cls(
            base={
                "path": source.path,
                "gguf_file": source.gguf_file,
                "model_type": cfg.model_type,
                "fingerprint": decoder.fingerprint(),
                "weight_signature": decoder.weight_signature(),
                "num_layers": n,
                "hidden_size": decoder.hidden_size,
                "num_key_value_heads": cfg.num_key_value_heads,
                "head_dim": head_dim,
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
    def save(self, path: str | Path) -> Path:
        self.validate()
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
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
        tensors = {k: v.detach().to(torch.float32).contiguous().cpu() for k, v in self.tensors.items()}
        save_file(tensors, str(path / WEIGHTS_FILE), metadata={"format_version": str(FORMAT_VERSION)})
        (path / PLAN_FILE).write_text(json.dumps(meta, indent=1))
        return path

    def _rank(self, kind: str, layer: int) -> int | None:
        return self.bypass(kind, layer).rank if self.actions(kind)[layer] == "bypass" else None

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        path = Path(path)
        if not (path / PLAN_FILE).is_file():
            raise PlanError(f"{path} is not a plan directory: {PLAN_FILE} is missing. Make one with `subfit compress`.")
        try:
            meta = json.loads((path / PLAN_FILE).read_text())
        except json.JSONDecodeError as e:
            raise PlanError(f"{path / PLAN_FILE} is not valid JSON ({e}); the plan is corrupt, compress again.") from e
        version = meta.get("format_version") if isinstance(meta, dict) else None
        if version != FORMAT_VERSION:
            raise PlanError(f"{path / PLAN_FILE} has format_version {version!r}; this subfit reads version "
                            f"{FORMAT_VERSION}. Re-create the plan with this version of subfit.")
        for key in ("base", "layers", "unit_params", "block_params"):
            if key not in meta:
                raise PlanError(f"{path / PLAN_FILE} lacks the field {key!r}; the plan is incomplete.")
        tensors = {}
        if (path / WEIGHTS_FILE).exists():
            try:
                tensors = load_file(str(path / WEIGHTS_FILE))
            except (SafetensorError, OSError, ValueError) as e:
                raise PlanError(f"{path / WEIGHTS_FILE} cannot be read as safetensors ({e}); the file is corrupt.") from e
        layers = meta["layers"]
        plan = cls(
            base=meta["base"],
            attn=[entry.get("attn") for entry in layers],
            ffn=[entry.get("ffn") for entry in layers],
            tensors=tensors,
            unit_params=meta["unit_params"],
            block_params=meta["block_params"],
            method=meta.get("method", {}),
        )
        plan.validate(where=str(path))
        return plan

    # validation ------------------------------------------------------------------------
    def validate(self, where: str = "plan") -> None:
        """Check that the decisions and the tensors agree, naming the first thing that is wrong."""
        n, hidden = self.base.get("num_layers"), self.base.get("hidden_size")
        if len(self.attn) != n or len(self.ffn) != n:
            raise PlanError(f"{where}: the base model has {n} layers but the plan lists {len(self.attn)} attention "
                            f"and {len(self.ffn)} feedforward decisions.")
        expected: dict[str, tuple] = {}
        ffn_rank = self.tensors[FFN_BASIS].shape[-1] if FFN_BASIS in self.tensors else None
        for kind in ("attn", "ffn"):
            for i, action in enumerate(self.actions(kind)):
                if action not in ACTIONS:
                    raise PlanError(f"{where}: layer {i} {kind} action is {action!r}; expected one of {ACTIONS}.")
                if action != "bypass":
                    continue
                if kind == "attn":
                    down = self.tensors.get(f"attn.{i}.down")
                    if down is None:
                        raise PlanError(f"{where}: layer {i} attention is bypassed but tensor 'attn.{i}.down' is missing.")
                    rank = down.shape[-1]
                    expected[f"attn.{i}.down"] = (hidden, rank)
                else:
                    if ffn_rank is None:
                        raise PlanError(f"{where}: layer {i} feedforward is bypassed but the shared basis "
                                        f"'{FFN_BASIS}' is missing.")
                    rank = ffn_rank
                    expected[FFN_BASIS] = (hidden, rank)
                expected[f"{kind}.{i}.up"] = (rank, hidden)
                expected[f"{kind}.{i}.bias"] = (hidden,)
        for name, shape in expected.items():
            tensor = self.tensors.get(name)
            if tensor is None:
                raise PlanError(f"{where}: tensor {name!r} is missing from {WEIGHTS_FILE}.")
            if tuple(tensor.shape) != shape:
                raise PlanError(f"{where}: tensor {name!r} has shape {tuple(tensor.shape)}, expected {shape}.")
            if not torch.isfinite(tensor).all():
                raise PlanError(f"{where}: tensor {name!r} holds NaN or Inf values; the plan is corrupt.")
        extra = sorted(set(self.tensors) - set(expected))
        if extra:
            raise PlanError(f"{where}: tensors {extra} belong to no bypassed unit; the plan and its weights disagree.")

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
