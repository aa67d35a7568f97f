"""Built-in scorer vs lm-evaluation-harness on the same examples: acc and acc_norm per task, the
examples they score differently, and the wall time of each engine on the same work.

    python bench/lm_eval/agreement.py [--plan PLAN_DIR] [--limit 300] --out bench/results/lm_eval_agreement_smollm2

Both engines run the plan's reference executor (CPU) on the same loaded model, column by column
(dense, then the plan): the built-in `subfit.evaluation.evaluate` on the task files, then lm-eval
(`subfit.harness.SubfitLM`) on the same files through bench/tasks. lm-eval's time is split into the
model's requests and the rest (task building, metrics, bootstrap of standard errors). Where
acc_norm differs, lm-eval's per-choice log-likelihoods are scored again with the built-in's
length normaliser (characters of the continuation with its leading space), which tells a
normaliser difference from a scoring difference.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import lm_eval  # noqa: E402

from subfit.evaluation import evaluate  # noqa: E402
from subfit.harness import (SubfitLM, build_executor, default_max_length, load_base, stop_token_ids,  # noqa: E402
                            task_manager, task_report)
from subfit.plan import Plan  # noqa: E402

TASKS = ("piqa", "arc_easy", "arc_challenge", "winogrande", "lambada_openai")


class Clock:
    """Wall and CPU seconds (all threads of this process: robust to other jobs on a shared machine)."""

    def __init__(self):
        self.wall = self.cpu = 0.0

    def __enter__(self):
        self._start = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall += time.perf_counter() - self._start[0]
        self.cpu += time.process_time() - self._start[1]

    def seconds(self) -> dict:
        return {"wall_s": round(self.wall, 1), "cpu_s": round(self.cpu, 1)}


def timed_requests(lm: SubfitLM) -> Clock:
    """Accumulate the time lm-eval spends inside the model's request methods."""
    clock = Clock()
    for name in ("loglikelihood", "loglikelihood_rolling", "generate_until"):
        method = getattr(lm, name)

        def timed(*args, _method=method, **kwargs):
            with clock:
                return _method(*args, **kwargs)

        setattr(lm, name, timed)
    return clock


def builtin_norm_outcomes(samples: list[dict]) -> list[int]:
    """acc_norm from lm-eval's own log-likelihoods, normalised like the built-in scorer."""
    outcomes = []
    for sample in sorted(samples, key=lambda s: s["doc_id"]):
        lls = [float(ll) for ll, _ in sample["filtered_resps"]]
        lengths = [len(" " + choice) for choice in sample["doc"]["choices"]]
        normed = [ll / n for ll, n in zip(lls, lengths)]
        outcomes.append(int(max(range(len(normed)), key=normed.__getitem__) == int(sample["target"])))
    return outcomes


def compare_column(hf_model, tokenizer, plan: Plan | None, limit: int, batch_size: int, assets: Path) -> dict:
    """Both engines on one column (the dense model, or `plan` on it)."""
    max_length = default_max_length(hf_model.config)
    files = [assets / "data" / "mc_eval" / f"{task}.jsonl" for task in TASKS]
    executor = build_executor("reference", hf_model, plan, tokenizer, max_length)
    with Clock() as builtin_clock:
        builtin = evaluate(executor.model, tokenizer, tasks=files, limit=limit, batch_size=batch_size, progress=False)

    lm = SubfitLM(executor, tokenizer, stop_ids=stop_token_ids(hf_model, tokenizer), max_length=max_length,
                  batch_size=batch_size)
    model_clock = timed_requests(lm)
    local = [f"{task}_local" for task in TASKS]
    with Clock() as lm_eval_clock:
        results = lm_eval.simple_evaluate(model=lm, tasks=local, limit=limit, log_samples=True,
                                          task_manager=task_manager(local, ROOT / "bench" / "tasks"))
    rows = []
    for task in TASKS:
        samples = results["samples"][f"{task}_local"]
        ours, theirs = builtin["tasks"][task], task_report(results, f"{task}_local", samples)
        for metric, outcomes in (("acc", "correct"), ("acc_norm", "correct_norm")):
            if metric not in theirs:  # lm-eval's winogrande and lambada report acc only
                continue
            row = {"task": task, "metric": metric, "n": theirs["n"], "builtin": ours[metric],
                   "lm_eval": theirs[metric], "diff_points": 100 * (theirs[metric] - ours[metric]),
                   "differing_examples": sum(a != b for a, b in zip(ours[outcomes], theirs[outcomes]))}
            if metric == "acc_norm":
                renormed = builtin_norm_outcomes(samples)
                row["differing_with_builtin_normaliser"] = sum(a != b for a, b in zip(ours[outcomes], renormed))
            rows.append(row)
    return {"rows": rows, "builtin": builtin_clock.seconds(), "lm_eval": lm_eval_clock.seconds(),
            "lm_eval_requests": model_clock.seconds()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plan", default=None, help="plan directory: its column is scored after the dense one")
    parser.add_argument("--limit", type=int, default=300, help="first N examples per task (default 300)")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per forward, both engines (default 16)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: CPU seconds then measure work, not spinning on a busy machine)")
    parser.add_argument("--out", required=True,
                        help="OUT.json; columns it already holds with the same settings are kept, not scored again")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    assets = Path(os.environ.get("SUBFIT_ASSETS", ROOT.parent / "shared" / "assets"))
    out = Path(args.out + ".json")
    settings = {"limit": args.limit, "batch_size": args.batch_size, "threads": args.threads,
                "lm_eval": lm_eval.__version__, "torch": torch.__version__}
    report = json.loads(out.read_text()) if out.exists() else {}
    if report.get("settings") != settings:
        report = {"settings": settings, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "commands": [],
                  "columns": {}}
    report["commands"].append(" ".join(["python", *sys.argv]))
    plan = Plan.load(args.plan) if args.plan else None
    hf_model, tokenizer = load_base(plan, None, "cpu", "float32")
    for column, column_plan in (("dense", None), *((("plan", plan),) if plan is not None else ())):
        tag = args.plan if column == "plan" else None
        if column in report["columns"] and report["columns"][column]["plan"] == tag:
            continue
        report["columns"][column] = {"plan": tag,
                                     **compare_column(hf_model, tokenizer, column_plan, args.limit, args.batch_size,
                                                      assets)}
        out.write_text(json.dumps(report, indent=1) + "\n")
        print(json.dumps({column: report["columns"][column]}, indent=1), flush=True)


if __name__ == "__main__":
    main()
