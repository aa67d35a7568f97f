"""Which units go: damage scores, the output-KL probe, budget packing and the greedy walk.

A unit's damage is first scored locally, as the error its fitted bypass would inject into the
residual stream relative to the stream, per token (what the next RMSNorm sees); the most promising
units are then re-ranked by the KL divergence their bypass causes in the model's next-token
distribution on probe sequences the scoring walk did not fit on. The greedy re-scores after each
step, so removals that interact are seen together.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from subfit import hardware
from subfit.config import VALIDATION_SAMPLES
from subfit.fitting import LinearFit, reduced_rank_fit, shared_basis
from subfit.memory import release_freed_memory
from subfit.models import UNIT_KINDS, Decoder
from subfit.plan import Bypass, Plan
from subfit.stats import Checkpoints, Unit, UnitStats, walk

Group = tuple[Unit, ...]  # units removed together: one unit, or a whole layer's two


def token_weights(hidden: torch.Tensor) -> torch.Tensor:
    """Per-token weights of the error metric: 1 / mean(h^2) of the residual stream the error is
    added to, i.e. the error as the next RMSNorm sees it. Unweighted, the few tokens that carry
    massive activations dominate every norm and all units look alike."""
    mean_square = torch.linalg.vector_norm(hidden.float(), dim=-1).double().square() / hidden.shape[-1]
    return 1.0 / mean_square.clamp_min(1e-12)


def as_bypass(fit: LinearFit) -> Bypass:
    return Bypass(fit.down.float(), fit.up.float(), fit.bias.float())


# ---------------------------------------------------------------------------------------------
# which calibration sequences each part of the selection sees
# ---------------------------------------------------------------------------------------------
def scoring_and_probe_ids(calib_ids: torch.Tensor, score_samples: int,
                          probe_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The scoring walk's sequences and the output-KL probe's, held out from them.

    Probed on its own fit sequences a bypass looks about 30% less harmful (first walk on
    SmolLM2-135M, docs/method.md), so the greedy would trust its most overfitted bypasses; held
    out, the KL is unbiased. Short calibration gives up scoring sequences so the probe stays held out.
    """
    n = calib_ids.shape[0]
    if n < 2:
        return calib_ids, calib_ids
    held_out = min(probe_samples, n - 1)
    scoring = calib_ids[:max(1, min(score_samples, n - held_out))]
    return scoring, calib_ids[scoring.shape[0]:scoring.shape[0] + held_out]


