"""Development diagnostic: is a plan's loss on WikiText-2 its selection or its fit data?

`python bench/sweep/refit_diagnostic.py subfit@0.25 subfit-contiguous@0.25` keeps the units of
cached smollm2 sweep plans (plans/sweep_smollm2) and refits their bypasses exactly as `compress`
does (a 32-sequence walk for the shared FeedForward basis, then the final fitting walk), but on
128 x 512 tokens of WikiText-2 test text *after* the first 16,384 tokens that the sweep evaluates,
then prints the WikiText-2 perplexity ratio (window 1024, first 16,384 tokens). Not a shipped
method: it fits on the evaluation file's own distribution to tell selection from fit data apart.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

from subfit import calibration, models
from subfit.compress import _as_bypass, _fit_bypasses, default_ranks
from subfit.evaluate import perplexity, text_tokens
from subfit.fitting import reduced_rank_fit
from subfit.models import Decoder
from subfit.plan import Plan
from subfit.reference import ReferenceModel
from subfit.stats import walk

ROOT = Path(__file__).resolve().parents[2]
WIKITEXT = Path(os.environ.get("SUBFIT_ASSETS", ROOT.parent / "shared" / "assets")) / "data" / "wikitext-2-raw" / "wiki.test.raw"
EVALUATED, RIDGE = 16384, 1e-3


def main(names: list[str]) -> int:
    torch.set_num_threads(1)
    model, tokenizer, _ = models.load(None)
    decoder = Decoder(model)
    ids = text_tokens(tokenizer, WIKITEXT, None)
    evaluated = ids[:EVALUATED]
    calib = calibration.sample_windows(ids[EVALUATED:], 128, 512, 0, "WikiText-2 after the evaluated tokens")
    attn_rank, ffn_rank = default_ranks(decoder.hidden_size)
    ranks = {"attn": attn_rank, "ffn": ffn_rank}
    dense = perplexity(ReferenceModel(model, None), evaluated, window=1024, progress=False)["ppl"]
    for name in names:
        plan = Plan.load(ROOT / "plans" / "sweep_smollm2" / "plans" / name)
        removed = [(kind, int(layer)) for kind, layer in (u.split(".") for u in plan.removed_units())]
        start = time.time()
        stats = walk(decoder, calib[:32], actions={u: "bypass" for u in removed}, progress=False,
                     fit=lambda kind, layer, s: _as_bypass(reduced_rank_fit(s.moments(), ranks[kind], RIDGE)))
        plan.tensors.clear()
        _fit_bypasses(plan, decoder, calib, removed, stats, ranks, RIDGE, dict(weighting="per_token", progress=False))
        ratio = perplexity(ReferenceModel(model, plan), evaluated, window=1024, progress=False)["ppl"] / dense
        print(f"{name} refit on WikiText-2 text: {ratio:.3f}x dense ({time.time() - start:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
