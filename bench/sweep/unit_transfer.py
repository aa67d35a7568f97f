"""Development diagnostic: which removed units of a plan cost the most on WikiText-2, and on text
like the calibration's?

`python bench/sweep/unit_transfer.py subfit@0.25` takes a cached smollm2 sweep plan and, for each
removed unit in turn, puts the dense unit back and prints the perplexity ratio to dense on the first
`--tokens` WikiText-2 tokens (window 1024) and on 16 held-out windows of the calibration file (the
windows after calibration's 128, as heldout_loss.py draws them). A unit whose restoration gains much
more on WikiText-2 than on held-out calibration text is one whose bypass transfers badly.
"""
from __future__ import annotations

import argparse
import sys

import torch

from heldout_loss import heldout_windows
from refit_diagnostic import CALIB, WIKITEXT, load_plans
from subfit import models
from subfit.evaluation import perplexity, text_tokens
from subfit.plan import Plan
from subfit.reference import ReferenceModel
from subfit.runtime.cli import positive_int


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("plan", help="a cached sweep plan, e.g. subfit@0.25")
    parser.add_argument("--tokens", type=positive_int, default=8192, help="WikiText-2 tokens scored (default 8192)")
    args = parser.parse_args(argv)
    plan = load_plans(parser, [args.plan])[args.plan]
    torch.set_num_threads(1)
    model, tokenizer, _ = models.load(None)
    texts = {"WikiText-2": text_tokens(tokenizer, WIKITEXT, args.tokens),
             "held-out calibration": heldout_windows(tokenizer, str(CALIB), 128, 512, 0, 16).reshape(-1)}
    dense = {k: perplexity(ReferenceModel(model, None), v, window=1024, progress=False)["ppl"] for k, v in texts.items()}

    def ratios(plan: Plan) -> dict[str, float]:
        return {k: perplexity(ReferenceModel(model, plan), v, window=1024, progress=False)["ppl"] / dense[k]
                for k, v in texts.items()}

    full = ratios(plan)
    print(f"| {args.plan} | " + " | ".join(f"{v:.3f}x" for v in full.values()) + " | | |")
    print("| unit restored | " + " | ".join(texts) + " | gain on " + " | gain on ".join(texts) + " |")
    for unit in plan.removed_units():
        kind, layer = unit.split(".")
        actions = plan.actions(kind)
        action, actions[int(layer)] = actions[int(layer)], "keep"
        restored = ratios(plan)
        actions[int(layer)] = action
        print(f"| {unit} | " + " | ".join(f"{v:.3f}x" for v in restored.values()) + " | "
              + " | ".join(f"{full[k] / v:.3f}" for k, v in restored.items()) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