def validation_split(calib_ids: torch.Tensor, draws: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The sequences bypasses are fitted on and those held out to choose between selection draws.

    One draw needs no choice and fits on every sequence. Several draws set aside
    `VALIDATION_SAMPLES` sequences, a seeded random subset (a drawn file's windows are in file
    order), which no scoring walk, probe or fit sees, so the choice does not favour the plan whose
    bypasses overfit most."""
    if draws == 1:
        return calib_ids, calib_ids[:0]
    n = calib_ids.shape[0]
    if n < VALIDATION_SAMPLES + 2:
        raise ValueError(f"selection_draws={draws} holds out {VALIDATION_SAMPLES} calibration sequences to choose "
                         f"between draws and needs at least 2 more to fit on, but there are {n}. Give more "
                         f"calibration (--calib-samples) or use one draw (--selection-draws 1).")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    held = order[:VALIDATION_SAMPLES].sort().values
    return calib_ids[order[VALIDATION_SAMPLES:].sort().values], calib_ids[held]


def draw_order(fit_ids: torch.Tensor, draw: int, seed: int) -> torch.Tensor:
    """The sequences in the order draw `draw` takes its scoring walk and probe from (the first ones):
    draw 0 as given, so one draw is the plain selection; later draws a seeded shuffle."""
    if draw == 0:
        return fit_ids
    generator = torch.Generator().manual_seed(1_000_003 * seed + draw)
    return fit_ids[torch.randperm(fit_ids.shape[0], generator=generator)]


# ---------------------------------------------------------------------------------------------
# budget packing
# ---------------------------------------------------------------------------------------------
def unit_groups(num_layers: int, granularity: str) -> list[Group]:
    """What can be removed: single units in depth order, or whole layers."""
    if granularity == "layer":
        return [tuple((k, i) for k in UNIT_KINDS) for i in range(num_layers)]
    return [((k, i),) for i in range(num_layers) for k in UNIT_KINDS]


def group_sizes(groups: list[Group], unit_params: dict[str, int]) -> dict[Group, int]:
    return {g: sum(unit_params[kind] for kind, _ in g) for g in groups}


def infeasible(plan: Plan, sparsity: float, granularity: str = "unit") -> str | None:
    """Why `sparsity` cannot be reached on `plan`'s model at `granularity` (None if it can)."""
    sizes = plan.unit_params if granularity == "unit" else {"layer": sum(plan.unit_params.values())}
    smallest, quota = min(sizes.values()), int(sparsity * plan.block_params)
    if sparsity > 0 and quota < smallest:
        return (f"sparsity={sparsity} allows {quota:,} parameters, less than the smallest removable {granularity} "
                f"({smallest:,} = {smallest / plan.block_params:.4f} of block parameters). Raise the sparsity.")
    return None


def greedy_select(scores: dict[Group, float], sizes: dict[Group, int], room: int) -> list[Group]:
    """Groups whose total size comes as close to `room` as the smallest group allows, without
    exceeding it, at the least summed score.

    Groups come in at most two sizes (attention and FeedForward units, or whole layers). For each
    count of large groups (best-scoring first), small ones fill the rest; among the mixes that use
    the budget best, the one with the least total damage wins.
    """
    classes = sorted({sizes[g] for g in scores}, reverse=True)
    if len(classes) > 2:
        raise ValueError(f"greedy_select handles at most two group sizes, got {classes}.")
    ranked = [sorted((g for g in scores if sizes[g] == s), key=lambda g: (scores[g], g)) for s in classes]
    large, small = (ranked + [[]])[:2]
    size_large, size_small = classes[0], classes[-1]
    options = []
    for n_large in range(len(large) + 1):
        if n_large * size_large > room:
            break
        n_small = min(len(small), (room - n_large * size_large) // size_small) if small else 0
        chosen = large[:n_large] + small[:n_small]
        options.append((-(n_large * size_large + n_small * size_small), sum(scores[g] for g in chosen), chosen))
    return _least_damage(options, size_small)


def _least_damage(options: list[tuple[int, float, list[Group]]], tolerance: int) -> list[Group]:
    """Among (-filled, damage, groups) options, those within `tolerance` of the best fill use the
    budget equally well; the least damage among them wins."""
    if not options:
        return []
    best_fill = min(o[0] for o in options)
    good = [o for o in options if o[0] < best_fill + tolerance]
    return min(good, key=lambda o: (o[1], o[0]))[2]


def best_window(order: list[Group], scores: dict[Group, float], sizes: dict[Group, int], room: int) -> list[Group]:
    """The contiguous run of groups (in depth order) that fills `room` best at the least summed
    score: the contiguous ablation of SubFit, and the rule of block methods."""
    options = []
    for start in range(len(order)):
        total, damage = 0, 0.0
        for end in range(start, len(order)):
            if total + sizes[order[end]] > room:
                break
            total += sizes[order[end]]
            damage += scores[order[end]]
            options.append((-total, damage, order[start:end + 1]))
    return _least_damage(options, min(sizes.values(), default=0))


# ---------------------------------------------------------------------------------------------
# the output-KL probe
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def output_effects(
    decoder: Decoder,
    probe_ids: torch.Tensor,
    removed: dict[Unit, Bypass | None],
    candidates: dict[Unit, Bypass],
    *,
    device: torch.device | str | None = None,
    scored_positions: int = 256,
) -> dict[Unit, float]:
    """KL(current model || current model with one more unit bypassed), per candidate, averaged
    over the probe tokens: the damage a removal does to what the model actually outputs.

    The probe goes through the current model (the `removed` units bypassed, None = deleted) one
    layer at a time, as a walk does: each candidate's stream splits off in front of its own unit
    and then rides along, all of them through each layer in one batch. Every layer is on `device`
    once (a model larger than the device works), and each candidate costs one partial forward.
    """
    release_freed_memory()  # what the walk before it freed
    home = next(decoder.model.parameters()).device
    device = torch.device(device) if device is not None else home
    ids = probe_ids.to(device)
    for module in (decoder.body.embed_tokens, decoder.body.rotary_emb):
        module.to(device)
    hidden = decoder.embed(ids)
    rotary = decoder.rotary(hidden, torch.arange(ids.shape[1], device=device)[None])
    rows = ids.shape[0]

    def step(unit: Unit, h: torch.Tensor, replacement: Bypass | None = None) -> torch.Tensor:
        kind, layer = unit
        if replacement is None and unit in removed:
            replacement = removed[unit]
            if replacement is None:
                return h
        normed = decoder.norm(kind, layer)(h)
        return h + (replacement(normed) if replacement is not None else decoder.run_unit(kind, layer, normed, rotary))

    riders: list[Unit] = []  # candidates whose stream has split off, in the order of `stacked`
    stacked = hidden[:0]
    for layer in range(decoder.num_layers):
        decoder.layers[layer].to(device)
        for kind in UNIT_KINDS:
            unit = (kind, layer)
            if riders:  # every candidate stream so far passes this unit as the current model does
                stacked = step(unit, stacked)
            if unit in candidates:
                stacked = torch.cat([stacked, step(unit, hidden, candidates[unit])])
                riders.append(unit)
            hidden = step(unit, hidden)
        decoder.layers[layer].to(home)
        torch.clear_autocast_cache()  # bf16 weight copies made under bf16 matmuls: one layer's at a time
    for module in (decoder.body.embed_tokens, decoder.body.rotary_emb):
        module.to(home)

    # The vocabulary projection and softmax cost as much as the layers: score a strided subset of
    # at most `scored_positions` positions (all positions still serve as attention context).
    every = max(1, ids.numel() // scored_positions)
    head = [decoder.body.norm, decoder.model.lm_head]
    for module in head:
        module.to(device)

    def logits(h: torch.Tensor) -> torch.Tensor:
        return decoder.head(h[:, every - 1::every]).float()

    # KL(p || q) = sum p log p - sum p z_q + logsumexp(z_q) for q = softmax(z_q): per candidate one
    # product with the reference's probabilities and one logsumexp, no log-softmax of its own.
    reference = torch.log_softmax(logits(hidden), -1)
    probs = reference.exp()
    entropy_term = (probs * reference).sum(-1)
    effects = {}
    for unit, h in zip(riders, stacked.split(rows)):
        z = logits(h)
        kl = entropy_term - (probs * z).sum(-1) + torch.logsumexp(z, -1)
        effects[unit] = float(kl.mean())
    for module in head:
        module.to(home)
    return effects


# ---------------------------------------------------------------------------------------------
# the greedy
# ---------------------------------------------------------------------------------------------
@dataclass
class _Walk:
    """What a scoring walk leaves for the walks after it (no unit's full statistics but the
    FeedForwards', which a level finishing here takes its shared basis from)."""

    removed: frozenset[Unit]
    candidates: dict[Unit, Bypass]  # each kept unit's candidate bypass (float32)
    damage: dict[Unit, float]  # the error each candidate injects, relative to the stream (local score)
    ffn_stats: dict[Unit, UnitStats]  # every FeedForward's, on the model's own device
    bypasses: dict[Unit, Bypass]  # the bypasses of the removed units, as this walk fitted them
    checkpoints: Checkpoints


CHECKPOINT_BYTES = 512 * 2**20  # a scoring walk's residual streams kept for the next walk to resume from
MIN_CHECKPOINTS = 6  # streams kept per walk however large each is (calibration tokens x hidden x 4 bytes)


def checkpoint_every(num_layers: int, stream_bytes: int) -> int:
    """Layers between a scoring walk's checkpoints: every layer's stream where CHECKPOINT_BYTES
    hold them all, so the next walk redoes no layer in front of its first newly removed unit; else
    as many streams as fit, and at least MIN_CHECKPOINTS."""
    fitting = max(1, math.ceil(num_layers * stream_bytes / CHECKPOINT_BYTES))
    return min(fitting, math.ceil(num_layers / MIN_CHECKPOINTS))


class Selector:
    """Greedy selection by scoring walks: each walk runs the model with the removals so far
    bypassed, fits a candidate bypass to every kept unit and scores it; the most promising by local
    score are re-ranked by their output KL on the probe sequences.

    A walk starts where it differs from the walk before it in the trajectory: everything in front
    of the first newly removed unit (its stream, statistics and candidate fits) is that walk's, exactly, so
    it is resumed from the nearest checkpoint instead of recomputed."""

    def __init__(self, decoder: Decoder, groups: list[Group], sizes: dict[Group, int], ranks: dict[str, int],
                 ridge: float, scoring_ids: torch.Tensor, probe_ids: torch.Tensor, shortlist: int,
                 walk_args: dict, reuse_first_walk: bool):
        self.decoder, self.groups, self.sizes, self.ranks, self.ridge = decoder, groups, sizes, ranks, ridge
        self.scoring_ids, self.probe_ids, self.shortlist = scoring_ids, probe_ids, shortlist
        # Scoring only ranks units: its matmuls run in bf16 where that is fast, and so do each batch's
        # products of the (centred) statistics; the running statistics stay float64 and the
        # residual stream float32. The final fit forms float32 products.
        self.home = next(decoder.model.parameters()).device
        self.device = walk_args.get("device") or self.home
        products = torch.bfloat16 if hardware.fast_bf16(self.device) else torch.float32
        self.walk_args = dict(walk_args, weights=token_weights, product_dtype=products)
        self.checkpoint_every = checkpoint_every(decoder.num_layers, scoring_ids.numel() * decoder.hidden_size * 4)
        self.walks = 0
        # The first walk (nothing removed) is the same for every level: kept, with its checkpoints,
        # while several levels will start from it.
        self.reuse_first_walk = reuse_first_walk
        self.first: _Walk | None = None
        self.first_scores: dict[bool, dict[Group, float]] = {}
        self.last: _Walk | None = None

    def candidate_fit(self, kind: str, stats: UnitStats) -> LinearFit:
        return reduced_rank_fit(stats.moments(), self.ranks[kind], self.ridge)

    def _walk(self, removed: list[Unit]) -> _Walk:
        """The scoring walk with `removed` bypassed, resumed from the trajectory's last walk. Each
        unit is fitted as soon as its statistics are complete, so one layer's statistics are on the
        device at a time."""
        parent = self.last if removed else None
        new = [u for u in removed if parent is None or u not in parent.removed]
        start = parent.checkpoints.resume_layer(min(layer for _, layer in new)) if parent and new else 0
        kept = [u for g in self.groups for u in g if g[0] not in removed]
        bypassed = set(removed)
        before = (lambda table: {u: v for u, v in table.items() if u[1] < start}) if parent else (lambda table: {})
        current = _Walk(frozenset(removed), candidates=before(parent.candidates) if parent else {},
                        damage=before(parent.damage) if parent else {},
                        ffn_stats=before(parent.ffn_stats) if parent else {},
                        bypasses=before(parent.bypasses) if parent else {}, checkpoints=Checkpoints(self.checkpoint_every))
        if parent is not None and parent is not self.first:  # what of the parent is made anew: free it first
            parent.checkpoints.streams = {k: v for k, v in parent.checkpoints.streams.items() if k <= start}
            parent.ffn_stats = before(parent.ffn_stats)

        def fit_removed(kind: str, layer: int, stats: UnitStats) -> Bypass:
            current.bypasses[(kind, layer)] = as_bypass(self.candidate_fit(kind, stats))
            return current.bypasses[(kind, layer)]

        def unit_done(unit: Unit, stats: UnitStats) -> None:
            if unit not in bypassed:
                fit = self.candidate_fit(unit[0], stats)
                current.candidates[unit] = as_bypass(fit)
                current.damage[unit] = stats.relative_error(fit.error)
            if unit[0] == "ffn":
                current.ffn_stats[unit] = stats.to(self.home)

        self.walks += 1
        walk(self.decoder, self.scoring_ids, actions={u: "bypass" for u in removed}, fit=fit_removed,
             collect=[u for u in kept if u[1] >= start], desc=f"scoring walk {self.walks}",
             resume=parent.checkpoints if parent else None, start_layer=start, record=current.checkpoints,
             done=unit_done, **self.walk_args)
        return current

    def score(self, removed: list[Unit], every_group: bool) -> dict[Group, float]:
        """One walk with `removed` bypassed: the damage score of every kept group (of the shortlist,
        unless `every_group`); the walk itself is `self.last` after it. The first walk (nothing
        removed) is the same for every level and is made once when several levels share it."""
        if not removed and self.first is not None and every_group in self.first_scores:
            self.last = self.first
            return self.first_scores[every_group]
        with hardware.bf16_matmuls(self.device):
            return self._score(removed, every_group)

    def _score(self, removed: list[Unit], every_group: bool) -> dict[Group, float]:
        current = self.first if not removed and self.first is not None else self._walk(removed)
        kept = [g for g in self.groups if g[0] not in removed]
        local = {g: sum(current.damage[u] for u in g) / self.sizes[g] for g in kept}
        # Only the most promising groups by local score pay for forward passes, unless every
        # group must be scored alike (a contiguous run).
        if not every_group:
            kept = sorted(kept, key=local.__getitem__)[:max(1, self.shortlist // len(kept[0]))]
        unit_scores = output_effects(self.decoder, self.probe_ids, current.bypasses,
                                     {u: current.candidates[u] for g in kept for u in g}, device=self.device)
        scores = {g: sum(unit_scores[u] for u in g) for g in kept}
        if not removed and self.reuse_first_walk:
            self.first = current
            self.first_scores[every_group] = scores
        self.last = current
        return scores

    def ffn_basis(self, removed: list[Unit]) -> torch.Tensor | None:
        """The input basis [d, rank] the removed FeedForwards' bypasses share, from the last walk's
        statistics of them (None when no FeedForward is removed). Taken when a level finishes, so
        a level keeps 1 MB-sized bases rather than the ~5 MB statistics of each removed unit."""
        units = [u for u in removed if u[0] == "ffn"]
        if not units:
            return None
        return shared_basis([self.last.ffn_stats[u].moments() for u in units], self.ranks["ffn"], self.ridge)

    def trajectory(self, quotas: list[int], step: int) -> dict[int, tuple[list[Unit], torch.Tensor | None]]:
        """One greedy trajectory serving every quota (parameters to remove): each walk commits the
        safest groups by damage per parameter until `step` more parameters are removed. A quota
        finishes at the walk where it would be reached (or passed by the walk's commit): that walk's
        best mix for the room left (`greedy_select`) completes it. The trajectory does not depend on
        the quotas, so several levels share its walks and each is what it would be alone.

        Returns, per quota, the removed units and their FeedForwards' shared basis (`ffn_basis`)."""
        removed: list[Unit] = []
        used, mark, done = 0, 0, {}
        open_quotas = sorted(q for q in set(quotas) if q > 0)
        done.update({q: ([], None) for q in quotas if q <= 0})
        while open_quotas:
            mark += step
            scores = self.score(removed, every_group=False)
            commit = []
            for group in sorted(scores, key=lambda g: (scores[g] / self.sizes[g], g)):
                if used + sum(self.sizes[g] for g in commit) >= mark:
                    break
                commit.append(group)
            after = used + sum(self.sizes[g] for g in commit)
            for quota in [q for q in open_quotas if q <= mark or after > q]:
                finished = removed + [u for g in greedy_select(scores, self.sizes, quota - used) for u in g]
                done[quota] = finished, self.ffn_basis(finished)
                open_quotas.remove(quota)
            removed += [u for g in commit for u in g]
            used = after
        return done

    def window(self, quota: int) -> tuple[list[Unit], torch.Tensor | None]:
        """The contiguous ablation: the best run of groups under `quota`, scored in one walk."""
        scores = self.score([], every_group=True)
        order = [g for g in self.groups if g in scores]
        removed = [u for g in best_window(order, scores, self.sizes, quota) for u in g]
        return removed, self.ffn_basis(removed)
