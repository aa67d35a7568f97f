"""Orchestration only: model -> calibration -> statistics -> selection and fitting -> Plan."""
from __future__ import annotations

import math
import os

import torch

from subfit import calibration, models
from subfit.fitting import LinearFit, fit_in_basis, reduced_rank_fit, shared_basis
from subfit.models import UNIT_KINDS, Decoder
from subfit.plan import FFN_BASIS, Bypass, Plan
from subfit.selection import SCORES, best_window, greedy_select, group_sizes
from subfit.stats import Unit, output_effects, walk

MAX_SPARSITY = 0.75


def default_ranks(hidden_size: int) -> tuple[int, int]:
    """Attention hidden/8, FeedForward hidden/2 (multiples of 8): bypasses stay ~10% of what
    they replace on Llama-shaped models."""
    return max(8, 8 * round(hidden_size / 64)), max(8, 8 * round(hidden_size / 16))


GRANULARITIES = ("unit", "layer")


def _check_args(sparsity: float, rounds: int, ridge: float, score: str, granularity: str) -> None:
    if not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity <= MAX_SPARSITY or math.isnan(sparsity):
        raise ValueError(f"sparsity={sparsity!r} is out of range: give a fraction of transformer-block parameters "
                         f"between 0 and {MAX_SPARSITY} (e.g. 0.125, 0.25, 0.375).")
    if rounds < 1:
        raise ValueError(f"rounds={rounds} must be at least 1.")
    if ridge <= 0:
        raise ValueError(f"ridge={ridge} must be positive (e.g. 1e-3): it keeps every solve well conditioned.")
    if score not in SCORES:
        raise ValueError(f"Unknown score {score!r}; choose one of {sorted(SCORES)}.")
    if granularity not in GRANULARITIES:
        raise ValueError(f"Unknown granularity {granularity!r}; choose one of {GRANULARITIES}.")


