"""Plans scored on the same text and examples (`subfit eval PLAN --json FILE`), compared with the first.

`python bench/compress/compare_evals.py FIRST.json OTHER.json [...]` prints, per report, its WikiText-2
perplexity over the dense model's and its 5-task retention (% of the dense accuracies in `--dense`,
with one standard error), then each other report against the first: the perplexity ratio (standard
error of its log, windows as the units) and the retention difference with its paired standard error,
from the per-example differences. Two plans get most examples alike, so the paired error is smaller
than either plan's own; a difference inside two of them is not resolved by these examples.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from subfit.evaluation import paired_difference, perplexity_ratio

DENSE = Path(__file__).resolve().parents[1] / "results" / "accuracy300_smollm2.json"


def load_report(path: str | Path) -> dict:
    """The plan's column of a `subfit eval --json` report (its perplexity and tasks); anything else
    is refused, naming the file and how to make one."""
    try:
        column = json.loads(Path(path).read_text())["columns"]["compressed"]
        column["perplexity"]["window_nll"], column["tasks"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ValueError(f"{path} is not a readable `subfit eval PLAN --ppl FILE --tasks ... --json {path}` report "
                         "of a plan; make one with that command.") from None
    return column


def _task(name: str) -> str:
    return name.removesuffix("_local")


def retention(report: dict, dense: dict) -> tuple[float, float]:
    """Mean over tasks of 100 x accuracy / dense accuracy, and its binomial standard error."""
    tasks = report["tasks"]
    scale = {t: 100 / dense[_task(t)]["acc"] / len(tasks) for t in tasks}
    mean = sum(scale[t] * r["acc"] for t, r in tasks.items())
    variance = sum((scale[t]) ** 2 * r["acc"] * (1 - r["acc"]) / r["n"] for t, r in tasks.items())
    return mean, math.sqrt(variance)


def retention_difference(report: dict, first: dict, dense: dict) -> tuple[float, float]:
    """Retention of `report` minus `first` on the same examples, with its paired standard error."""
    tasks = first["tasks"]
    if set(report["tasks"]) != set(tasks):
        raise ValueError(f"The reports score different tasks: {sorted(report['tasks'])} against {sorted(tasks)}.")
    total, variance = 0.0, 0.0
    for t in tasks:
        diff, stderr = paired_difference(report["tasks"][t], tasks[t])
        scale = 100 / dense[_task(t)]["acc"] / len(tasks)
        total, variance = total + scale * diff, variance + (scale * stderr) ** 2
    return total, math.sqrt(variance)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reports", nargs="+", help="`subfit eval --json` reports; the first is the reference")
    parser.add_argument("--dense", default=str(DENSE), help="JSON whose ['dense'] holds the dense model's ppl and tasks")
    args = parser.parse_args(argv)
    try:
        dense = json.loads(Path(args.dense).read_text())["dense"]
        reports = [load_report(path) for path in args.reports]
    except (OSError, ValueError, KeyError) as e:
        parser.error(str(e) if isinstance(e, ValueError) else f"--dense {args.dense}: no ['dense'] results in it ({e}).")
    print("| report | WikiText-2, x dense | 5-task retention | against the first: perplexity ratio | retention difference (paired) |")
    print("|---|---:|---:|---:|---:|")
    for path, report in zip(args.reports, reports):
        mean, stderr = retention(report, dense["tasks"])
        row = f"| {path} | {report['perplexity']['ppl'] / dense['ppl']:.3f}x | {mean:.1f}% ± {stderr:.1f} |"
        if report is reports[0]:
            print(row + " – | – |")
            continue
        ratio, log_stderr = perplexity_ratio(report["perplexity"], reports[0]["perplexity"])
        diff, diff_stderr = retention_difference(report, reports[0], dense["tasks"])
        print(row + f" {ratio:.3f} (log ± {log_stderr:.3f}) | {diff:+.1f} ± {diff_stderr:.1f} points |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
