"""Development diagnostic: is the output-KL score biased when it is probed on the sequences the
candidate bypasses were fitted on?

`python bench/sweep/probe_bias.py` makes SubFit's first scoring walk on SmolLM2 (calibration
`wiki_passages.txt` 128 x 512, seed 0; candidate bypasses fitted on sequences 0-31, as `compress`
fits them) and scores every unit's bypass by output KL on four probes: sequences 0-1 (in-sample, the
old default), 32-33 (held out, the new default), 34-35 and 40-47 (held out, four times larger: the
reference). It prints, per probe and unit kind, the mean KL relative to the reference, the Spearman
rank correlation with it, and the 16 units the probe ranks safest.
"""
from __future__ import annotations

import argparse
import sys

import torch

from refit_diagnostic import CALIB
from subfit import calibration, models
from subfit.compression import _as_bypass, default_ranks
from subfit.fitting import reduced_rank_fit
from subfit.models import UNIT_KINDS, Decoder
from subfit.stats import output_effects, walk

PROBES = {"in-sample 0-1": (0, 2), "held-out 32-33": (32, 34), "held-out 34-35": (34, 36), "held-out 40-47": (40, 48)}
REFERENCE = "held-out 40-47"


def spearman(a: dict, b: dict) -> float:
    rank = lambda d: {u: i for i, u in enumerate(sorted(d, key=d.get))}  # noqa: E731
    ra, rb, n = rank(a), rank(b), len(a)
    return 1 - 6 * sum((ra[u] - rb[u]) ** 2 for u in a) / (n * (n * n - 1))


def main(argv: list[str]) -> int:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)
    torch.set_num_threads(1)
    model, tokenizer, _ = models.load(None)
    decoder = Decoder(model)
    calib = calibration.load_calibration(str(CALIB), model, tokenizer, 128, 512, 0)
    units = [(kind, layer) for layer in range(decoder.num_layers) for kind in UNIT_KINDS]
    stats = walk(decoder, calib[:32], collect=units, progress=False)
    ranks = dict(zip(UNIT_KINDS, default_ranks(decoder.hidden_size)))
    candidates = {u: _as_bypass(reduced_rank_fit(stats[u].moments(), ranks[u[0]], 1e-3)) for u in units}
    kl = {name: output_effects(decoder, calib[a:b], {}, candidates) for name, (a, b) in PROBES.items()}
    ref = kl[REFERENCE]
    print("| probe | attention KL / reference | FeedForward KL / reference | Spearman vs reference | 16 safest units |")
    print("|---|---:|---:|---:|---|")
    for name, scores in kl.items():
        ratio = {k: sum(scores[u] for u in units if u[0] == k) / sum(ref[u] for u in units if u[0] == k)
                 for k in UNIT_KINDS}
        safest = " ".join(f"{k}.{i}" for k, i in sorted(units, key=scores.get)[:16])
        print(f"| {name} | {ratio['attn']:.3f} | {ratio['ffn']:.3f} | {spearman(scores, ref):.3f} | {safest} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
