"""Scores and greedy selection of units under a parameter budget.

A score says how much damage replacing a unit by its fitted bypass would do (lower = safer to
remove). The local score is the error the bypass injects into the residual stream, relative to
the stream, per token; the output score is the KL divergence it causes in the model's next-token
distribution. The global-norm local score is kept as the simple baseline it improves on.
"""
from __future__ import annotations

from dataclasses import dataclass

from subfit.stats import Unit

Group = tuple[Unit, ...]  # units removed together: one unit, or a whole layer's two


@dataclass(frozen=True)
class Score:
    """How a unit's damage is measured.

    weighting: "per_token" normalises each token's error by its own stream size (what the next
        RMSNorm sees); "uniform" divides the total error by the total stream energy, which the
        few massive-activation tokens dominate, so units barely separate.
    output_effect: re-rank the most promising units by the KL divergence their bypass causes in
        the final next-token distribution (forward passes from the unit to the head).
    """

    weighting: str = "per_token"
    output_effect: bool = False


SCORES = {
    "bypass-error": Score("per_token"),
    "bypass-error-global": Score("uniform"),
    "output-kl": Score("per_token", output_effect=True),
}


def group_sizes(groups: list[Group], unit_params: dict[str, int]) -> dict[Group, int]:
    return {g: sum(unit_params[kind] for kind, _ in g) for g in groups}


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
