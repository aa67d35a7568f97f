"""Orchestration only: model -> calibration -> statistics -> selection and fitting -> Plan."""
from __future__ import annotations

import math
import os
from typing import Sequence

import torch

from subfit import calibration, models
from subfit.config import DevOptions, SubFitConfig, check_sparsity
from subfit.evaluation import mean_token_loss
from subfit.fitting import LinearFit, fit_in_basis, reduced_rank_fit
from subfit.hardware import bf16_matmuls
from subfit.memory import heap_kept_during_compress
from subfit.models import Decoder
from subfit.plan import Bypass, Plan
from subfit.reference import ReferenceModel
from subfit.selection import (Selector, as_bypass, checkpoint_every, draw_order, group_sizes, infeasible,
                              scoring_and_probe_ids, token_weights, unit_groups, validation_split)
from subfit.stats import Unit, UnitStats, walk

Calibration = str | os.PathLike | torch.Tensor | None


def compress(model=None, sparsity: float = 0.25, calib: Calibration = None, *, tokenizer=None,
             config: SubFitConfig | None = None, dev: DevOptions | None = None, progress: bool = True) -> Plan:
    """Compress `model` (a Hugging Face model, or a hub id / folder / .gguf path; None = the
    embedded SmolLM2) to `sparsity` of its transformer-block parameters and return the plan.

    `calib` is a token tensor [N, L], a text file, `hf:ID[:CONFIG[:SPLIT]]`, or None to sample
    text from the model itself (`tokenizer` is needed for text). `config` holds the settings a
    user tunes (`SubFitConfig`); `dev` the method's ablations and development settings.
    """
    return compress_levels(model, [sparsity], calib, tokenizer=tokenizer, config=config, dev=dev,
                           progress=progress)[0]


@heap_kept_during_compress()  # freed blocks reused, not faulted in afresh (subfit/memory.py)
def compress_levels(model=None, levels: Sequence[float] = (0.25,), calib: Calibration = None, *, tokenizer=None,
                    config: SubFitConfig | None = None, dev: DevOptions | None = None,
                    progress: bool = True) -> list[Plan]:
    """One plan per sparsity level (in the order given), each exactly what `compress` makes at
    that level; the first scoring walk, the same for all levels, is made once.

    Units are chosen greedily (`selection.Selector.trajectory`): each scoring walk re-scores every
    kept unit with the removals so far bypassed and commits `dev.step` more sparsity, the safest
    units per parameter; a level finishes at the walk that reaches it, with that walk's best mix
    for the room left. One trajectory serves every level. A final walk over all sequences then
    fits each level's bypasses sequentially, each run of adjacent bypasses to the block it
    replaces (`stats.walk`, target "run").

    With `config.selection_draws` K > 1 the selection and fit run K times, each draw scoring and
    probing on other calibration sequences (`selection.draw_order`), and per level the plan with
    the least next-token loss on sequences held out from all of them is kept: at low sparsity the
    greedy commits few walks, so which sequences it scores on can decide the plan (docs/method.md).
    """
    config = config or SubFitConfig()
    dev = dev or DevOptions()
    levels = [check_sparsity(s) for s in levels]
    if not levels:
        raise ValueError("Give at least one sparsity level.")
    if dev.draw is not None and dev.draw >= config.selection_draws:
        raise ValueError(f"draw={dev.draw}: with selection_draws={config.selection_draws} the draws are "
                         f"0 to {config.selection_draws - 1}.")
    draws = range(config.selection_draws) if dev.draw is None else [dev.draw]
    if model is None or isinstance(model, (str, os.PathLike)):
        model, tokenizer, _ = models.load(model)
    decoder = Decoder(model)
    source = models.source_of(model)
    empty = Plan.empty(decoder, source)
    for sparsity in levels:
        problem = infeasible(empty, sparsity, dev.granularity)
        if problem:
            raise ValueError(problem)
    if not any(levels):  # nothing to remove: no calibration, no walks
        return [Plan.empty(decoder, source) for _ in levels]
    calib_ids, calib_info = _calibration(calib, model, tokenizer, config)

    ranks = config.ranks(decoder.hidden_size)
    groups = unit_groups(decoder.num_layers, dev.granularity)
    sizes = group_sizes(groups, empty.unit_params)
    quotas = [int(s * empty.block_params) for s in levels]
    walk_args = dict(batch_size=dev.batch_size, device=config.device, progress=progress)
    fit_ids, validation_ids = validation_split(calib_ids, config.selection_draws, config.seed)
    home = next(model.parameters()).device
    chosen: list[tuple[float, Plan] | None] = [None] * len(levels)  # per level: (held-out loss, plan)
    losses: list[list[float]] = [[] for _ in levels]
    for draw in draws:
        scoring_ids, probe_ids = scoring_and_probe_ids(draw_order(fit_ids, draw, config.seed),
                                                       dev.scoring_sequences(fit_ids.shape[0]), dev.probe_samples)
        selector = Selector(decoder, groups, sizes, ranks, config.ridge, scoring_ids, probe_ids, dev.shortlist,
                            walk_args, reuse_first_walk=dev.contiguous and len(levels) > 1)
        if dev.contiguous:
            selected = {q: selector.window(q) for q in quotas}
        else:
            selected = selector.trajectory(quotas, int(dev.step * empty.block_params))
        del selector  # a walk's statistics and checkpoints are large: one draw's at a time
        for i, (sparsity, quota) in enumerate(zip(levels, quotas)):
            removed, basis = selected[quota]
            plan = Plan.empty(decoder, source)
            plan.method = {"name": "subfit", "sparsity": sparsity, "config": config.record(),
                           "options": dev.record(), "calibration": calib_info}
            if not dev.bypass:
                for kind, layer in removed:
                    plan.actions(kind)[layer] = "delete"
            elif removed:
                plan.method["bypass_errors"] = _fit_bypasses(plan, decoder, fit_ids, removed, basis, ranks,
                                                             config.ridge, walk_args)
            plan.validate()
            loss = 0.0
            if config.selection_draws > 1:  # one sequence at a time: a batch's logits outgrow the walks' memory
                with bf16_matmuls(home):  # as the walks run; moves a loss by ~1e-3 nats (docs/method.md, 5)
                    loss = mean_token_loss(ReferenceModel(model, plan, check_base=False), validation_ids.to(home), 1)
                losses[i].append(loss)
            if chosen[i] is None or loss < chosen[i][0]:
                chosen[i] = (loss, plan)
    plans = [plan for _, plan in chosen]
    if config.selection_draws > 1:
        for plan, level_losses in zip(plans, losses):
            plan.method["selection"] = {"draw": draws[level_losses.index(min(level_losses))],
                                        "validation_loss": level_losses,
                                        "validation_samples": validation_ids.shape[0]}
    return plans


