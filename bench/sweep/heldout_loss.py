"""Held-out loss of every plan of a sweep, on windows of the calibration text the plans never saw.

`python bench/sweep/heldout_loss.py smollm2 [--windows 16]` reads the sweep's JSON and its cached
plans (run `run_sweep.py smollm2` first) and writes bench/results/heldout_<preset>.{md,json}:
next-token loss on `--windows` windows of the calibration file that calibration did not draw
(same tokenizer, length and seed rule), as exp(loss - dense loss), beside the sweep's WikiText-2
ratio. It separates "fits the calibration distribution" from "transfers to other text".
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]


def heldout_windows(tokenizer, path: str, calib_samples: int, length: int, seed: int, n: int) -> torch.Tensor:
    """The `n` windows after calibration's `calib_samples` in the same seeded order: disjoint from them."""
    from subfit import calibration

    stream = calibration.tokenize_stream(tokenizer, calibration.read_text(path))
    return calibration.sample_windows(stream, n, length, seed, f"Calibration file {path}", skip=calib_samples)


@torch.no_grad()
def mean_loss(logits_fn, ids: torch.Tensor, batch: int = 4) -> float:
    total = 0.0
    for first in range(0, ids.shape[0], batch):
        x = ids[first:first + batch]
        logits = logits_fn(x)[:, :-1].float()
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"))
    return total / (ids.shape[0] * (ids.shape[1] - 1))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("preset", choices=["stories260k", "smollm2"])
    parser.add_argument("--windows", type=int, default=16)
    args = parser.parse_args(argv)
    from subfit import models
    from subfit.plan import Plan
    from subfit.reference import ReferenceModel
    from subfit.sweep import level_tag

    sweep = json.loads((ROOT / "bench" / "results" / f"sweep_{args.preset}.json").read_text())
    config = sweep["config"]
    model, tokenizer, _ = models.load(config["model"])
    ids = heldout_windows(tokenizer, config["calib"], config["calib_samples"], config["calib_len"], config["seed"],
                          args.windows)
    dense = mean_loss(ReferenceModel(model, None), ids)
    rows = []
    for row in (r for r in sweep["rows"] if "error" not in r):
        plan = Plan.load(Path(config["cache"]) / "plans" / f"{row['method']}@{level_tag(row['level'])}")
        ratio = math.exp(mean_loss(ReferenceModel(model, plan), ids) - dense)
        rows.append({"method": row["method"], "level": row["level"], "heldout_ratio": ratio,
                     "ppl_ratio": row["ppl_ratio"]})
        print(f"{row['method']}@{row['level']:g}: held-out {ratio:.3f}x, {Path(config['ppl']).name} "
              f"{row['ppl_ratio']:.3f}x", flush=True)
    out = ROOT / "bench" / "results" / f"heldout_{args.preset}"
    Path(f"{out}.json").write_text(json.dumps({"preset": args.preset, "windows": args.windows,
                                               "length": config["calib_len"], "dense_ppl": math.exp(dense),
                                               "rows": rows}, indent=1))
    levels = sorted({r["level"] for r in rows})
    lines = [f"# Held-out calibration-text loss vs the sweep's perplexity: {args.preset}", "",
             f"`python bench/sweep/heldout_loss.py {args.preset} --windows {args.windows}`: {args.windows} windows x "
             f"{config['calib_len']} tokens of `{Path(config['calib']).name}` that calibration did not draw; dense "
             f"perplexity on them {math.exp(dense):.2f}. Cell: held-out perplexity ratio to dense / "
             f"`{Path(config['ppl']).name}` ratio (from the sweep). Best held-out value per level in bold.", "",
             "| method | " + " | ".join(f"{lv:g}" for lv in levels) + " |", "|---|" + "---:|" * len(levels)]
    best = {lv: min(r["heldout_ratio"] for r in rows if r["level"] == lv) for lv in levels}
    for method in dict.fromkeys(r["method"] for r in rows):
        cells = []
        for lv in levels:
            r = next((r for r in rows if r["method"] == method and r["level"] == lv), None)
            held = f"{r['heldout_ratio']:.3f}" if r else "n/a"
            cells.append(f"**{held}**" if r and r["heldout_ratio"] == best[lv] else held)
            cells[-1] += f" / {r['ppl_ratio']:.3f}" if r else ""
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    Path(f"{out}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out}.md and {out}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
