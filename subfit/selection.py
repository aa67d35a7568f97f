"""Scores and greedy selection of units under a parameter budget.

A score says how much damage replacing a unit would do (lower = safer to remove). SubFit's score
is the error the unit's own fitted bypass would inject into the residual stream, relative to the
stream, in a per-token metric; the plain global-norm version is kept for comparison.
"""
from __future__ import annotations

from dataclasses import dataclass

from subfit.fitting import LinearFit
from subfit.stats import Unit, UnitStats


@dataclass(frozen=True)
class BypassErrorScore:
    """Relative error a unit's fitted bypass injects into the residual stream.

    `weighting="per_token"` (the default) normalises each token by its own stream size;
    `"uniform"` divides the total error by the total stream energy, which the massive-activation
    tokens dominate.
    """

    weighting: str = "per_token"

    def __call__(self, stats: UnitStats, fit: LinearFit) -> float:
        return stats.relative_error(fit.error)


SCORES = {"bypass-error": BypassErrorScore("per_token"), "bypass-error-global": BypassErrorScore("uniform")}


def greedy_select(
    scores: dict[Unit, float], unit_params: dict[str, int], removed_params: int, quota: int
) -> list[Unit]:
    """Pick units to add to the removals so the total comes as close to `quota` as the smallest
    unit allows, without exceeding it, at the least summed score.

    For each number of FeedForwards taken (the best-scoring ones), attention units fill the rest;
    among the mixes that use the budget best, the one with the least total damage wins. Scores are
    in the same unit (relative injected error) for both kinds, so they add up.
    """
    room = quota - removed_params
    ranked = {kind: sorted((u for u in scores if u[0] == kind), key=lambda u: (scores[u], u[1])) for kind in ("attn", "ffn")}
    size_a, size_f = unit_params["attn"], unit_params["ffn"]
    options = []
    for n_ffn in range(len(ranked["ffn"]) + 1):
        if n_ffn * size_f > room:
            break
        n_attn = min(len(ranked["attn"]), (room - n_ffn * size_f) // size_a)
        units = ranked["ffn"][:n_ffn] + ranked["attn"][:n_attn]
        options.append((-(n_ffn * size_f + n_attn * size_a), sum(scores[u] for u in units), units))
    if not options:
        return []
    best_fill = min(o[0] for o in options)
    # Mixes within one attention unit of the best fill use the budget equally well.
    good = [o for o in options if o[0] < best_fill + size_a]
    return min(good, key=lambda o: (o[1], o[0]))[2]
