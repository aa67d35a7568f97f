"""Orchestration only: model -> calibration -> statistics -> selection and fitting -> Plan."""
from __future__ import annotations

import math
import os
from typing import Sequence

import torch

from subfit import calibration, models
from subfit.evaluation import mean_token_loss
from subfit.fitting import LinearFit, fit_in_basis, reduced_rank_fit, shared_basis
from subfit.models import UNIT_KINDS, Decoder
from subfit.plan import FFN_BASIS, Bypass, Plan
from subfit.reference import ReferenceModel
from subfit.selection import SCORES, Group, best_window, greedy_select, group_sizes
from subfit.stats import TARGETS, Unit, output_effects, walk

MAX_SPARSITY = 0.75
STEP = 1 / 32  # sparsity committed per scoring walk (4 walks at 12.5%, 8 at 25%, 12 at 37.5%)
VALIDATION_SAMPLES = 16  # calibration sequences held out to choose between selection draws
CALIB_SAMPLES = 256 + VALIDATION_SAMPLES  # the default: 256 to fit on, 16 to choose between draws


def default_ranks(hidden_size: int) -> tuple[int, int]:
    """Attention hidden/8, FeedForward hidden/2 (multiples of 8): bypasses stay ~10% of what
    they replace on Llama-shaped models."""
    return max(8, 8 * round(hidden_size / 64)), max(8, 8 * round(hidden_size / 16))


GRANULARITIES = ("unit", "layer")
PROBES = ("held-out", "in-sample")


def _check_args(levels: Sequence[float], step: float, ridge: float, score: str, granularity: str, probe: str,
                bypass_target: str, selection_draws: int) -> None:
    if not levels:
        raise ValueError("Give at least one sparsity level.")
    for sparsity in levels:
        if not isinstance(sparsity, (int, float)) or math.isnan(sparsity) or not 0.0 <= sparsity <= MAX_SPARSITY:
            raise ValueError(f"sparsity={sparsity!r} is out of range: give a fraction of transformer-block "
                             f"parameters between 0 and {MAX_SPARSITY} (e.g. 0.125, 0.25, 0.375).")
    if not 0 < step <= MAX_SPARSITY:
        raise ValueError(f"step={step} must be in (0, {MAX_SPARSITY}]: the sparsity committed per scoring walk.")
    if ridge <= 0:
        raise ValueError(f"ridge={ridge} must be positive (e.g. 1e-3): it keeps every solve well conditioned.")
    if score not in SCORES:
        raise ValueError(f"Unknown score {score!r}; choose one of {sorted(SCORES)}.")
    if granularity not in GRANULARITIES:
        raise ValueError(f"Unknown granularity {granularity!r}; choose one of {GRANULARITIES}.")
    if probe not in PROBES:
        raise ValueError(f"Unknown probe {probe!r}; choose one of {PROBES}.")
    if bypass_target not in TARGETS:
        raise ValueError(f"Unknown bypass_target {bypass_target!r}; choose one of {TARGETS}.")
    if isinstance(selection_draws, bool) or not isinstance(selection_draws, int) or selection_draws < 1:
        raise ValueError(f"selection_draws={selection_draws!r} must be a whole number >= 1 (1: one greedy selection).")


def scoring_and_probe_ids(calib_ids: torch.Tensor, score_samples: int, probe_samples: int,
                          probe: str = "held-out") -> tuple[torch.Tensor, torch.Tensor]:
    """The scoring walk's sequences and the output-KL probe's.

    Held-out probes are calibration sequences the scoring walk never fits a candidate bypass on.
    Probed on its own fit sequences a bypass looks about 30% less harmful (first walk on
    SmolLM2-135M), so the greedy trusts its most overfitted bypasses; held-out, the KL is unbiased.
    Short calibration gives up scoring sequences so that the probe stays held out.
    """
    n = calib_ids.shape[0]
    if probe == "in-sample" or n < 2:
        scoring = calib_ids[:max(1, score_samples)]
        return scoring, scoring[:probe_samples]
    held_out = min(probe_samples, n - 1)
    scoring = calib_ids[:max(1, min(score_samples, n - held_out))]
    return scoring, calib_ids[scoring.shape[0]:scoring.shape[0] + held_out]