def compress(
    model=None,
    sparsity: float = 0.25,
    calib: str | os.PathLike | torch.Tensor | None = None,
    *,
    tokenizer=None,
    calib_samples: int = 128,
    calib_len: int = 512,
    seed: int = 0,
    attn_rank: int | None = None,
    ffn_rank: int | None = None,
    ridge: float = 1e-3,
    score: str = "output-kl",
    rounds: int = 4,
    score_samples: int = 32,
    probe_samples: int = 2,
    shortlist: int = 24,
    granularity: str = "unit",
    contiguous: bool = False,
    bypass: bool = True,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> Plan:
    """Compress `model` (a Hugging Face model, or a hub id / folder / .gguf path; None = SmolLM2)
    to `sparsity` and return the plan.

    `calib` is a token tensor [N, L], a text file, `hf:ID[:CONFIG[:SPLIT]]`, or None to sample
    text from the model itself. Units are chosen greedily over `rounds` walks on `score_samples`
    of the sequences, each walk re-scoring with the removals so far in place (with the
    `output-kl` score, the `shortlist` best units by local score are re-ranked by their effect on
    the output of `probe_samples` sequences); a final walk over all sequences fits every bypass
    sequentially. Ablations: `granularity="layer"` removes whole layers, `contiguous=True` one
    contiguous run of units, `bypass=False` deletes the chosen units instead of fitting bypasses.
    """
    _check_args(sparsity, rounds, ridge, score, granularity)
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
    attn_rank, ffn_rank = attn_rank or default_attn, ffn_rank or default_ffn
    plan = Plan.empty(decoder, source)
    unit_params = plan.unit_params
    if granularity == "layer":
        groups = [tuple((k, i) for k in UNIT_KINDS) for i in range(decoder.num_layers)]
    else:
        groups = [((k, i),) for i in range(decoder.num_layers) for k in UNIT_KINDS]
    sizes = group_sizes(groups, unit_params)
    quota = int(sparsity * plan.block_params)
    smallest = min(sizes.values())
    if sparsity > 0 and quota < smallest:
        raise ValueError(f"sparsity={sparsity} allows {quota:,} parameters, less than the smallest removable "
                         f"{granularity} ({smallest:,} = {smallest / plan.block_params:.4f} of block parameters). "
                         "Raise the sparsity.")
    scorer = SCORES[score]
    walk_args = dict(weighting=scorer.weighting, batch_size=batch_size, device=device, progress=progress)
    ranks = {"attn": attn_rank, "ffn": ffn_rank}

    def candidate_fit(kind: str, layer: int, stats) -> LinearFit:
        return reduced_rank_fit(stats.moments(), ranks[kind], ridge)

    def as_bypass(fit: LinearFit) -> Bypass:
        return Bypass(fit.down.float(), fit.up.float(), fit.bias.float())

    # Greedy selection: each round re-scores every kept unit with the removals so far in place.
    # A contiguous run cannot be grown round by round, so it is chosen in one round.
    rounds = 1 if contiguous else rounds
    removed: list[Unit] = []
    removed_bypasses: dict[Unit, Bypass] = {}
    scoring_ids = calib_ids[: max(1, min(score_samples, calib_ids.shape[0]))]
    selection_stats: dict = {}
    for round_index in range(1, rounds + 1 if sparsity > 0 else 1):
        kept = [g for g in groups if g[0] not in removed]
        selection_stats.clear()  # free the last walk's statistics before the next one

        def fit_removed(kind: str, layer: int, stats) -> Bypass:
            removed_bypasses[(kind, layer)] = as_bypass(candidate_fit(kind, layer, stats))
            return removed_bypasses[(kind, layer)]

        selection_stats |= walk(
            decoder, scoring_ids, actions={u: "bypass" for u in removed}, fit=fit_removed,
            collect=[u for g in kept for u in g], desc=f"scoring round {round_index}/{rounds}", **walk_args,
        )
        fits = {u: candidate_fit(*u, selection_stats[u]) for g in kept for u in g}
        unit_scores = {u: selection_stats[u].relative_error(f.error) for u, f in fits.items()}
        if scorer.output_effect:
            # Only the most promising groups by local score pay for forward passes; a contiguous
            # run needs every group scored alike.
            if not contiguous:
                local = {g: sum(unit_scores[u] for u in g) / sizes[g] for g in kept}
                kept = sorted(kept, key=local.__getitem__)[:shortlist]
            unit_scores = output_effects(decoder, scoring_ids[:probe_samples], removed_bypasses,
                                         {u: as_bypass(fits[u]) for g in kept for u in g})
        scores = {g: sum(unit_scores[u] for u in g) for g in kept}
        used = sum(unit_params[k] for k, _ in removed)
        if contiguous:
            order = [g for g in groups if g in scores]
            planned = best_window(order, scores, sizes, quota - used)
        else:
            planned = greedy_select(scores, sizes, quota - used)
        # Plan the whole remaining budget with this round's scores, commit this round's share of
        # it (safest first); later rounds re-score what is left with these removals in place.
        share = quota * round_index / rounds
        for group in sorted(planned, key=lambda g: scores[g] / sizes[g]):
            if used >= share and round_index < rounds:
                break
            removed += group
            used += sizes[group]

    if not bypass:
        for kind, layer in removed:
            plan.actions(kind)[layer] = "delete"
        plan.method = {"name": "subfit", "sparsity": sparsity, "score": score, "bypass": False,
                       "granularity": granularity, "contiguous": contiguous, "rounds": rounds,
                       "calibration": calib_info}
        plan.validate()
        return plan

    # The shared FeedForward basis comes from the last scoring walk, which saw every chosen FFN.
    ffn_units = [u for u in removed if u[0] == "ffn"]
    basis = None
    if ffn_units:
        basis = shared_basis([selection_stats[u].moments() for u in ffn_units], ffn_rank, ridge)
    selection_stats.clear()
    fits: dict[Unit, LinearFit] = {}

    def final_fit(kind: str, layer: int, stats) -> Bypass:
        m = stats.moments()
        fits[(kind, layer)] = reduced_rank_fit(m, attn_rank, ridge) if kind == "attn" else fit_in_basis(m, basis, ridge)
        return as_bypass(fits[(kind, layer)])

    final_stats = walk(decoder, calib_ids, actions={u: "bypass" for u in removed}, fit=final_fit,
                       desc="fitting bypasses", **walk_args) if removed else {}

    for (kind, layer), fit in sorted(fits.items(), key=lambda item: (item[0][1], item[0][0])):
        plan.actions(kind)[layer] = "bypass"
        if kind == "attn":
            plan.tensors[f"attn.{layer}.down"] = fit.down.float().contiguous()
        plan.tensors[f"{kind}.{layer}.up"] = fit.up.float().contiguous()
        plan.tensors[f"{kind}.{layer}.bias"] = fit.bias.float().contiguous()
    if basis is not None:
        plan.tensors[FFN_BASIS] = basis.float().contiguous()
    plan.method = {
        "name": "subfit",
        "sparsity": sparsity,
        "score": score,
        "granularity": granularity,
        "contiguous": contiguous,
        "bypass": True,
        "attn_rank": attn_rank,
        "ffn_rank": ffn_rank,
        "ridge": ridge,
        "rounds": rounds,
        "score_samples": scoring_ids.shape[0],
        "calibration": calib_info,
        "bypass_errors": {f"{k}.{i}": final_stats[(k, i)].relative_error(f.error) for (k, i), f in fits.items()},
    }
    plan.validate()
    return plan
