"""Layer-by-layer capture of unit statistics, streamed into float64 moments.

One walk pushes the calibration tokens through the model one layer at a time, keeping only the
residual stream of all calibration tokens plus one layer on the device. Units already chosen for
removal are replaced on the fly by a bypass fitted on the activations this very walk produces, so
every fit sees the inputs that the compressed earlier layers really give it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from tqdm.auto import tqdm

from subfit.fitting import Moments
from subfit.memory import release_freed_memory
from subfit.models import UNIT_KINDS, Decoder
from subfit.plan import Bypass

Unit = tuple[str, int]  # ("attn" | "ffn", layer)
TARGETS = ("unit", "run")
Weights = Callable[[torch.Tensor], torch.Tensor]  # residual stream [..., d] -> float64 token weights [...]


def uniform_weights(hidden: torch.Tensor) -> torch.Tensor:
    return torch.ones(hidden.shape[:-1], dtype=torch.float64, device=hidden.device)


class UnitStats:
    """Streaming weighted statistics of a unit's input x (after its RMSNorm) and output y: float64
    means and centred co-moments, merged batch by batch (the pairwise update of Chan, Golub and
    LeVeque). Each batch is centred on its own mean before its products are formed, so no large
    mean cancels at the end.

    `product_dtype` is the precision of each batch's products: float64 keeps every step of a
    batch in float64; float32 (or bfloat16, as a scoring walk's matmuls run) centres the batch and
    forms its products in float32 (bfloat16 products), a third of the memory traffic, while the
    running sums stay float64. The batch's exact mean is recovered from the centred values, so
    the moments are those of the data up to the products' rounding."""

    def __init__(self, d_in: int, d_out: int, device, product_dtype: torch.dtype = torch.float64):
        f64 = dict(dtype=torch.float64, device=device)
        self.product_dtype = product_dtype
        self.work_dtype = torch.float64 if product_dtype == torch.float64 else torch.float32
        self.weight = torch.zeros((), **f64)
        self.mean_x = torch.zeros(d_in, **f64)
        self.mean_y = torch.zeros(d_out, **f64)
        # sum of w (x - mean_x)(z - mean_z)^T for z = [x, y]: xx and xy side by side, merged in one pass
        self.xz = torch.zeros(d_in, d_in + d_out, **f64)
        self.yy = torch.zeros((), **f64)  # sum of w ||y - mean_y||^2
        self.energy = torch.zeros((), **f64)  # sum of w * ||h||^2: the stream the error is relative to
        self.tokens = 0

    def add(self, x: torch.Tensor, y: torch.Tensor, hidden: torch.Tensor, w: torch.Tensor) -> None:
        d_in, work = x.shape[-1], self.work_dtype
        with torch.autocast(x.device.type, enabled=False):  # the products' precision is product_dtype's
            z = torch.cat([x.reshape(-1, d_in), y.reshape(-1, y.shape[-1])], 1).to(work)  # one GEMM for x and y
            w_work = w.reshape(-1).to(work)
            weight, total_work = w.double().sum(), w_work.sum()
            approx = (w_work @ z) / total_work
            root = w_work.sqrt()[:, None]
            scaled = (z - approx).mul_(root)  # sqrt(w) (z - approx): its Gram is the weighted one
            residue = (root[:, 0] @ scaled) / total_work  # what the rounded mean missed: ~1e-7 of it
            mean = approx.double() + residue.double()
            p, r = self.product_dtype, residue.double()
            low = scaled.to(p)
            gram = low[:, :d_in].T @ low  # merged into the float64 sums as it is, without a float64 copy
            yy = torch.linalg.vector_norm(scaled[:, d_in:]).double().square() - weight * r[d_in:].pow(2).sum()
            norms = torch.linalg.vector_norm(hidden.reshape(-1, hidden.shape[-1]).to(work), dim=-1)
            energy = (w_work * norms.square()).sum().double()
            # Merge the batch's centred moments into the running ones in place: its Gram, less what
            # the rounded mean missed, plus the shift between the running and the batch mean (rank-one
            # terms; the weights scale a vector, not the matrix).
            total = self.weight + weight
            shift = torch.cat([self.mean_x, self.mean_y]) - mean  # running mean minus batch mean
            scale = self.weight * weight / total
            self.xz.add_(gram).addr_(r[:d_in], r * -weight).addr_(shift[:d_in], shift * scale)
            self.yy += yy + scale * shift[d_in:].pow(2).sum()
            merged = mean + shift * (self.weight / total)
            self.mean_x, self.mean_y = merged[:d_in], merged[d_in:]
            self.weight = total
            self.energy += energy
        self.tokens += z.shape[0]

    def to(self, device) -> "UnitStats":
        """The same statistics on `device` (in place; returns self)."""
        for name in ("weight", "mean_x", "mean_y", "xz", "yy", "energy"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    @property
    def xx(self) -> torch.Tensor:
        return self.xz[:, :self.mean_x.shape[0]]

    @property
    def xy(self) -> torch.Tensor:
        return self.xz[:, self.mean_x.shape[0]:]

    def moments(self) -> Moments:
        n = self.weight
        return Moments(weight=float(n), mean_x=self.mean_x, mean_y=self.mean_y, cov_xx=self.xx / n,
                       cov_xy=self.xy / n, var_y=float(self.yy / n))

    def relative_error(self, error: float) -> float:
        """A fit's injected error relative to the residual stream, in the weighting's metric."""
        return error * float(self.weight) / max(float(self.energy), 1e-30)


Hook = Callable[[str, int, torch.Tensor, torch.Tensor], None]  # (kind, layer, h_before, h_after)


@dataclass
class Checkpoints:
    """A walk's residual stream (every batch) in front of every `every`-th layer. A later walk
    whose units before such a layer act exactly as in this one has the same stream there, so it
    resumes from it instead of from the embeddings: the greedy's next walk changes only the
    layers from its first newly removed unit on."""

    every: int
    streams: dict[int, list[torch.Tensor]] = field(default_factory=dict)

    def resume_layer(self, first_changed_layer: int) -> int:
        """The latest checkpointed layer at or before `first_changed_layer` (0: from the embeddings)."""
        return max((layer for layer in self.streams if layer <= first_changed_layer), default=0)


@torch.no_grad()
def walk(
    decoder: Decoder,
    calib_ids: torch.Tensor,
    *,
    actions: dict[Unit, str] | None = None,
    fit: Callable[[str, int, UnitStats], Bypass] | None = None,
    collect: Iterable[Unit] = (),
    weights: Weights = uniform_weights,
    product_dtype: torch.dtype = torch.float64,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    hooks: Iterable[Hook] = (),
    progress: bool = True,
    desc: str = "layers",
    target: str = "unit",
    resume: Checkpoints | None = None,
    start_layer: int = 0,
    record: Checkpoints | None = None,
    done: Callable[[Unit, UnitStats], None] | None = None,
) -> dict[Unit, UnitStats]:
    """Push calibration tokens through the model layer by layer.

    `actions` maps units to "bypass"/"delete" (others are kept). A bypassed unit's statistics are
    gathered first, then `fit(kind, layer, stats)` returns its bypass, which replaces the unit for
    the rest of the walk. Statistics are also returned for every unit in `collect`. `hooks` see
    the residual stream before and after each unit (baseline scores use them). `weights` gives each
    token's weight in the statistics (the selection's metric weighs tokens per stream size);
    `product_dtype` the precision of each batch's products (`UnitStats`).

    A bypassed unit's fit target is the stream after it on a reference path, minus the compressed
    stream before it. `target="unit"`: the reference is the compressed stream itself, so the target
    is the unit's own output. `target="run"`: along a run of adjacent bypassed units the reference
    runs the real units from the run's start, so each bypass also undoes the error of the bypasses
    before it in the run, and the run as a whole fits the block it replaces (what one block map
    fitted to the block's output does); a lone bypassed unit gets its own output, as with "unit".
    Scoring walks fit candidates to "unit"; compress's final fit uses "run", which measured better
    at every level (docs/method.md).

    `start_layer` > 0 resumes from `resume`'s stream in front of that layer (the caller vouches
    that the units before it act as they did there); only the units from it on are walked and
    returned. `record` keeps this walk's streams (those before `start_layer` are `resume`'s), on
    the model's own device, so checkpoints never take room on the walk's device.

    Memory on the walk's device: one layer, the residual stream of all calibration tokens (twice
    with run targets), one batch's activations, and statistics. With `done`, each unit's
    statistics are handed to it as soon as they are complete and not kept (one layer's at a time);
    without, all are returned.
    """
    if target not in TARGETS:
        raise ValueError(f"Unknown target {target!r}; choose one of {TARGETS}.")
    release_freed_memory()  # what earlier walks freed, before this one's streams are allocated
    if start_layer and (resume is None or start_layer not in resume.streams or target != "unit"):
        raise ValueError(f"Resuming at layer {start_layer} needs a checkpoint there and unit targets.")
    actions = actions or {}
    collect = set(collect)
    hooks = list(hooks)
    device = torch.device(device) if device is not None else calib_ids.device
    d = decoder.hidden_size
    batches = [b.to(device) for b in calib_ids.split(batch_size)]
    home = next(decoder.model.parameters()).device
    decoder.body.embed_tokens.to(device)
    decoder.body.rotary_emb.to(device)
    if start_layer:
        hidden = [h.to(device) for h in resume.streams[start_layer]]
    else:
        hidden = [decoder.embed(b) for b in batches]
    positions = torch.arange(calib_ids.shape[1], device=device)[None]
    rotary = decoder.rotary(hidden[0], positions)
    reference = list(hidden) if target != "unit" else None  # the stream a bypass's target follows
    stats: dict[Unit, UnitStats] = {}
    if record is not None and start_layer:
        record.streams.update({k: v for k, v in resume.streams.items() if k < start_layer})
    for layer in tqdm(range(start_layer, decoder.num_layers), desc=desc, disable=not progress, leave=False):
        if record is not None and layer % record.every == 0:
            record.streams[layer] = [h.to(home) for h in hidden]  # replaced, never changed in place
        decoder.layers[layer].to(device)
        for kind in UNIT_KINDS:
            unit = (kind, layer)
            action = actions.get(unit, "keep")
            if action not in ("keep", "bypass", "delete"):
                raise ValueError(f"Unknown action {action!r} for unit {unit}.")
            norm = decoder.norm(kind, layer)
            unit_stats = UnitStats(d, d, device, product_dtype) if (unit in collect or action == "bypass") else None
            # A kept unit's output is added as soon as it is computed; a bypassed unit needs the
            # statistics of every batch before its fit exists, so it takes a second sweep.
            follows_reference = reference is not None and action == "bypass"
            for i, h in enumerate(hidden):
                normed = norm(h)
                y = None
                if follows_reference:
                    reference[i] = reference[i] + decoder.run_unit(kind, layer, norm(reference[i]), rotary)
                if action == "bypass" and reference is not None:
                    y = reference[i] - h
                elif action == "keep" or unit_stats is not None:
                    y = decoder.run_unit(kind, layer, normed, rotary)
                if unit_stats is not None:
                    unit_stats.add(normed, y, h, weights(h))
                if action != "bypass":
                    hidden[i] = h + y if action == "keep" else h
                    if target == "run":
                        reference[i] = hidden[i]  # a kept or deleted unit ends the run
                    for hook in hooks:
                        hook(kind, layer, h, hidden[i])
            if action == "bypass":
                bypass = fit(kind, layer, unit_stats)
                for i, h in enumerate(hidden):
                    hidden[i] = h + bypass(norm(h))
                    for hook in hooks:
                        hook(kind, layer, h, hidden[i])
            if unit_stats is not None and done is not None:
                done(unit, unit_stats)
            elif unit_stats is not None:
                stats[unit] = unit_stats
        decoder.layers[layer].to(home)
        torch.clear_autocast_cache()  # bf16 weight copies made under bf16 matmuls: one layer's at a time
    decoder.body.embed_tokens.to(home)
    decoder.body.rotary_emb.to(home)
    return stats
