"""The same inputs and seed give the same plan, across refactors: a stories260K plan's removed
units and a fingerprint of every bypass tensor are pinned in tests/data/pinned_plan_stories260k.json.

The fingerprint is three float64 moments per tensor (sum, sum of squares, index-weighted sum),
compared to a relative 1e-6. The pin holds for the torch release and thread count it was made with
(recorded beside it): other float kernels and reduction orders move the activations the statistics
are gathered from, and the move grows through the fitted blocks (torch 2.11 against 2.13: 1e-5 in
the fourth block's bypass, 0.7% in the fifth's; at one thread the 25% units change, as this tiny
model's scores nearly tie). Elsewhere the test skips and says so. A deliberate change of the
algorithm re-pins with `python tests/test_pinned_plan.py` (and says why in its commit)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
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


def environment() -> dict:
    """What the pin depends on besides the algorithm: the torch release and the thread count."""
    return {"torch": ".".join(torch.__version__.split("+")[0].split(".")[:2]), "threads": torch.get_num_threads()}


def test_same_inputs_and_seed_give_the_pinned_plan(stories, tinystories_file, tmp_path):
    expected = json.loads(PINNED.read_text())
    if expected["environment"] != environment():
        pytest.skip(f"the plan is pinned for {expected['environment']}, this is {environment()}: to check a "
                    "refactor here, pin before it with `python tests/test_pinned_plan.py` (a local pin, not to commit)")
    model, tokenizer, _ = stories
    text = tmp_path / "stories.txt"
    text.write_text(tinystories_file.read_text()[:120_000])
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
    pinned = {str(l): fingerprint(p) for l, p in zip(LEVELS, make_plans(model, tokenizer, scratch))}
    PINNED.write_text(json.dumps({"environment": environment(), **pinned}, indent=1) + "\n")
    print(f"pinned {PINNED}")
