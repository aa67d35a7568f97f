"""Baselines SubFit is compared with, each producing an ordinary `Plan` (so the reference
executor, the evaluation and the runtime run them exactly like a SubFit plan).

- ShortGPT (Men et al. 2024): delete the whole layers with the lowest Block Influence,
  BI_l = 1 - E_tokens cos(h_l, h_{l+1}) (all calibration tokens), non-contiguous, no fit.
- UIDL (Gromov et al. 2024, "The Unreasonable Ineffectiveness of the Deeper Layers"): delete the
  contiguous block of n layers whose input and output are closest by angular distance
  arccos(cos(h_l, h_{l+n})) / pi, measured on the last token of every calibration sequence.
- ReplaceMe (Shopkhoev et al. 2025, least-squares variant): UIDL's block, replaced by one linear
  map fitted by ridge least squares (float64). Adaptation to the plan format: a bypass maps the
  NORMED input of a unit, `out = h + (rmsnorm(h) * w) @ down @ up + bias`, so the block map is a
  full-rank bypass on the block's first attention unit, fitted from that unit's normed input
  (`input_layernorm` of the first layer) to (block output - block input), with
  `down = W [d, d]`, `up = I [d, d]`, `bias [d]`; every other unit of the block is deleted. (The
  paper folds its map into the preceding layer's down projection and adds no parameters; here
  the plan accounting counts the bypass's 2 d^2 + d parameters, identity included.)
- LLM-Drop (He et al. 2024, "What Matters in Transformers?", joint layer drop): delete the
  attention and FeedForward submodules whose residual stream changes least, importance =
  1 - E_tokens cos(h_before, h_after), one shot, no fit. As in the paper, both kinds share one
  ranking by importance, regardless of size; under a parameter budget each unit in that order is
  dropped if it still fits (otherwise skipped). (Ranking by summed importance per parameter
  instead would favour the three-times-larger FeedForwards, which the paper's rule does not.)

Budgets are SubFit's: removed transformer-block parameters / all block parameters. The whole-layer
methods remove round(sparsity * block params / layer params) layers (the nearest whole number);
the plan's accounting reports the exact fraction.

All four baselines are scored from ONE dense walk over the calibration tokens (`dense_scores`),
which callers may compute once and pass to every call (`scores=`): the sweep does.
"""
from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from subfit import models
from subfit.config import check_sparsity
from subfit.methods import BASELINES
from subfit.fitting import LinearFit, full_fit
from subfit.models import UNIT_KINDS, Decoder, ModelSource
from subfit.plan import Bypass, Plan
from subfit.stats import UnitStats, uniform_weights, walk

REPLACEME_RIDGE = 1e-4  # relative to the mean input variance (fitting._ridge): small, as in ReplaceMe's LS variant


# ---------------------------------------------------------------------------------------------
# one dense walk: every statistic the baselines rank by
# ---------------------------------------------------------------------------------------------
@dataclass
class DenseScores:
    """Similarity statistics of the dense model on the calibration tokens.

    layer_cos[l]: mean over all tokens of cos(h_l, h_{l+1}) (input and output of layer l).
    unit_cos[kind][l]: mean over all tokens of cos(h before the unit, h after it).
    last[s, b]: residual stream of sequence s's last token at layer boundary b (b = 0 is the
        embedding output, b = L the last layer's output), float32.
    """

    layer_cos: torch.Tensor  # [L] float64
    unit_cos: dict[str, torch.Tensor]  # kind -> [L] float64
    last: torch.Tensor  # [N, L + 1, d]
    tokens: int
    meta: dict = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return self.layer_cos.numel()

    def block_influence(self) -> torch.Tensor:
        """ShortGPT's BI per layer (low = the layer barely changes the stream)."""
        return 1.0 - self.layer_cos

    def unit_importance(self) -> dict[str, torch.Tensor]:
        """LLM-Drop's importance per unit (low = the unit barely changes the stream)."""
        return {k: 1.0 - v for k, v in self.unit_cos.items()}

    def angular_distance(self, n: int) -> torch.Tensor:
        """UIDL's distance for every block of n layers: [L - n + 1], entry l for layers l..l+n-1,
        the mean over sequences of arccos(cos(h_l, h_{l+n})) / pi on the last token."""
        if not 1 <= n <= self.num_layers:
            raise ValueError(f"A block of {n} layers does not fit in {self.num_layers} layers.")
        h = self.last.double()
        cos = F.cosine_similarity(h[:, : self.num_layers - n + 1], h[:, n:], dim=-1)  # [N, L - n + 1]
        return (torch.arccos(cos.clamp(-1.0, 1.0)) / math.pi).mean(0)

    # persistence (the sweep caches these) -----------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        torch.save({"layer_cos": self.layer_cos, "unit_cos": self.unit_cos, "last": self.last,
                    "tokens": self.tokens, "meta": self.meta}, str(path))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "DenseScores":
        blob = torch.load(str(path), weights_only=True)
        return cls(blob["layer_cos"], blob["unit_cos"], blob["last"], int(blob["tokens"]), blob.get("meta", {}))


