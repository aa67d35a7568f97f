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


def compare(plan_dir: str | None, limit: int, batch_size: int, assets: Path) -> dict:
    plan = Plan.load(plan_dir) if plan_dir else None
    hf_model, tokenizer, _ = load_base(plan, None, "cpu", "float32")
    max_length = default_max_length(hf_model.config)
    files = [assets / "data" / "mc_eval" / f"{task}.jsonl" for task in TASKS]
    index = task_manager([f"{t}_local" for t in TASKS], ROOT / "bench" / "tasks")
    columns = {"dense": None, **({"plan": plan} if plan is not None else {})}
    out: dict = {}
    for column, column_plan in columns.items():
        executor = build_executor("reference", hf_model, column_plan, tokenizer, max_length)
        with Clock() as builtin_clock:
            builtin = evaluate(executor.model, tokenizer, tasks=files, limit=limit, batch_size=batch_size, progress=False)

        lm = SubfitLM(executor, tokenizer, stop_ids=stop_token_ids(hf_model, tokenizer), max_length=max_length,
                      batch_size=batch_size)
        model_clock = timed_requests(lm)
        with Clock() as lm_eval_clock:
            results = lm_eval.simple_evaluate(model=lm, tasks=[f"{t}_local" for t in TASKS], limit=limit,
                                              task_manager=index, log_samples=True)

        rows = []
        for task in TASKS:
            ours, theirs = builtin["tasks"][task], task_report(results, f"{task}_local", results["samples"][f"{task}_local"])
            for metric, outcomes in (("acc", "correct"), ("acc_norm", "correct_norm")):
                if metric not in theirs:  # lm-eval's winogrande and lambada report acc only
                    continue
                row = {"task": task, "metric": metric, "n": theirs["n"], "builtin": ours[metric],
                       "lm_eval": theirs[metric], "diff_points": 100 * (theirs[metric] - ours[metric]),
                       "differing_examples": sum(a != b for a, b in zip(ours[outcomes], theirs[outcomes]))}
                if metric == "acc_norm":
                    renormed = builtin_norm_outcomes(results["samples"][f"{task}_local"])
                    row["differing_with_builtin_normaliser"] = sum(a != b for a, b in zip(ours[outcomes], renormed))
                rows.append(row)
        out[column] = {"rows": rows, "builtin": builtin_clock.seconds(), "lm_eval": lm_eval_clock.seconds(),
                       "lm_eval_requests": model_clock.seconds()}
        print(json.dumps({column: out[column]}, indent=1), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plan", default=None, help="plan directory (its dense base is scored too)")
    parser.add_argument("--limit", type=int, default=300, help="first N examples per task (default 300)")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per forward, both engines (default 16)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: CPU seconds then measure work, not spinning on a shared machine)")
    parser.add_argument("--out", required=True, help="write OUT.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    assets = Path(os.environ.get("SUBFIT_ASSETS", ROOT.parent / "shared" / "assets"))
    columns = compare(args.plan, args.limit, args.batch_size, assets)
    report = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "plan": args.plan, "limit": args.limit,
              "batch_size": args.batch_size, "lm_eval": lm_eval.__version__, "torch": torch.__version__,
              "threads": torch.get_num_threads(), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
              "columns": columns}
    Path(args.out + ".json").write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