def validation_split(calib_ids: torch.Tensor, draws: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The sequences bypasses are fitted on and those held out to choose between selection draws.

    One draw needs no choice and fits on every sequence. Several draws set aside
    `VALIDATION_SAMPLES` sequences, a seeded random subset (a drawn file's windows are in file
    order), which no scoring walk, probe or fit sees, so the choice is not biased towards the
    plan whose bypasses overfit most."""
    if draws == 1:
        return calib_ids, calib_ids[:0]
    n = calib_ids.shape[0]
    if n < VALIDATION_SAMPLES + 2:
        raise ValueError(f"selection_draws={draws} holds out {VALIDATION_SAMPLES} calibration sequences to choose "
                         f"between draws and needs at least 2 more to fit on, but there are {n}. Give more "
                         f"calibration (calib_samples / --calib-samples) or use one draw (selection_draws=1 / "
                         f"--selection-draws 1).")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    held = order[:VALIDATION_SAMPLES].sort().values
    return calib_ids[order[VALIDATION_SAMPLES:].sort().values], calib_ids[held]


def draw_order(fit_ids: torch.Tensor, draw: int, seed: int) -> torch.Tensor:
    """The sequences in the order draw `draw` takes its scoring walk and probe from (the first ones):
    draw 0 as given, so one draw is compress's plain selection; later draws a seeded shuffle."""
    if draw == 0:
        return fit_ids
    generator = torch.Generator().manual_seed(1_000_003 * seed + draw)
    return fit_ids[torch.randperm(fit_ids.shape[0], generator=generator)]


def infeasible(plan: Plan, sparsity: float, granularity: str = "unit") -> str | None:
    """Why `sparsity` cannot be reached on `plan`'s model at `granularity` (None if it can)."""
    sizes = plan.unit_params if granularity == "unit" else {"layer": sum(plan.unit_params.values())}
    smallest, quota = min(sizes.values()), int(sparsity * plan.block_params)
    if sparsity > 0 and quota < smallest:
        return (f"sparsity={sparsity} allows {quota:,} parameters, less than the smallest removable {granularity} "
                f"({smallest:,} = {smallest / plan.block_params:.4f} of block parameters). Raise the sparsity.")
    return None


def compress(model=None, sparsity: float = 0.25, calib: str | os.PathLike | torch.Tensor | None = None,
             **options) -> Plan:
    """Compress `model` (a Hugging Face model, or a hub id / folder / .gguf path; None = SmolLM2)
    to `sparsity` and return the plan. `calib` and `options` are those of `compress_levels`."""
    return compress_levels(model, [sparsity], calib, **options)[0]


def compress_levels(
    model=None,
    levels: Sequence[float] = (0.25,),
    calib: str | os.PathLike | torch.Tensor | None = None,
    *,
    tokenizer=None,
    calib_samples: int = CALIB_SAMPLES,
    calib_len: int = 512,
    seed: int = 0,
    attn_rank: int | None = None,
    ffn_rank: int | None = None,
    ridge: float = 1e-3,
    score: str = "output-kl",
    step: float = STEP,
    score_samples: int = 64,
    probe_samples: int = 2,
    probe: str = "held-out",
    shortlist: int = 24,
    selection_draws: int = 3,
    bypass_target: str = "run",
    granularity: str = "unit",
    contiguous: bool = False,
    bypass: bool = True,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> list[Plan]:
    """One plan per sparsity level (in the order given), each exactly what `compress` makes at
    that level; the first scoring walk, the same for all, is made once.

    `calib` is a token tensor [N, L], a text file, `hf:ID[:CONFIG[:SPLIT]]`, or None to sample
    text from the model itself. Units are chosen greedily: each scoring walk on `score_samples`
    sequences re-scores every kept unit with the removals so far in place and commits about `step`
    more sparsity, the safest part of its plan for the level (with the `output-kl` score, the
    `shortlist` best units by local score are re-ranked by their effect on the output of
    `probe_samples` sequences, by default held out from the scoring walk: see
    `scoring_and_probe_ids`); a final walk over all sequences fits the bypasses sequentially, by
    default (`bypass_target="run"`) each run of adjacent bypasses to the block it replaces, or with
    `bypass_target="unit"` each bypass to its own unit's output (see `stats.walk`; the selection is
    the same either way). Ablations: `granularity="layer"` removes whole
    layers, `contiguous=True` one contiguous run of units, `bypass=False` deletes the chosen units.

    `selection_draws` K > 1 runs the whole selection and fit K times, each draw scoring and probing
    on other calibration sequences (`draw_order`), and keeps per level the plan with the least
    next-token loss on `VALIDATION_SAMPLES` sequences held out from all of them
    (`validation_split`). At low sparsity the greedy commits few walks, so which sequences it
    scores on can decide the plan. The default, 3 draws on 256 + 16 sequences with 64 scored, put
    SubFit at or below ReplaceMe-LS at 12.5% on SmolLM2 at three calibration seeds, where one draw
    on 128 lost (`bench/results/refit_125_smollm2.md`); it costs about 3x one draw's selection and
    fit (`selection_draws=1` for one).
    """
    levels = list(levels)
    _check_args(levels, step, ridge, score, granularity, probe, bypass_target, selection_draws)
    if model is None or isinstance(model, (str, os.PathLike)):
        model, tokenizer, _ = models.load(model)
    decoder = Decoder(model)
    source = models.source_of(model)
    if isinstance(calib, torch.Tensor):
        calib_ids, calib_info = calib.long(), {"source": "tensor", "samples": calib.shape[0], "length": calib.shape[1]}
    else:
        if tokenizer is None:
            raise ValueError("A tokenizer is needed to build calibration data from text; pass tokenizer= "
                             "or a token tensor as calib.")
        calib_ids = calibration.load_calibration(None if calib is None else str(calib), model, tokenizer,
                                                 calib_samples, calib_len, seed)
        calib_info = calibration.describe(None if calib is None else str(calib), calib_ids, seed)

    default_attn, default_ffn = default_ranks(decoder.hidden_size)
    ranks = {"attn": attn_rank or default_attn, "ffn": ffn_rank or default_ffn}
    empty = Plan.empty(decoder, source)
    if granularity == "layer":
        groups = [tuple((k, i) for k in UNIT_KINDS) for i in range(decoder.num_layers)]
    else:
        groups = [((k, i),) for i in range(decoder.num_layers) for k in UNIT_KINDS]
    sizes = group_sizes(groups, empty.unit_params)
    quotas = [int(s * empty.block_params) for s in levels]
    for sparsity in levels:
        problem = infeasible(empty, sparsity, granularity)
        if problem:
            raise ValueError(problem)
    fit_ids, validation_ids = validation_split(calib_ids, selection_draws, seed)
    home = next(model.parameters()).device
    chosen: list[tuple[float, Plan] | None] = [None] * len(levels)
    validation_losses: list[list[float]] = [[] for _ in levels]
    for draw in range(selection_draws):
        scoring_ids, probe_ids = scoring_and_probe_ids(draw_order(fit_ids, draw, seed), score_samples, probe_samples,
                                                       probe)
        selector = _Selector(decoder, groups, sizes, ranks, ridge, SCORES[score], scoring_ids, probe_ids, shortlist,
                             dict(batch_size=batch_size, device=device, progress=progress), len(levels) > 1)
        for i, (sparsity, quota) in enumerate(zip(levels, quotas)):
            if contiguous:
                removed, basis_stats = selector.window(quota)
            else:
                removed, basis_stats = selector.trajectory(quota, int(step * empty.block_params))
            options = {"name": "subfit", "sparsity": sparsity, "score": score, "granularity": granularity,
                       "contiguous": contiguous, "bypass": bypass, "step": step,
                       "score_samples": scoring_ids.shape[0], "probe": probe, "probe_samples": probe_ids.shape[0],
                       "selection_draws": selection_draws, "calibration": calib_info}
            plan = Plan.empty(decoder, source)
            if not bypass:
                for kind, layer in removed:
                    plan.actions(kind)[layer] = "delete"
            elif removed:
                errors = _fit_bypasses(plan, decoder, fit_ids, removed, basis_stats, ranks, ridge,
                                       dict(weighting=SCORES[score].weighting, target=bypass_target,
                                            batch_size=batch_size, device=device, progress=progress))
                options.update(attn_rank=ranks["attn"], ffn_rank=ranks["ffn"], ridge=ridge,
                               bypass_target=bypass_target, bypass_errors=errors)
            plan.method = options
            plan.validate()
            loss = 0.0
            if selection_draws > 1:  # one sequence at a time: a batch's logits outgrow the walks' memory
                loss = mean_token_loss(ReferenceModel(model, plan, check_base=False), validation_ids.to(home), 1)
                validation_losses[i].append(loss)
            if chosen[i] is None or loss < chosen[i][0]:
                chosen[i] = (loss, plan)
        del selector  # a walk's statistics are large: one draw's at a time
    plans = [plan for _, plan in chosen]
    if selection_draws > 1:
        for plan, losses in zip(plans, validation_losses):
            plan.method["selection"] = {"draw": losses.index(min(losses)), "validation_loss": losses,
                                        "validation_samples": validation_ids.shape[0]}
    return plans


def _as_bypass(fit: LinearFit) -> Bypass:
    return Bypass(fit.down.float(), fit.up.float(), fit.bias.float())


class _Selector:
    """Greedy selection by scoring walks: the state of one trajectory (units removed so far and
    the bypasses they were fitted with in the last walk)."""

    def __init__(self, decoder: Decoder, groups: list[Group], sizes: dict[Group, int], ranks: dict[str, int],
                 ridge: float, scorer, scoring_ids: torch.Tensor, probe_ids: torch.Tensor, shortlist: int,
                 walk_args: dict, reuse_first_walk: bool):
        self.decoder, self.groups, self.sizes, self.ranks, self.ridge = decoder, groups, sizes, ranks, ridge
        self.scorer, self.scoring_ids, self.probe_ids, self.shortlist = scorer, scoring_ids, probe_ids, shortlist
        self.walk_args = dict(walk_args, weighting=scorer.weighting)
        self.walks = 0
        # A walk's statistics are two float64 d x d matrices per unit (2 GB on Llama-3.2-1B, 17 GB
        # on a 32-layer 7B model): the first walk is cached only when several levels will reuse it.
        self.reuse_first_walk = reuse_first_walk
        self.first_walk: dict[bool, tuple[dict[Group, float], dict]] = {}

    def candidate_fit(self, kind: str, layer: int, stats) -> LinearFit:
        return reduced_rank_fit(stats.moments(), self.ranks[kind], self.ridge)

    def score(self, removed: list[Unit], every_group: bool) -> tuple[dict[Group, float], dict]:
        """One walk with `removed` bypassed: the damage score of every kept group, and the walk's
        statistics (of kept and removed units alike). The first walk (nothing removed) is the
        same for every level and is made once when several levels share it."""
        if not removed and every_group in self.first_walk:
            return self.first_walk[every_group]
        self.walks += 1
        bypasses: dict[Unit, Bypass] = {}
        kept = [g for g in self.groups if g[0] not in removed]

        def fit_removed(kind: str, layer: int, stats) -> Bypass:
            bypasses[(kind, layer)] = _as_bypass(self.candidate_fit(kind, layer, stats))
            return bypasses[(kind, layer)]

        stats = walk(self.decoder, self.scoring_ids, actions={u: "bypass" for u in removed}, fit=fit_removed,
                     collect=[u for g in kept for u in g], desc=f"scoring walk {self.walks}", **self.walk_args)
        fits = {u: self.candidate_fit(*u, stats[u]) for g in kept for u in g}
        unit_scores = {u: stats[u].relative_error(f.error) for u, f in fits.items()}
        if self.scorer.output_effect:
            # Only the most promising groups by local score pay for forward passes, unless every
            # group must be scored alike (a contiguous run).
            if not every_group:
                local = {g: sum(unit_scores[u] for u in g) / self.sizes[g] for g in kept}
                kept = sorted(kept, key=local.__getitem__)[:max(1, self.shortlist // len(kept[0]))]
            unit_scores = output_effects(self.decoder, self.probe_ids, bypasses,
                                         {u: _as_bypass(fits[u]) for g in kept for u in g})
        result = {g: sum(unit_scores[u] for u in g) for g in kept}, stats
        if not removed and self.reuse_first_walk:
            self.first_walk[every_group] = result
        return result

    def trajectory(self, quota: int, step: int) -> tuple[list[Unit], dict]:
        """Greedy removal up to `quota` parameters: each walk plans the room left (the mix of
        groups that fills it best at the least damage) and commits the safest part of that plan,
        by damage per parameter, until `step` more parameters are removed; the last walk commits
        all of it. Returns the removed units and the last walk's statistics of the removed
        FeedForwards (that walk saw every one of them), for their shared basis."""
        removed: list[Unit] = []
        used, stats = 0, {}
        for mark in [k * step for k in range(1, math.ceil(quota / step))] + [quota] if quota else []:
            stats = {}  # free the last walk's statistics before the next walk gathers its own
            scores, stats = self.score(removed, every_group=False)
            planned = greedy_select(scores, self.sizes, quota - used)
            for group in sorted(planned, key=lambda g: scores[g] / self.sizes[g]):
                if used >= mark:
                    break
                removed += group
                used += self.sizes[group]
        return removed, _basis_stats(stats, removed)

    def window(self, quota: int) -> tuple[list[Unit], dict]:
        """The contiguous ablation: the best run of groups under `quota`, scored in one walk."""
        scores, stats = self.score([], every_group=True)
        order = [g for g in self.groups if g in scores]
        removed = [u for g in best_window(order, scores, self.sizes, quota) for u in g]
        return removed, _basis_stats(stats, removed)


def _basis_stats(stats: dict, removed: list[Unit]) -> dict:
    """The statistics the final fit still needs: the removed FeedForwards', for their shared basis."""
    return {u: stats[u] for u in removed if u[0] == "ffn"}


def _fit_bypasses(plan: Plan, decoder: Decoder, calib_ids: torch.Tensor, removed: list[Unit], basis_stats: dict,
                  ranks: dict[str, int], ridge: float, walk_args: dict) -> dict[str, float]:
    """One walk over all calibration sequences fitting every bypass on the inputs the compressed
    earlier layers give it; the FeedForward bypasses share one input basis, taken from the last
    scoring walk's statistics of the removed FeedForward units. Returns each bypass's relative error."""
    ffn_units = [u for u in removed if u[0] == "ffn"]
    basis = shared_basis([basis_stats[u].moments() for u in ffn_units], ranks["ffn"], ridge) if ffn_units else None
    fits: dict[Unit, LinearFit] = {}

    def final_fit(kind: str, layer: int, stats) -> Bypass:
        m = stats.moments()
        fits[(kind, layer)] = reduced_rank_fit(m, ranks["attn"], ridge) if kind == "attn" else fit_in_basis(m, basis, ridge)
        return _as_bypass(fits[(kind, layer)])

    final_stats = walk(decoder, calib_ids, actions={u: "bypass" for u in removed}, fit=final_fit,
                       desc="fitting bypasses", **walk_args)
    for (kind, layer), fit in sorted(fits.items(), key=lambda item: (item[0][1], item[0][0])):
        plan.actions(kind)[layer] = "bypass"
        if kind == "attn":
            plan.tensors[f"attn.{layer}.down"] = fit.down.float().contiguous()
        plan.tensors[f"{kind}.{layer}.up"] = fit.up.float().contiguous()
        plan.tensors[f"{kind}.{layer}.bias"] = fit.bias.float().contiguous()
    if basis is not None:
        plan.tensors[FFN_BASIS] = basis.float().contiguous()
    return {f"{k}.{i}": final_stats[(k, i)].relative_error(f.error) for (k, i), f in fits.items()}
