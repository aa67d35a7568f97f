"""The same inputs and seed give the same plan, across refactors: a stories260K plan's removed
units and a fingerprint of every bypass tensor are pinned in tests/data/pinned_plan_stories260k.json.

The fingerprint is three float64 moments per tensor (sum, sum of squares, index-weighted sum),
compared to a relative 1e-6: bitwise checksums would differ between thread counts and BLAS builds,
while any change of the algorithm moves them by far more. A deliberate change of the algorithm
re-pins with `python tests/test_pinned_plan.py` (and says why in its commit)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

PINNED = Path(__file__).parent / "data" / "pinned_plan_stories260k.json"
LEVELS = (0.25, 0.375)


def make_plans(model, tokenizer, text: Path):
    from subfit.compression import compress_levels

    from subfit.config import DevOptions, SubFitConfig

    return compress_levels(model, LEVELS, text, tokenizer=tokenizer, progress=False,
                           config=SubFitConfig(calib_samples=30, calib_len=64, seed=3, selection_draws=3),
                           dev=DevOptions(score_samples=6))


def fingerprint(plan) -> dict:
    tensors = {}
    for name, t in sorted(plan.tensors.items()):
        flat = t.detach().double().reshape(-1)
        index = torch.arange(1, flat.numel() + 1, dtype=torch.float64) / flat.numel()
        tensors[name] = [float(flat.sum()), float(flat.pow(2).sum()), float((flat * index).sum())]
    return {"removed": plan.removed_units(), "tensors": tensors}


def test_same_inputs_and_seed_give_the_pinned_plan(stories, tinystories_file, tmp_path):
    model, tokenizer, _ = stories
    text = tmp_path / "stories.txt"
    text.write_text(tinystories_file.read_text()[:120_000])
    expected = json.loads(PINNED.read_text())
    for level, plan in zip(LEVELS, make_plans(model, tokenizer, text)):
        got, want = fingerprint(plan), expected[str(level)]
        assert got["removed"] == want["removed"], f"level {level}: units changed"
        assert sorted(got["tensors"]) == sorted(want["tensors"])
        for name, values in want["tensors"].items():
            for g, w in zip(got["tensors"][name], values):
                assert abs(g - w) <= 1e-6 * max(abs(w), 1.0), f"level {level}: tensor {name} changed ({g} vs {w})"


if __name__ == "__main__":  # re-pin after a deliberate change of the algorithm
    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import STORIES, TINYSTORIES
    from subfit import models

    model, tokenizer, _ = models.load(STORIES)
    scratch = Path("/tmp/pinned_stories.txt")
    scratch.write_text(TINYSTORIES.read_text()[:120_000])
    PINNED.parent.mkdir(exist_ok=True)
    PINNED.write_text(json.dumps({str(l): fingerprint(p) for l, p in zip(LEVELS, make_plans(model, tokenizer, scratch))},
                                 indent=1) + "\n")
    print(f"pinned {PINNED}")
