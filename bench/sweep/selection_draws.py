"""Development diagnostic: does choosing among selection draws by held-out calibration loss pick
the draw that is best on WikiText-2, and does it beat ReplaceMe-LS at the same level?

`python bench/sweep/selection_draws.py --seed 0 [--level 0.125 --calib-samples 272 --score-samples 64
--draws 3]` runs `compress_levels(..., selection_draws=DRAWS)` on SmolLM2-135M-Instruct with
`wiki_passages.txt` and records every draw's plan as compress scores it (the held-out loss is the
one place compress sees each draw's finished plan, so the script wraps it). It prints and writes
(`--out`, JSON) each draw's units, held-out loss, WikiText-2 ratio (window 1024, first 16,384 tokens)
and loss ratio on the 16 calibration windows after the drawn ones; then ReplaceMe-LS at the same
level on the same calibration. One thread; about 55-68 min for three draws at 272/64 on this CPU.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from heldout_loss import heldout_windows  # noqa: E402

from subfit import calibration, compression, models  # noqa: E402
from subfit.baselines import compress_baseline  # noqa: E402
from subfit.evaluation import mean_token_loss, perplexity, text_tokens  # noqa: E402
from subfit.reference import ReferenceModel  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DATA = Path(os.environ.get("SUBFIT_ASSETS", ROOT.parent / "shared" / "assets")) / "data"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--level", type=float, default=0.125)
    parser.add_argument("--calib-samples", type=int, default=272)
    parser.add_argument("--score-samples", type=int, default=64)
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--out", default=None, help="JSON file to write")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    calib_file, wikitext = str(DATA / "calib" / "wiki_passages.txt"), str(DATA / "wikitext-2-raw" / "wiki.test.raw")
    model, tokenizer, source = models.load(None)

    drawn = []

    def recording(logits_fn, windows, batch_size=4):
        drawn.append(logits_fn.plan)
        return mean_token_loss(logits_fn, windows, batch_size)

    compression.mean_token_loss = recording
    start = time.time()
    chosen = compression.compress_levels(model, [args.level], calib_file, tokenizer=tokenizer,
                                         calib_samples=args.calib_samples, score_samples=args.score_samples,
                                         selection_draws=args.draws, seed=args.seed, progress=False)[0]
    seconds = time.time() - start

    ids = text_tokens(tokenizer, wikitext)[:16384]
    held = heldout_windows(tokenizer, calib_file, args.calib_samples, 512, args.seed, 16)
    dense_ppl = perplexity(ReferenceModel(model), ids, window=1024, progress=False)["ppl"]
    dense_loss = mean_token_loss(ReferenceModel(model), held)

    def scores(plan) -> dict:
        return {"units": plan.removed_units(), "sparsity": plan.accounting()["sparsity"],
                "wikitext": perplexity(ReferenceModel(model, plan), ids, window=1024, progress=False)["ppl"] / dense_ppl,
                "held_after": math.exp(mean_token_loss(ReferenceModel(model, plan), held) - dense_loss)}

    result = {"seed": args.seed, "level": args.level, "calib_samples": args.calib_samples,
              "score_samples": args.score_samples, "selection": chosen.method["selection"], "seconds": seconds,
              "draws": [scores(plan) for plan in drawn]}
    calib_ids = calibration.load_calibration(calib_file, model, tokenizer, args.calib_samples, 512, args.seed)
    result["replaceme"] = scores(compress_baseline(model, "replaceme", args.level, calib_ids, source=source))
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