class _Batches:
    """walk() calls hooks once per batch, in batch order, for each unit in turn: this counter
    gives each call its batch index."""

    def __init__(self):
        self.unit, self.index = None, -1

    def __call__(self, kind: str, layer: int) -> int:
        if self.unit != (kind, layer):
            self.unit, self.index = (kind, layer), -1
        self.index += 1
        return self.index


def _copy_last(hidden: torch.Tensor) -> torch.Tensor:
    """The last token's stream as its own float32 CPU tensor: a view (`.float().cpu()` of a CPU
    float32 tensor is one) would keep the whole [batch, length, hidden] stream of every layer alive."""
    return hidden[:, -1].detach().to("cpu", torch.float32, copy=True)


@torch.no_grad()
def dense_scores(decoder: Decoder, calib_ids: torch.Tensor, *, batch_size: int = 8,
                 device: str | torch.device | None = None, progress: bool = True) -> DenseScores:
    """One layer-by-layer walk of the dense model collecting every baseline's statistics."""
    n_layers = decoder.num_layers
    layer_sum = torch.zeros(n_layers, dtype=torch.float64)
    unit_sum = {k: torch.zeros(n_layers, dtype=torch.float64) for k in UNIT_KINDS}
    layer_input: dict[int, torch.Tensor] = {}  # batch -> h_l of the current layer
    last = [[None] * (n_layers + 1) for _ in range(len(calib_ids.split(batch_size)))]
    batch_of = _Batches()

    def cos_sum(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(F.cosine_similarity(a.double(), b.double(), dim=-1).sum())

    def hook(kind: str, layer: int, before: torch.Tensor, after: torch.Tensor) -> None:
        i = batch_of(kind, layer)
        unit_sum[kind][layer] += cos_sum(before, after)
        if kind == "attn":
            layer_input[i] = before
            if layer == 0:
                last[i][0] = _copy_last(before)
        else:
            layer_sum[layer] += cos_sum(layer_input.pop(i), after)
            last[i][layer + 1] = _copy_last(after)

    walk(decoder, calib_ids, hooks=[hook], batch_size=batch_size, device=device, progress=progress,
         desc="baseline scores")
    tokens = calib_ids.numel()
    return DenseScores(
        layer_cos=layer_sum / tokens,
        unit_cos={k: v / tokens for k, v in unit_sum.items()},
        last=torch.cat([torch.stack(row, 1) for row in last]),
        tokens=tokens,
        meta={"samples": calib_ids.shape[0], "length": calib_ids.shape[1], "fingerprint": decoder.fingerprint()},
    )


# ---------------------------------------------------------------------------------------------
# budgets and selection rules
# ---------------------------------------------------------------------------------------------
def layers_for(sparsity: float, plan: Plan) -> int:
    """Whole layers a layer-level method removes for `sparsity`: the nearest whole number."""
    check_sparsity(sparsity)
    layer = plan.unit_params["attn"] + plan.unit_params["ffn"]
    n = math.floor(sparsity * plan.block_params / layer + 0.5)
    if n < 1:
        raise ValueError(f"sparsity={sparsity} is less than half a layer ({layer / plan.block_params:.4f} of block "
                         "parameters each): a layer-level method removes nothing. Raise the sparsity.")
    if n >= plan.num_layers:
        raise ValueError(f"sparsity={sparsity} asks for {n} of {plan.num_layers} layers; keep at least one.")
    return n


def shortgpt_layers(scores: DenseScores, n: int) -> list[int]:
    """The n layers of lowest Block Influence (ties: the deeper layer first, as ShortGPT's ranking
    of late layers), in depth order."""
    bi = scores.block_influence()
    order = sorted(range(scores.num_layers), key=lambda l: (float(bi[l]), -l))
    return sorted(order[:n])


def uidl_block(scores: DenseScores, n: int) -> tuple[int, float]:
    """(first layer, distance) of the contiguous block of n layers with the least angular
    distance between its input and output (ties: the deepest)."""
    dist = scores.angular_distance(n)
    start = min(range(dist.numel()), key=lambda l: (float(dist[l]), -l))
    return start, float(dist[start])


def llm_drop_units(scores: DenseScores, unit_params: dict[str, int], quota: int) -> list[tuple[str, int]]:
    """LLM-Drop's joint drop under a parameter budget: attention and FeedForward units in one
    ranking by importance (1 - cos, least first, whatever their size); each is dropped if it
    still fits in `quota`, otherwise skipped for the next."""
    importance = scores.unit_importance()
    ranked = sorted(((float(importance[k][l]), l, k) for l in range(scores.num_layers) for k in UNIT_KINDS))
    chosen, used = [], 0
    for _, layer, kind in ranked:
        if used + unit_params[kind] <= quota:
            chosen.append((kind, layer))
            used += unit_params[kind]
    return sorted(chosen, key=lambda u: (u[1], u[0]))


# ---------------------------------------------------------------------------------------------
# ReplaceMe's block map
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def fit_blocks(decoder: Decoder, calib_ids: torch.Tensor, blocks: list[tuple[int, int]], *,
               ridge: float = REPLACEME_RIDGE, batch_size: int = 8, device: str | torch.device | None = None,
               progress: bool = True) -> dict[tuple[int, int], LinearFit]:
    """Ridge least-squares maps for blocks (first layer, n layers), all in ONE dense walk (cut
    after the deepest block): x = input_layernorm_first(h_first) -> y = h_{first+n} - h_first,
    unweighted (plain least squares), float64 moments, `fitting.full_fit`."""
    blocks = sorted(set(blocks))
    if not blocks:
        return {}
    if ridge < 0:
        raise ValueError(f"ridge={ridge} must not be negative (e.g. {REPLACEME_RIDGE}).")
    for start, n in blocks:
        if n < 1 or start < 0 or start + n > decoder.num_layers:
            raise ValueError(f"Block of {n} layers from layer {start} does not fit in {decoder.num_layers} layers.")
    d = decoder.hidden_size
    run_device = torch.device(device) if device is not None else calib_ids.device
    stats = {b: UnitStats(d, d, run_device) for b in blocks}
    starts = {s for s, _ in blocks}
    last_use = {s: max(s + n - 1 for b, n in blocks if b == s) for s in starts}
    ending = {}
    for start, n in blocks:
        ending.setdefault(start + n - 1, []).append((start, n))
    stored: dict[int, dict[int, torch.Tensor]] = {s: {} for s in starts}  # first layer -> batch -> h
    batch_of = _Batches()

    def hook(kind: str, layer: int, before: torch.Tensor, after: torch.Tensor) -> None:
        i = batch_of(kind, layer)
        if kind == "attn" and layer in starts:
            stored[layer][i] = before
        if kind == "ffn":
            for start, n in ending.get(layer, ()):
                h0 = stored[start][i]
                x = decoder.norm("attn", start)(h0)
                stats[(start, n)].add(x, after - h0, h0, uniform_weights(h0))
            for start in [s for s in starts if last_use[s] == layer]:
                stored[start].pop(i, None)

    partial = copy.copy(decoder)  # the walk stops after the deepest block: nothing later is needed
    partial.num_layers = max(s + n for s, n in blocks)
    walk(partial, calib_ids, hooks=[hook], batch_size=batch_size, device=device, progress=progress,
         desc="ReplaceMe fit")
    return {b: full_fit(stats[b].moments(), ridge) for b in blocks}


# ---------------------------------------------------------------------------------------------
# plans
# ---------------------------------------------------------------------------------------------
def delete_plan(decoder: Decoder, source: ModelSource, units: list[tuple[str, int]], method: dict) -> Plan:
    plan = Plan.empty(decoder, source)
    for kind, layer in units:
        plan.actions(kind)[layer] = "delete"
    plan.method = method
    plan.validate()
    return plan


def block_map_plan(decoder: Decoder, source: ModelSource, start: int, n: int, fit: LinearFit, method: dict) -> Plan:
    """Layers start..start+n-1 replaced by one full-rank bypass on attention unit `start`."""
    plan = Plan.empty(decoder, source)
    for layer in range(start, start + n):
        plan.attn[layer] = plan.ffn[layer] = "delete"
    plan.set_bypass("attn", start, Bypass(fit.down, fit.up, fit.bias))
    plan.method = method
    plan.validate()
    return plan


def _shortgpt(decoder, source, sparsity, calib_ids, scores, base_method, **_) -> Plan:
    plan = Plan.empty(decoder, source)
    n = layers_for(sparsity, plan)
    layers = shortgpt_layers(scores, n)
    bi = scores.block_influence()
    method = {**base_method, "layers": layers, "block_influence": [round(float(v), 6) for v in bi]}
    return delete_plan(decoder, source, [(k, l) for l in layers for k in UNIT_KINDS], method)


def _uidl(decoder, source, sparsity, calib_ids, scores, base_method, **_) -> Plan:
    plan = Plan.empty(decoder, source)
    n = layers_for(sparsity, plan)
    start, distance = uidl_block(scores, n)
    method = {**base_method, "block": [start, n], "angular_distance": round(distance, 6),
              "distances": [round(float(v), 6) for v in scores.angular_distance(n)]}
    return delete_plan(decoder, source, [(k, l) for l in range(start, start + n) for k in UNIT_KINDS], method)


def _replaceme(decoder, source, sparsity, calib_ids, scores, base_method, *, ridge=REPLACEME_RIDGE,
               fit: LinearFit | None = None, batch_size=8, device=None, progress=True, **_) -> Plan:
    plan = Plan.empty(decoder, source)
    n = layers_for(sparsity, plan)
    start, distance = uidl_block(scores, n)
    if fit is None:
        fit = fit_blocks(decoder, calib_ids, [(start, n)], ridge=ridge, batch_size=batch_size, device=device,
                         progress=progress)[(start, n)]
    method = {**base_method, "block": [start, n], "angular_distance": round(distance, 6), "ridge": ridge,
              "fit_error": fit.error}
    return block_map_plan(decoder, source, start, n, fit, method)


def _llm_drop(decoder, source, sparsity, calib_ids, scores, base_method, **_) -> Plan:
    plan = Plan.empty(decoder, source)
    quota = int(sparsity * plan.block_params)
    units = llm_drop_units(scores, plan.unit_params, quota)
    if not units:
        raise ValueError(f"sparsity={sparsity} allows {quota:,} parameters, less than one attention unit "
                         f"({plan.unit_params['attn']:,}). Raise the sparsity.")
    importance = scores.unit_importance()
    method = {**base_method, "importance": {f"{k}.{l}": round(float(importance[k][l]), 6)
                                            for l in range(decoder.num_layers) for k in UNIT_KINDS}}
    return delete_plan(decoder, source, units, method)


BUILDERS: dict[str, Callable] = {"shortgpt": _shortgpt, "uidl": _uidl, "replaceme": _replaceme,
                                 "llm-drop": _llm_drop}  # one per name of methods.BASELINES


def compress_baseline(
    model,
    method: str,
    sparsity: float,
    calib_ids: torch.Tensor,
    *,
    source: ModelSource | None = None,
    scores: DenseScores | None = None,
    ridge: float | None = None,
    fit: LinearFit | None = None,
    calib_info: dict | None = None,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> Plan:
    """Compress `model` (a Hugging Face model, or a hub id / folder / .gguf path) with the baseline
    `method` (a key of BASELINES) to `sparsity` on the calibration tokens `calib_ids` [N, L].

    `scores` (from `dense_scores` on the same model and tokens) skips the scoring walk; `fit`
    (ReplaceMe only) skips the fitting walk for the block it was fitted on. `ridge` is ReplaceMe's
    (default REPLACEME_RIDGE). SubFit itself is `subfit.compress`.
    """
    if method not in BASELINES:
        hint = " SubFit itself is subfit.compress." if method == "subfit" else ""
        raise ValueError(f"Unknown baseline {method!r}; choose one of {', '.join(BASELINES)}.{hint}")
    check_sparsity(sparsity)
    if not isinstance(calib_ids, torch.Tensor) or calib_ids.dim() != 2:
        raise ValueError("calib_ids must be a token tensor [samples, length] (see subfit.calibration).")
    if isinstance(model, (str, os.PathLike)) or model is None:
        model, _, source = models.load(model)
    decoder = Decoder(model)
    source = source or models.source_of(model)
    if sparsity == 0:
        return Plan.empty(decoder, source)
    calib_ids = calib_ids.long()
    if scores is None:
        scores = dense_scores(decoder, calib_ids, batch_size=batch_size, device=device, progress=progress)
    elif scores.num_layers != decoder.num_layers or scores.meta.get("fingerprint") not in (None, decoder.fingerprint()):
        raise ValueError("The scores given were computed on another model; recompute them with dense_scores().")
    base_method = {"name": method, "sparsity": sparsity,
                   "calibration": calib_info or {"source": "tensor", "samples": calib_ids.shape[0],
                                                 "length": calib_ids.shape[1]}}
    extra = {"ridge": REPLACEME_RIDGE if ridge is None else ridge, "fit": fit} if method == "replaceme" else {}
    return BUILDERS[method](decoder, source, sparsity, calib_ids, scores, base_method, batch_size=batch_size,
                                 device=device, progress=progress, **extra)
