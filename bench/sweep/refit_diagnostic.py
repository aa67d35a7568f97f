"""Development diagnostic: is a plan's loss on WikiText-2 its selection, its fit form or its fit data?

`python bench/sweep/refit_diagnostic.py subfit@0.25 subfit-contiguous@0.25` keeps the units of
cached smollm2 sweep plans (plans/sweep_smollm2) and refits their bypasses exactly as `compress`
does (a 32-sequence walk for the shared FeedForward basis, then the final fitting walk) on 128 x 512
tokens of `--fit-on` text, then prints the WikiText-2 perplexity ratio (window 1024, first 16,384
tokens). `--fit-on wikitext` (default) fits on WikiText-2 test text *after* the evaluated tokens:
not a shipped method, it tells selection from fit data apart. `--fit-on calib` refits on the
sweep's own calibration (wiki_passages, same seeded windows), so `--attn-rank`, `--ffn-rank`,
`--ridge`, `--weighting` and `--samples` show what other fit forms or more of the same text give;
`--target dense` fits each bypass to the dense model's stream after it (see `stats.walk`), so that
it also undoes the drift of the removals before it; `--target run` fits each run of adjacent
bypasses to the block it replaces. `units:ffn.12,attn.13,...` in place of a plan name refits that
unit set (no sweep cache needed); `--heldout N` also prints the loss ratio on N windows of the
calibration file that calibration did not draw (as `heldout_loss.py`).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch

from subfit import calibration, models
from subfit.compression import _as_bypass, _fit_bypasses, default_ranks
from subfit.evaluation import mean_token_loss, perplexity, text_tokens
from subfit.fitting import reduced_rank_fit
from subfit.models import Decoder
from subfit.plan import Plan, PlanError
from subfit.reference import ReferenceModel
from subfit.runtime.cli import number, positive_int
from subfit.stats import TARGETS, WEIGHTINGS, walk

ROOT = Path(__file__).resolve().parents[2]
DATA = Path(os.environ.get("SUBFIT_ASSETS", ROOT.parent / "shared" / "assets")) / "data"
WIKITEXT, CALIB = DATA / "wikitext-2-raw" / "wiki.test.raw", DATA / "calib" / "wiki_passages.txt"
PLANS = ROOT / "plans" / "sweep_smollm2" / "plans"
EVALUATED = 16384


def parse_units(parser: argparse.ArgumentParser, spec: str, num_layers: int) -> list[tuple[str, int]]:
    """`units:ffn.12,attn.13` -> [("ffn", 12), ("attn", 13)]; a malformed unit is a usage error."""
    units = []
    for name in spec.removeprefix("units:").split(","):
        kind, _, layer = name.partition(".")
        if kind not in ("attn", "ffn") or not layer.isdigit() or int(layer) >= num_layers:
            parser.error(f"bad unit {name!r} in {spec!r}: write attn.I or ffn.I with 0 <= I < {num_layers}, "
                         "comma-separated, e.g. units:ffn.12,attn.13")
        units.append((kind, int(layer)))
    return units


def load_plans(parser: argparse.ArgumentParser, names: list[str]) -> dict[str, Plan | None]:
    """The cached sweep plans by name (None for a `units:` list), before any model is loaded; a bad
    name is a usage error."""
    try:
        return {name: None if name.startswith("units:") else Plan.load(PLANS / name) for name in names}
    except PlanError as error:
        parser.error(f"{error} Run `python bench/sweep/run_sweep.py smollm2` first, or name a plan in {PLANS}.")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("plans", nargs="+", help="cached sweep plans, e.g. subfit@0.25")
    parser.add_argument("--fit-on", choices=["wikitext", "calib"], default="wikitext")
    parser.add_argument("--attn-rank", type=positive_int, default=None, help="default: compress's")
    parser.add_argument("--ffn-rank", type=positive_int, default=None, help="default: compress's")
    parser.add_argument("--weighting", choices=WEIGHTINGS, default="per_token")
    parser.add_argument("--target", choices=TARGETS, default="unit", help="bypass fit target of the final walk")
    parser.add_argument("--ridge", type=number(float, lambda v: v > 0, "a positive ridge, e.g. 1e-3"), default=1e-3)
    parser.add_argument("--samples", type=positive_int, default=128, help="fitting sequences of 512 tokens (default 128)")
    parser.add_argument("--heldout", type=positive_int, default=None,
                        help="also the loss ratio on this many held-out windows of the calibration file")
    args = parser.parse_args(argv)
    plans = load_plans(parser, args.plans)
    torch.set_num_threads(1)
    model, tokenizer, _ = models.load(None)
    decoder = Decoder(model)
    ids = text_tokens(tokenizer, WIKITEXT, None)
    evaluated = ids[:EVALUATED]
    if args.fit_on == "wikitext":
        calib = calibration.sample_windows(ids[EVALUATED:], args.samples, 512, 0,
                                           "WikiText-2 after the evaluated tokens")
    else:
        calib = calibration.load_calibration(str(CALIB), model, tokenizer, args.samples, 512, 0)
    attn_rank, ffn_rank = default_ranks(decoder.hidden_size)
    ranks = {"attn": args.attn_rank or attn_rank, "ffn": args.ffn_rank or ffn_rank}
    dense = perplexity(ReferenceModel(model, None), evaluated, window=1024, progress=False)["ppl"]
    if args.heldout:
        from heldout_loss import heldout_windows

        heldout = heldout_windows(tokenizer, str(CALIB), 128, 512, 0, args.heldout)
        dense_loss = mean_token_loss(ReferenceModel(model, None), heldout)
    for name, plan in plans.items():
        if plan is None:
            removed = parse_units(parser, name, decoder.num_layers)
            plan = Plan.empty(decoder, models.source_of(model))
        else:
            removed = [(kind, int(layer)) for kind, layer in (u.split(".") for u in plan.removed_units())]
        start = time.time()
        stats = walk(decoder, calib[:32], actions={u: "bypass" for u in removed}, progress=False,
                     weighting=args.weighting,
                     fit=lambda kind, layer, s: _as_bypass(reduced_rank_fit(s.moments(), ranks[kind], args.ridge)))
        plan.tensors.clear()
        _fit_bypasses(plan, decoder, calib, removed, stats, ranks, args.ridge,
                      dict(weighting=args.weighting, target=args.target, progress=False))
        ratio = perplexity(ReferenceModel(model, plan), evaluated, window=1024, progress=False)["ppl"] / dense
        form = (f"attn rank {ranks['attn']}, ffn rank {ranks['ffn']}, ridge {args.ridge:g}, {args.weighting}, "
                f"{args.target} target")
        held = (f", held-out calibration {math.exp(mean_token_loss(ReferenceModel(model, plan), heldout) - dense_loss):.3f}x"
                if args.heldout else "")
        print(f"{name} refit on {args.fit_on} x {args.samples} ({form}): {ratio:.3f}x dense{held} "
              f"({time.time() - start:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
