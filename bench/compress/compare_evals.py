"""Plans scored on the same text and examples (`subfit eval PLAN --json FILE`), compared with the first.

`python bench/compress/compare_evals.py FIRST.json OTHER.json [...] [--dense DENSE.json]` prints, per
report, its perplexity over the dense model's and, where it scored tasks, its 5-task retention (% of
the dense accuracies, with one standard error); then each other report against the first: the
perplexity ratio (standard error of its log, windows as the units) and the retention difference
with its paired standard error, from the per-example differences. Two plans get most examples alike,
so the paired error is smaller than either plan's own; a difference inside two of them is not
resolved by these examples. `--per-task` adds each task's paired difference. `--pairs` reads the
reports as pairs (FIRST_1 OTHER_1 FIRST_2 OTHER_2 ...: say two codes' plans at several seeds) and
prints each pair's retention difference and their mean, with its error from the examples and its
error from how far the pairs disagree: when plans rest on near-ties, the seed, not the example, is
what repeats, and only the second error says whether another seed would agree. `--dense` is the
sweep's results (raw WikiText-2 and the tasks, the default) or a `subfit eval --json` report of the
dense model on the reports' text.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sweep"))
from sweep import paired_against, sweep_tasks  # noqa: E402  (the sweep's paired statistics, one home)

DENSE = Path(__file__).resolve().parents[1] / "results" / "accuracy300_smollm2.json"
DENSE_TEXT = "wiki.test.raw"  # what the sweep's dense perplexity scored (WikiText-2 raw test)


def load_report(path: str | Path) -> dict:
    """The plan's column of a `subfit eval --json` report (its perplexity and any tasks, named as
    the sweep names them); anything else is refused, naming the file and how to make one."""
    try:
        column = json.loads(Path(path).read_text())["columns"]["compressed"]
        column["perplexity"]["window_nll"]
        return {**column, "tasks": sweep_tasks(column.get("tasks", {}))}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise ValueError(f"{path} is not a readable `subfit eval PLAN --ppl FILE [--tasks ...] --json {path}` report "
                         "of a plan; make one with that command.") from None


def load_dense(path: str | Path) -> dict:
    """The dense model's perplexity ("ppl"), the text it scored ("file") and its task accuracies
    ("tasks"), from the sweep's results or from a `subfit eval --json` report of the dense model."""
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
                "tasks": sweep_tasks(column.get("tasks", {}))}
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ValueError(f"--dense {path}: neither the sweep's results nor a `subfit eval --ppl FILE --json {path}` "
                         "report of the dense model (no target plan).") from None


def retention(report: dict, dense: dict) -> tuple[float, float]:
    """Mean over tasks of 100 x accuracy / dense accuracy, and its binomial standard error."""
    tasks = report["tasks"]
    scale = {t: 100 / dense["tasks"][t]["acc"] / len(tasks) for t in tasks}
    mean = sum(scale[t] * r["acc"] for t, r in tasks.items())
    variance = sum(scale[t] ** 2 * r["acc"] * (1 - r["acc"]) / r["n"] for t, r in tasks.items())
    return mean, math.sqrt(variance)


def against_first(report: dict, first: dict, dense: dict) -> dict:
    """`report` against `first` on the same windows and examples (`sweep.paired_against`): the
    perplexity ratio and, where both scored the same tasks, the retention difference."""
    if not dense["tasks"]:  # no dense accuracies to scale by: perplexity only
        report, first = {**report, "tasks": {}}, {**first, "tasks": {}}
    if set(report["tasks"]) != set(first["tasks"]):
        raise ValueError(f"The reports score different tasks: {sorted(report['tasks'])} against {sorted(first['tasks'])}.")
    return paired_against(report, first, dense, "acc")


def check_same_text(reports: list[dict], dense: dict) -> None:
    """Ratios of perplexities on different texts mean nothing: refuse them, naming the files."""
    files = {Path(r["perplexity"]["file"]).name for r in reports + [{"perplexity": dense}]}
    if len(files) > 1:
        raise ValueError(f"The reports scored different texts ({', '.join(sorted(files))}); compare reports of one "
                         f"text, with --dense scored on it too.")


