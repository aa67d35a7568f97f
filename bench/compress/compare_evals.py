"""Plans scored on the same text and examples (`subfit eval PLAN --json FILE`), compared with the first.

`python bench/compress/compare_evals.py FIRST.json OTHER.json [...] [--dense DENSE.json]` prints, per
report, its perplexity over the dense model's and, where it scored tasks, its 5-task retention (% of
the dense accuracies, with one standard error); then each other report against the first: the
perplexity ratio (standard error of its log, windows as the units) and the retention difference
with its paired standard error, from the per-example differences. Two plans get most examples alike,
so the paired error is smaller than either plan's own; a difference inside two of them is not
resolved by these examples. `--dense` is the sweep's results (raw WikiText-2 and the tasks, the
default) or a `subfit eval --json` report of the dense model on the reports' text.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from subfit.evaluation import paired_difference, perplexity_ratio

DENSE = Path(__file__).resolve().parents[1] / "results" / "accuracy300_smollm2.json"
DENSE_TEXT = "wiki.test.raw"  # what the sweep's dense perplexity scored (WikiText-2 raw test)


def load_report(path: str | Path) -> dict:
    """The plan's column of a `subfit eval --json` report (its perplexity and any tasks); anything
    else is refused, naming the file and how to make one."""
    try:
        column = json.loads(Path(path).read_text())["columns"]["compressed"]
        column["perplexity"]["window_nll"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise ValueError(f"{path} is not a readable `subfit eval PLAN --ppl FILE [--tasks ...] --json {path}` report "
                         "of a plan; make one with that command.") from None
    return column


def load_dense(path: str | Path) -> dict:
    """The dense model's perplexity ("ppl") and task accuracies ("tasks", named without "_local"),
    from the sweep's results or from a `subfit eval --json` report of the dense model."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ValueError(f"--dense {path}: {e.strerror}.") from None
    try:
        data = json.loads(text)
        if "dense" in data:
            return {"file": DENSE_TEXT, **data["dense"]}
        column = data["columns"]["dense"]
        return {"ppl": column["perplexity"]["ppl"], "file": column["perplexity"]["file"],
                "tasks": {_task(t): r for t, r in column.get("tasks", {}).items()}}
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ValueError(f"--dense {path}: neither the sweep's results nor a `subfit eval --ppl FILE --json {path}` "
                         "report of the dense model (no target plan).") from None


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


def check_same_text(reports: list[dict], dense: dict) -> None:
    """Ratios of perplexities on different texts mean nothing: refuse them, naming the files."""
    files = {Path(r["perplexity"]["file"]).name for r in reports + [{"perplexity": dense}]}
    if len(files) > 1:
        raise ValueError(f"The reports scored different texts ({', '.join(sorted(files))}); compare reports of one "
                         f"text, with --dense scored on it too.")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reports", nargs="+", help="`subfit eval --json` reports; the first is the reference")
    parser.add_argument("--dense", default=str(DENSE),
                        help="the sweep's results, or a `subfit eval --json` report of the dense model")
    args = parser.parse_args(argv)
    try:
        dense = load_dense(args.dense)
        reports = [load_report(path) for path in args.reports]
        check_same_text(reports, dense)
    except ValueError as e:
        parser.error(str(e))
    print("| report | perplexity, x dense | 5-task retention | against the first: perplexity ratio | retention difference (paired) |")
    print("|---|---:|---:|---:|---:|")
    first = reports[0]
    for path, report in zip(args.reports, reports):
        has_tasks = bool(report.get("tasks")) and bool(dense.get("tasks"))  # retention needs the dense accuracies
        row = f"| {path} | {report['perplexity']['ppl'] / dense['ppl']:.3f}x |"
        row += " {:.1f}% ± {:.1f} |".format(*retention(report, dense["tasks"])) if has_tasks else " – |"
        if report is first:
            print(row + " – | – |")
            continue
        ratio, log_stderr = perplexity_ratio(report["perplexity"], first["perplexity"])
        row += f" {ratio:.3f} (log ± {log_stderr:.3f}) |"
        if has_tasks and first.get("tasks"):
            row += " {:+.1f} ± {:.1f} points |".format(*retention_difference(report, first, dense["tasks"]))
        else:
            row += " – |"
        print(row)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
