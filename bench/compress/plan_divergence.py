"""How far plans lie from the dense model on text compress could see: the criteria a draw could be
chosen by, to set beside what the tasks say of the same plans.

`python bench/compress/plan_divergence.py PLAN [PLAN ...] --text held-out --calib FILE --seed S
[--model M]`
scores each plan on the calibration sequences compress holds out at seed S to choose between its
draws; `--text self --seed S` on sequences sampled from the dense model (domain-general text, drawn
as `subfit compress` without --calib draws its calibration). Per plan: the next-token loss of the
text (nats a token, the held-out criterion compress uses) and KL(dense || plan) a token. Matmuls run
in bf16 where the CPU has bf16 units, as compress's own held-out loss does.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from subfit import calibration, models
from subfit.config import SubFitConfig
from subfit.evaluation import perplexity
from subfit.hardware import bf16_matmuls
from subfit.plan import Plan
from subfit.reference import ReferenceModel
from subfit.selection import validation_split


def scoring_text(model, tokenizer, text: str, calib: str | None, seed: int, samples: int, length: int) -> torch.Tensor:
    """The token ids [N, L] the plans are scored on."""
    if text == "self":
        return calibration.load_calibration(None, model, tokenizer, samples, length, seed)
    config = SubFitConfig(seed=seed)
    size = config.calibration_size(False, models.max_positions(model.config))
    ids = calibration.load_calibration(calib, model, tokenizer, *size, seed)
    return validation_split(ids, config.selection_draws, seed)[1]


def divergence(dense: ReferenceModel, plans: dict[str, ReferenceModel], ids: torch.Tensor) -> dict[str, dict[str, float]]:
    """Next-token loss and KL(dense || plan), both per predicted token: `evaluation.perplexity`
    with the dense model beside it, one window per sequence; the dense logits of a sequence are
    computed once and shared by every plan."""
    scored = {name: [] for name in plans}
    with bf16_matmuls("cpu"):
        for row in ids:
            dense_logits = dense(row[None])
            for name, compressed in plans.items():
                scored[name].append(perplexity(compressed, row, window=row.numel(),
                                               dense_fn=lambda _: dense_logits, progress=False))
    results = {}
    for name, rows in scored.items():
        tokens = sum(r["tokens"] for r in rows)
        results[name] = {"nll": sum(sum(r["window_nll"]) for r in rows) / tokens,
                         "kl": sum(r["kl"] * r["tokens"] for r in rows) / tokens}
    return results


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("plans", nargs="+", help="plan folders (plan.json + bypass.safetensors)")
    parser.add_argument("--model", help="the base model the plans were made from (default: the embedded SmolLM2)")
    parser.add_argument("--text", choices=["held-out", "self"], required=True)
    parser.add_argument("--calib", help="the calibration file the plans were made on (--text held-out)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples", type=int, default=32, help="sequences sampled with --text self")
    parser.add_argument("--length", type=int, default=256, help="their length in tokens")
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args(argv)
    if args.text == "held-out" and not args.calib:
        parser.error("--text held-out scores the sequences compress held out of its calibration: give --calib FILE.")
    try:  # a bad plan, model, calibration file or size: say what, before any scoring
        loaded = {path: Plan.load(path) for path in args.plans}
        model, tokenizer, _ = models.load(args.model)
        plans = {path: ReferenceModel(model, plan) for path, plan in loaded.items()}  # checks each plan's base
        ids = scoring_text(model, tokenizer, args.text, args.calib, args.seed, args.samples, args.length)
    except (ValueError, OSError) as e:
        parser.error(str(e))
    results = divergence(ReferenceModel(model), plans, ids)
    print(f"| plan | next-token loss, nats | KL(dense || plan), nats |  ({args.text} text, {ids.shape[0]} x {ids.shape[1]} tokens)")
    print("|---|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | {r['nll']:.4f} | {r['kl']:.4f} |")
    if args.json:
        record = {"command": "python bench/compress/plan_divergence.py " + " ".join(argv),
                  "text": args.text, "tokens": list(ids.shape), "plans": results}
        Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