def table(paths: list[str], reports: list[dict], dense: dict) -> list[str]:
    lines = ["| report | perplexity, x dense | 5-task retention | against the first: perplexity ratio | "
             "retention difference (paired) |", "|---|---:|---:|---:|---:|"]
    first = reports[0]
    for path, report in zip(paths, reports):
        row = f"| {path} | {report['perplexity']['ppl'] / dense['ppl']:.3f}x |"
        row += " {:.1f}% ± {:.1f} |".format(*retention(report, dense)) if report["tasks"] and dense["tasks"] else " – |"
        if report is first:
            lines.append(row + " – | – |")
            continue
        paired = against_first(report, first, dense)
        row += " {:.3f} (log ± {:.3f}) |".format(paired["ppl_ratio"], paired["ppl_ratio_log_stderr"])
        if "mean_retention_diff" in paired:
            row += " {:+.1f} ± {:.1f} points |".format(paired["mean_retention_diff"], paired["mean_retention_diff_stderr"])
        else:
            row += " – |"
        lines.append(row)
    return lines


def per_task_table(paths: list[str], reports: list[dict], dense: dict) -> list[str]:
    """Each other report's paired retention difference from the first, task by task: which tasks a
    5-task difference comes from."""
    tasks = list(reports[0]["tasks"])
    if not tasks or not dense["tasks"] or len(reports) < 2:
        raise ValueError("--per-task needs two or more reports that scored tasks, and a --dense with task accuracies.")
    lines = ["| against the first, points of dense accuracy (paired) | " + " | ".join(tasks) + " |",
             "|---|" + "---:|" * len(tasks)]
    for path, report in zip(paths[1:], reports[1:]):
        diffs = against_first(report, reports[0], dense)["retention_diff"]
        lines.append(f"| {path} | " + " | ".join("{diff:+.1f} ± {stderr:.1f}".format(**diffs[t]) for t in tasks) + " |")
    return lines


def over_pairs(paths: list[str], reports: list[dict], dense: dict) -> tuple[list[str], dict]:
    """Each (first, other) pair's paired retention difference, and their mean with two standard
    errors: from the examples (the pairs' paired errors combined) and between the pairs (their
    spread over the square root of their number)."""
    if len(reports) < 4 or len(reports) % 2 or not dense["tasks"]:
        raise ValueError("--pairs needs two or more pairs of reports (FIRST_1 OTHER_1 FIRST_2 OTHER_2 ...) that "
                         "scored tasks, and a --dense with task accuracies.")
    lines = ["| first | other | retention difference (paired) |", "|---|---|---:|"]
    diffs, errors = [], []
    for i in range(0, len(reports), 2):
        paired = against_first(reports[i + 1], reports[i], dense)
        diffs.append(paired["mean_retention_diff"])
        errors.append(paired["mean_retention_diff_stderr"])
        lines.append(f"| {paths[i]} | {paths[i + 1]} | {diffs[-1]:+.1f} ± {errors[-1]:.1f} points |")
    n, mean = len(diffs), sum(diffs) / len(diffs)
    summary = {"pairs": n, "mean_retention_diff": mean,
               "stderr_from_examples": math.sqrt(sum(e * e for e in errors)) / n,
               "stderr_between_pairs": math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1) / n)}
    lines.append("| mean of {pairs} pairs | | {mean_retention_diff:+.1f} ± {stderr_from_examples:.1f} (examples) "
                 "± {stderr_between_pairs:.1f} (between pairs) points |".format(**summary))
    return lines, summary


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reports", nargs="+", help="`subfit eval --json` reports; the first is the reference")
    parser.add_argument("--dense", default=str(DENSE),
                        help="the sweep's results, or a `subfit eval --json` report of the dense model")
    parser.add_argument("--per-task", action="store_true", help="also each task's paired retention difference")
    parser.add_argument("--pairs", action="store_true",
                        help="the reports are pairs (FIRST OTHER ...): each pair's difference and their mean")
    args = parser.parse_args(argv)
    if args.pairs and args.per_task:
        parser.error("--per-task compares every report with the first; --pairs compares within pairs: give one.")
    try:
        dense = load_dense(args.dense)
        reports = [load_report(path) for path in args.reports]
        check_same_text(reports, dense)
        if args.pairs:
            lines = over_pairs(args.reports, reports, dense)[0]
        else:
            lines = table(args.reports, reports, dense)
        if args.per_task:
            lines += [""] + per_task_table(args.reports, reports, dense)
    except ValueError as e:
        parser.error(str(e))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
