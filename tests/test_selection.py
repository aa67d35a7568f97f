"""Budgeted selection: fills the budget as the unit sizes allow, never above it, at the least
summed damage; contiguous windows for the contiguous ablation."""
import itertools

import pytest

from subfit.selection import (CHECKPOINT_BYTES, MIN_CHECKPOINTS, best_window, checkpoint_every, greedy_select,
                              group_sizes)

PARAMS = {"attn": 1, "ffn": 3}


def _groups(n_layers):
    return [((k, i),) for i in range(n_layers) for k in ("attn", "ffn")]


def _brute_force(scores, sizes, room, tolerance):
    """All subsets: best fill, then least damage among fills within `tolerance`."""
    best = None
    options = []
    for r in range(len(scores) + 1):
        for combo in itertools.combinations(scores, r):
            total = sum(sizes[g] for g in combo)
            if total <= room:
                options.append((total, sum(scores[g] for g in combo)))
    top = max(t for t, _ in options)
    return min(d for t, d in options if t > top - tolerance)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("room", [0, 2, 5, 7, 10])
def test_greedy_select_matches_brute_force_damage(seed, room):
    import random

    rng = random.Random(seed)
    groups = _groups(4)
    scores = {g: rng.random() for g in groups}
    sizes = group_sizes(groups, PARAMS)
    chosen = greedy_select(scores, sizes, room)
    assert sum(sizes[g] for g in chosen) <= room
    assert sum(scores[g] for g in chosen) == pytest.approx(_brute_force(scores, sizes, room, 1))


def test_whole_layers_are_one_size():
    layers = [(("attn", i), ("ffn", i)) for i in range(5)]
    sizes = group_sizes(layers, PARAMS)
    scores = {g: s for g, s in zip(layers, [5, 1, 4, 2, 3])}
    assert greedy_select(scores, sizes, 9) == [layers[1], layers[3]]


@pytest.mark.parametrize("layers", [1, 5, 30, 31, 80])
@pytest.mark.parametrize("stream", [1, 2**20, 19 * 2**20, 75 * 2**20, 2**30])
def test_checkpoints_fill_their_budget_and_never_fall_below_the_minimum(layers, stream):
    every = checkpoint_every(layers, stream)
    kept = -(-layers // every)  # layers 0, every, 2 every, ...
    assert every >= 1
    assert kept >= min(layers, MIN_CHECKPOINTS)
    if every > 1 and kept > MIN_CHECKPOINTS:  # fewer than every layer only where every layer would not fit
        assert layers * stream > CHECKPOINT_BYTES and kept * stream <= CHECKPOINT_BYTES + stream
    if layers * stream <= CHECKPOINT_BYTES:
        assert every == 1


def test_best_window_is_contiguous_and_least_damaging():
    groups = _groups(5)
    sizes = group_sizes(groups, PARAMS)
    scores = {g: 1.0 for g in groups}
    for g in groups[4:8]:  # a cheap run in the middle: attn.2 ffn.2 attn.3 ffn.3
        scores[g] = 0.1
    window = best_window(groups, scores, sizes, 8)
    assert window == groups[4:8]
    idx = [groups.index(g) for g in window]
    assert idx == list(range(idx[0], idx[-1] + 1))


def test_output_effects_are_the_kl_of_each_candidate_plan(stories, tinystories_file):
    """The layer-major probe (all candidate streams through each layer in one batch) gives, per
    candidate, the KL between the current model and the current model with that unit bypassed,
    computed here plainly with the reference executor on the same positions."""
    import torch

    from subfit.calibration import from_text_file
    from subfit.fitting import reduced_rank_fit
    from subfit.models import Decoder, source_of
    from subfit.plan import Plan
    from subfit.reference import ReferenceModel
    from subfit.selection import as_bypass, output_effects
    from subfit.stats import walk

    model, tokenizer, _ = stories
    decoder = Decoder(model)
    ids = from_text_file(tokenizer, tinystories_file, 6, 64, seed=2)
    units = [("attn", 1), ("ffn", 1), ("ffn", 3), ("attn", 4)]
    stats = walk(decoder, ids[:4], collect=units, progress=False)
    bypass = {u: as_bypass(reduced_rank_fit(stats[u].moments(), 16, 1e-3)) for u in units}
    removed = {("attn", 1): bypass[("attn", 1)], ("attn", 2): None}  # one bypassed, one deleted
    candidates = {u: bypass[u] for u in units if u not in removed}  # (a plan holds one FeedForward basis)
    effects = output_effects(decoder, ids[4:], removed, candidates, scored_positions=32)

    def plan_with(extra):
        plan = Plan.empty(decoder, source_of(model))
        plan.attn[2] = "delete"
        for (kind, layer), b in {("attn", 1): removed[("attn", 1)], **extra}.items():
            plan.set_bypass(kind, layer, b)
        return plan

    every = ids[4:].numel() // 32
    reference = torch.log_softmax(ReferenceModel(model, plan_with({}))(ids[4:])[:, every - 1::every].float(), -1)
    for unit, candidate in candidates.items():
        logp = torch.log_softmax(ReferenceModel(model, plan_with({unit: candidate}))(ids[4:])[:, every - 1::every].float(), -1)
        kl = float((reference.exp() * (reference - logp)).sum(-1).mean())
        assert effects[unit] == pytest.approx(kl, rel=1e-4, abs=1e-7), unit