def peak_memory(decoder: Decoder, sequences: int, length: int, config: SubFitConfig | None = None,
                dev: DevOptions | None = None) -> dict[str, int]:
    """Bytes compress needs at its peak besides the model, by what holds them. On the walks' device:
    one layer (float32 and its bf16 copy), the residual stream of every calibration sequence (twice
    in the final fit, which follows a reference stream), one batch's activations, one layer's
    statistics and the candidate bypasses of every unit (float32). On the model's own device (the
    CPU when walks run on a GPU): the scoring walks' checkpoints and the FeedForwards' statistics of
    the last two walks. `tests/test_compress_memory.py` holds a measured compress to it."""
    config, dev = config or SubFitConfig(), dev or DevOptions()
    d, f, n = decoder.hidden_size, decoder.config.intermediate_size, decoder.num_layers
    ranks = config.ranks(d)
    layer = sum(p.numel() for p in decoder.layers[0].parameters())
    stream = sequences * length * d * 4
    scored_stream = dev.scoring_sequences(sequences) * length * d * 4
    unit_stats = (2 * d * d + 2 * d) * 8
    return {
        "one layer": layer * 6,
        "residual streams": 2 * stream,
        "one batch's activations": dev.batch_size * length * (3 * f + 6 * d) * 4,
        "one layer's statistics": 2 * unit_stats + dev.batch_size * length * 2 * d * 16,
        "candidate bypasses": n * (2 * d * (ranks["attn"] + ranks["ffn"]) + 2 * d) * 4,
        "checkpoints (model's device)": math.ceil(n / checkpoint_every(n, scored_stream)) * scored_stream,
        "FeedForward statistics (model's device)": 2 * n * unit_stats,
    }


def _calibration(calib: Calibration, model, tokenizer, config: SubFitConfig) -> tuple[torch.Tensor, dict]:
    """Calibration token ids [N, L] and the record a plan keeps of them."""
    if isinstance(calib, torch.Tensor):
        if calib.dim() != 2 or calib.shape[1] < 2 or calib.is_floating_point():
            raise ValueError(f"A calibration tensor must hold token ids [sequences, length >= 2], got "
                             f"{calib.dtype} {tuple(calib.shape)}.")
        return calib.long(), {"source": "tensor", "samples": calib.shape[0], "length": calib.shape[1]}
    if tokenizer is None:
        raise ValueError("A tokenizer is needed to build calibration data from text; pass tokenizer= "
                         "or a token tensor as calib.")
    source = None if calib is None else str(calib)
    size = config.calibration_size(source is None, models.max_positions(model.config))
    ids = calibration.load_calibration(source, model, tokenizer, *size, config.seed)
    return ids, calibration.describe(source, ids, config.seed)


def _fit_bypasses(plan: Plan, decoder: Decoder, calib_ids: torch.Tensor, removed: list[Unit],
                  basis: torch.Tensor | None, ranks: dict[str, int], ridge: float, walk_args: dict) -> dict[str, float]:
    """One walk over all calibration sequences fitting every bypass on the inputs the compressed
    earlier layers give it; the FeedForward bypasses share one input `basis`, taken from the
    scoring walk that chose them (`Selector.ffn_basis`). Returns each bypass's relative error."""
    device = walk_args.get("device") or next(decoder.model.parameters()).device
    basis = basis.to(device) if basis is not None else None
    fits: dict[Unit, LinearFit] = {}
    errors: dict[str, float] = {}

    def final_fit(kind: str, layer: int, stats: UnitStats) -> Bypass:
        m = stats.moments()
        fit = reduced_rank_fit(m, ranks["attn"], ridge) if kind == "attn" else fit_in_basis(m, basis, ridge)
        fits[(kind, layer)], errors[f"{kind}.{layer}"] = fit, stats.relative_error(fit.error)
        return as_bypass(fit)

    # The residual stream stays float32 and the running statistics float64; each batch's centred
    # products are float32, which the bf16 matmuls' activations leave nothing to add to.
    with bf16_matmuls(device):
        walk(decoder, calib_ids, actions={u: "bypass" for u in removed}, fit=final_fit, desc="fitting bypasses",
             weights=token_weights, product_dtype=torch.float32, target="run", done=lambda unit, stats: None,
             **walk_args)
    for (kind, layer), fit in sorted(fits.items(), key=lambda item: (item[0][1], item[0][0])):
        plan.set_bypass(kind, layer, as_bypass(fit))
    return errors
