"""Held-out loss of every plan of a sweep, on windows of the calibration text the plans never saw.

`python bench/sweep/heldout_loss.py smollm2 [--windows 16]` reads the sweep's JSON and its cached
plans (run `run_sweep.py smollm2` first) and writes bench/results/heldout_<preset>.{md,json}:
next-token loss on `--windows` windows of the calibration file that calibration did not draw
(same tokenizer, length and seed rule), as exp(loss - dense loss), beside the sweep's WikiText-2
ratio. It separates "fits the calibration distribution" from "transfers to other text".

`--text wikitext-detok` scores the sweep's own perplexity text instead, with the raw WikiText
format undone (`detokenize`: " @-@ " -> "-", " , " -> ", ", headings without "="), in the sweep's
windows (first `--windows` x `window` tokens): the same articles as the sweep's figure, in the
format of clean prose like the calibration text, so a gap between the two is the format's. It
writes bench/results/detok_<preset>.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def heldout_windows(tokenizer, path: str, calib_samples: int, length: int, seed: int, n: int) -> torch.Tensor:
    """The `n` windows after calibration's `calib_samples` in the same seeded order: disjoint from them."""
    from subfit import calibration

    stream = calibration.tokenize_stream(tokenizer, calibration.read_text(path))
    return calibration.sample_windows(stream, n, length, seed, f"Calibration file {path}", skip=calib_samples)


_DETOKENIZE = [
    (re.compile(r" @([-,.])@ "), r"\1"),  # number and hyphen splits: 1 @,@ 000, well @-@ known
    (re.compile(r"^ *(?:= )+(.*?)(?: =)+ *$", re.M), r"\1"),  # " = = Heading = = " lines
    (re.compile(r" ([.,;:!?)\]}]|'s|'re|'ve|'ll|'d|'m|n't)(?=\s|$)", re.M), r"\1"),  # no space before
    (re.compile(r"([(\[{]) "), r"\1"),  # no space after an opening bracket
    (re.compile(r'" ([^"\n]*?) "'), r'"\1"'),  # quoted spans
    (re.compile(r"^ +", re.M), ""),
]


def detokenize(text: str) -> str:
    """WikiText's raw format (tokens split by spaces, `@-@` joins, `= = Heading = =` lines) back to
    plain prose, as far as simple rules go."""
    text = text.replace("\r\n", "\n")
    for pattern, replacement in _DETOKENIZE:
        text = pattern.sub(replacement, text)
    return text


def detok_windows(tokenizer, path: str, cache: Path, window: int, n: int) -> torch.Tensor:
    """The first `n` windows of `window` tokens of `path` detokenized (the copy is kept in `cache`)."""
    from subfit.evaluation import text_tokens

    copy = cache / f"{Path(path).stem}.detok.txt"
    if not copy.exists():
        copy.parent.mkdir(parents=True, exist_ok=True)
        copy.write_text(detokenize(Path(path).read_text(encoding="utf-8")), encoding="utf-8")
    ids = text_tokens(tokenizer, copy, n * window)
    if ids.numel() < n * window:
        raise SystemExit(f"{copy} has {ids.numel()} tokens, fewer than {n} windows of {window}.")
    return ids.view(n, window)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("preset", choices=["stories260k", "smollm2"])
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--text", choices=["calib", "wikitext-detok"], default="calib",
                        help="held-out calibration windows (default), or the sweep's perplexity text detokenized")
    parser.add_argument("--methods", nargs="+", default=None, help="only these methods (default: every row)")
    args = parser.parse_args(argv)
    from subfit import models
    from subfit.evaluation import mean_token_loss
    from subfit.plan import Plan
    from subfit.reference import ReferenceModel
    from subfit.sweep import level_tag, plan_digest

    sweep = json.loads((ROOT / "bench" / "results" / f"sweep_{args.preset}.json").read_text())
    config = sweep["config"]
    model, tokenizer, _ = models.load(config["model"])
    if args.text == "calib":
        ids = heldout_windows(tokenizer, config["calib"], config["calib_samples"], config["calib_len"],
                              config["seed"], args.windows)
        out, command = ROOT / "bench" / "results" / f"heldout_{args.preset}", ""
        title = "Held-out calibration-text loss"
        described = (f"{args.windows} windows x {config['calib_len']} tokens of `{Path(config['calib']).name}` that "
                     "calibration did not draw")
    else:
        ids = detok_windows(tokenizer, config["ppl"], Path(config["cache"]), config["window"], args.windows)
        out, command = ROOT / "bench" / "results" / f"detok_{args.preset}", " --text wikitext-detok"
        title = "Detokenized perplexity text"
        described = (f"the first {args.windows} windows x {config['window']} tokens of `{Path(config['ppl']).name}` "
                     "detokenized (`detokenize`), the sweep's windows on the same articles")
    if args.methods:
        command += " --methods " + " ".join(args.methods)
    # Losses are kept in the sweep's cache by plan digest, so a re-run after a partial sweep
    # scores only the plans that changed.
    memo_file = Path(config["cache"]) / f"losses_{args.text}_{args.windows}.json"
    memo = json.loads(memo_file.read_text()) if memo_file.exists() else {}

    def loss(plan) -> float:
        key = "dense" if plan is None else plan_digest(plan)
        if key not in memo:
            memo[key] = mean_token_loss(ReferenceModel(model, plan), ids)
            memo_file.write_text(json.dumps(memo, indent=1))
        return memo[key]

    dense = loss(None)
    rows = []
    for row in (r for r in sweep["rows"] if "error" not in r and (not args.methods or r["method"] in args.methods)):
        plan = Plan.load(Path(config["cache"]) / "plans" / f"{row['method']}@{level_tag(row['level'])}")
        ratio = math.exp(loss(plan) - dense)
        rows.append({"method": row["method"], "level": row["level"], "heldout_ratio": ratio,
                     "ppl_ratio": row["ppl_ratio"]})
        print(f"{row['method']}@{row['level']:g}: {args.text} {ratio:.3f}x, {Path(config['ppl']).name} "
              f"{row['ppl_ratio']:.3f}x", flush=True)
    Path(f"{out}.json").write_text(json.dumps({"preset": args.preset, "text": args.text, "windows": args.windows,
                                               "length": ids.shape[1], "dense_ppl": math.exp(dense),
                                               "rows": rows}, indent=1))
    levels = sorted({r["level"] for r in rows})
    lines = [f"# {title} vs the sweep's perplexity: {args.preset}", "",
             f"`python bench/sweep/heldout_loss.py {args.preset} --windows {args.windows}{command}`: {described}; "
             f"dense perplexity on them {math.exp(dense):.2f}. Cell: perplexity ratio to dense on them / "
             f"`{Path(config['ppl']).name}` ratio (from the sweep). Best value per level in bold.", "",
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
