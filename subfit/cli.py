"""`subfit` command line: compress | eval | sweep (and the runtime's generate | bench)."""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from subfit.argtypes import BAD_INPUT, ArgumentParser, positive_int, refuse, sparsity
from subfit.files import check_output, write_json
from subfit.methods import BASELINES, METHODS
from subfit.runtime.cli import add_commands as add_runtime_commands

console = Console(stderr=True)

COMPRESS_EXAMPLES = """examples:
  subfit compress --sparsity 0.25 --out plans/smollm2-25          # default model, text sampled from it
  subfit compress HuggingFaceTB/SmolLM2-135M --sparsity 0.25 --calib wiki.txt --out plans/s25
  subfit compress ./my-llama --sparsity 0.375 --calib hf:wikitext:wikitext-2-raw-v1:train --device cuda --out plans/l375
  subfit compress HuggingFaceTB/SmolLM2-135M --method shortgpt --sparsity 0.25 --calib wiki.txt --out plans/sg25
"""
EVAL_EXAMPLES = """examples:
  subfit eval plans/smollm2-25 --ppl wiki.test.raw --window 1024 --max-tokens 16384
  subfit eval plans/smollm2-25 --tasks piqa arc_easy --limit 300 --json report.json   # lm-eval tasks
  subfit eval plans/smollm2-25 --tasks piqa_local --include-path bench/tasks  # offline: local task files
  subfit eval HuggingFaceTB/SmolLM2-135M --ppl wiki.test.raw                # a dense model alone
"""


def add_compress(sub) -> None:
    from subfit.config import SAMPLED_CALIBRATION, TEXT_CALIBRATION

    p = sub.add_parser("compress", help="compress a model into a SubFit plan", epilog=COMPRESS_EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default=None,
                   help="Hugging Face id, folder or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--sparsity", type=sparsity, required=True,
                   help="fraction of transformer-block parameters to remove, e.g. 0.125 0.25 0.375")
    p.add_argument("--calib", default=None,
                   help="calibration text file, or hf:ID[:CONFIG[:SPLIT]]; default: text sampled from the model")
    p.add_argument("--calib-samples", type=positive_int, default=None,
                   help=f"calibration sequences (default {TEXT_CALIBRATION[0]} of text, {SAMPLED_CALIBRATION[0]} "
                        f"sampled from the model)")
    p.add_argument("--calib-len", type=positive_int, default=None,
                   help=f"tokens per sequence (default {TEXT_CALIBRATION[1]} of text, {SAMPLED_CALIBRATION[1]} sampled)")
    p.add_argument("--seed", type=int, default=None, help="seed of calibration sampling and selection draws (default 0)")
    p.add_argument("--attn-rank", type=positive_int, default=None, help="attention bypass rank (default hidden/8)")
    p.add_argument("--ffn-rank", type=positive_int, default=None,
                   help="rank of the FeedForward bypasses' shared input basis (default hidden/2)")
    p.add_argument("--selection-draws", type=positive_int, default=None,
                   help="greedy selections on other scoring sequences; the plan with the least loss on held-out "
                        "calibration is kept (default 3; 1 is about a third of the time)")
    p.add_argument("--method", default="subfit", choices=list(METHODS),
                   help="subfit (default) or a baseline to compare with: " + ", ".join(BASELINES))
    p.add_argument("--device", default=None, help="device of the layer-by-layer walk, e.g. cuda (default: cpu)")
    p.add_argument("--out", required=True, help="plan directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing plan in --out")
    p.set_defaults(run=run_compress)


CONFIG_OPTIONS = ("calib_samples", "calib_len", "seed", "attn_rank", "ffn_rank", "selection_draws", "device")


def run_compress(args) -> int:
    from subfit.calibration import SELF, read_text
    from subfit.config import SubFitConfig
    from subfit.plan import PLAN_FOLDER

    # Everything is checked before the model loads, by the checks the Python API makes.
    out = Path(args.out)
    check_output(out, overwrite=args.overwrite, folder=PLAN_FOLDER)
    if args.calib not in (None, SELF) and not args.calib.startswith("hf:"):
        read_text(args.calib, "Calibration file")
    given = {name: getattr(args, name) for name in CONFIG_OPTIONS if getattr(args, name) is not None}
    if args.method != "subfit":
        subfit_only = sorted(f"--{n.replace('_', '-')}" for n in given if n in ("attn_rank", "ffn_rank", "selection_draws"))
        if subfit_only:
            raise ValueError(f"{', '.join(subfit_only)} are SubFit options; they do not apply to --method "
                             f"{args.method}: leave them out.")
        given["selection_draws"] = 1  # a baseline makes one selection: hold nothing out
    config = SubFitConfig(**given)
    start = time.time()
    from subfit import models
    from subfit.runtime import cpu_kernels

    if args.calib in (None, SELF):  # text sampled from the model decodes on the CPU: a first build overlaps the load
        cpu_kernels.build_in_background()
    model, tokenizer, source = models.load(args.model)
    if args.method == "subfit":
        from subfit.compression import compress

        plan = compress(model, args.sparsity, args.calib, tokenizer=tokenizer, config=config)
    else:
        from subfit import calibration
        from subfit.baselines import compress_baseline

        size = config.calibration_size(args.calib is None, models.max_positions(model.config))
        calib_ids = calibration.load_calibration(args.calib, model, tokenizer, *size, config.seed)
        plan = compress_baseline(model, args.method, args.sparsity, calib_ids, source=source,
                                 calib_info=calibration.describe(args.calib, calib_ids, config.seed),
                                 device=config.device)
    plan.save(out, overwrite=args.overwrite)
    acc = plan.accounting()
    table = Table(title=f"{args.method} plan -> {out}  ({time.time() - start:.0f} s)")
    for col in ("quantity", "value"):
        table.add_column(col)
    rows = [
        ("sparsity (removed / block params)", f"{acc['sparsity']:.4f}  (target {args.sparsity})"),
        ("removed units", f"{acc['removed_attn']} attention, {acc['removed_ffn']} feedforward"),
        ("removed parameters", f"{acc['removed_params']:,}"),
        ("bypass parameters", f"{acc['bypass_params']:,}"),
        ("net sparsity", f"{acc['net_sparsity']:.4f}"),
        ("KV cache reduction", f"{acc['kv_reduction']:.1%}"),
        ("layers (a/f bypassed, A/F deleted)", plan.layer_map()),
    ]
    for row in rows:
        table.add_row(*row)
    console.print(table)
    return 0


def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="perplexity and agreement with the dense model; lm-evaluation-harness tasks",
                       epilog=EVAL_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", nargs="?", default=None,
                   help="plan directory, or a model (id/folder/.gguf; default the embedded SmolLM2)")
    p.add_argument("--ppl", default=None, help="text file for perplexity")
    p.add_argument("--window", type=positive_int, default=None,
                   help="perplexity window in tokens (default 1024, or the model's positions if fewer)")
    p.add_argument("--stride", type=positive_int, default=None, help="perplexity stride (default: the window)")
    p.add_argument("--max-tokens", type=positive_int, default=None, help="score only the first N tokens of --ppl")
    p.add_argument("--tasks", "--lm-eval", nargs="+", default=None, metavar="TASK",
                   help="lm-evaluation-harness tasks (needs pip install -e \".[eval]\")")
    p.add_argument("--include-path", default=None, help="folder of extra lm-eval task YAMLs, e.g. bench/tasks")
    p.add_argument("--limit", type=positive_int, default=None, help="first N examples of each task")
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples per task (default: the task's)")
    p.add_argument("--batch-size", type=positive_int, default=16, help="sequences per forward (default 16)")
    p.add_argument("--base", default=None, help="base model location, when the plan's has moved")
    p.add_argument("--no-dense", action="store_true", help="for a plan: skip the dense model's column")
    p.add_argument("--json", default=None, help="write the report as JSON here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    p.set_defaults(run=run_eval)


def run_eval(args) -> int:
    """Perplexity through `subfit.evaluation`, tasks through lm-eval (`subfit.harness`), both on one
    loaded base model, dense and compressed columns side by side with paired differences."""
    from subfit import models
    from subfit.evaluation import check_inputs, evaluate
    from subfit.plan import Plan
    from subfit.reference import ReferenceModel

    # Everything is checked before the model loads (the window against its positions once it has).
    if args.ppl is None and not args.tasks:
        raise ValueError("nothing to evaluate: give --ppl FILE and/or --tasks TASK... (lm-eval task names)")
    if args.json:
        check_output(args.json, overwrite=args.overwrite)
    settings = dict(ppl=args.ppl, window=args.window, stride=args.stride, max_tokens=args.max_tokens)
    check_inputs(**settings)
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise ValueError(f"--num-fewshot {args.num_fewshot}: give 0 or more examples.")
    task_index = None
    if args.tasks:
        try:
            from subfit import harness
        except ModuleNotFoundError as e:
            raise ValueError(f"--tasks: {e}") from None
        task_index = harness.task_manager(args.tasks, args.include_path)
    is_plan = args.target is not None and (Path(args.target) / "plan.json").exists()
    plan = Plan.load(args.target) if is_plan else None
    if plan is not None:
        model, tokenizer, _ = models.load_base(plan.base, args.base)
    else:
        model, tokenizer, _ = models.load(args.target)
    columns = {"dense": None} if plan is None or not args.no_dense else {}
    if plan is not None:
        columns["compressed"] = plan
    report: dict = {"target": args.target or "default", "columns": {}, "seconds": {}}
    if plan is not None:
        report["accounting"] = plan.accounting()
        report["removed_units"] = plan.removed_units()
    if args.tasks:
        report["lm_eval"] = {"version": harness.lm_eval.__version__, "tasks": args.tasks, "limit": args.limit,
                             "num_fewshot": args.num_fewshot}
    dense_fn = ReferenceModel(model) if plan is not None and not args.no_dense else None
    for name, column_plan in columns.items():
        console.print(f"[bold]evaluating {name}[/bold]")
        start = time.perf_counter()
        column: dict = {}
        if args.ppl is not None:
            column = evaluate(ReferenceModel(model, column_plan), tokenizer,
                              dense_fn=dense_fn if column_plan is not None else None, **settings)
        if args.tasks:
            column["tasks"] = harness.score_tasks(model, tokenizer, column_plan, args.tasks, limit=args.limit,
                                                  num_fewshot=args.num_fewshot, task_index=task_index,
                                                  batch_size=args.batch_size)
        report["columns"][name] = column
        report["seconds"][name] = round(time.perf_counter() - start, 3)
    if args.tasks and {"dense", "compressed"} <= set(report["columns"]):
        report["paired"] = harness.paired_differences(report["columns"]["compressed"]["tasks"],
                                                      report["columns"]["dense"]["tasks"])
    return show_report(report, args.json, args.overwrite)


def show_report(report: dict, json_path: str | None, overwrite: bool = False) -> int:
    console.print(report_table(report))
    if json_path:
        write_json(json_path, report, overwrite=overwrite)
        console.print(f"report written to {json_path}")
    return 0


def report_table(report: dict) -> Table:
    """Rows: metrics; columns: dense / compressed. Where a dense column was scored on the same
    windows and examples, the compressed column also shows its paired difference from it."""
    from subfit.evaluation import OUTCOMES, paired_difference, perplexity_ratio

    columns = report["columns"]
    dense = columns.get("dense")
    table = Table(title="subfit eval")
    table.add_column("metric")
    for name in columns:
        table.add_column(name, justify="right")
    metrics: list[tuple[str, callable]] = []
    first = next(iter(columns.values()))

    def against_dense(fn):
        return lambda r: "" if r is dense else fn(r)

    if "perplexity" in first:
        metrics.append(("perplexity", lambda r: f"{r['perplexity']['ppl']:.2f}"))
        if dense is not None and len(columns) > 1:
            metrics.append(("perplexity / dense", against_dense(
                lambda r: "{:.3f} (log ± {:.3f})".format(*perplexity_ratio(r["perplexity"], dense["perplexity"])))))
        if "kl" in list(columns.values())[-1].get("perplexity", {}):
            metrics.append(("KL(dense||model)", lambda r: f"{r['perplexity'].get('kl', 0.0):.4f}"))
            metrics.append(("top-1 agreement", lambda r: f"{r['perplexity'].get('top1_agreement', 1.0):.3f}"))
    for task, result in first.get("tasks", {}).items():
        for metric in [m for m in result if m + "_stderr" in result]:  # acc, acc_norm; lm-eval's other metrics
            metrics.append((f"{task} {metric}", lambda r, t=task, m=metric:
                            f"{r['tasks'][t][m]:.3f} ± {r['tasks'][t][m + '_stderr']:.3f}"))
            outcomes = OUTCOMES.get(metric)
            if dense is not None and len(columns) > 1 and outcomes in result:
                metrics.append((f"{task} {metric} - dense", against_dense(
                    lambda r, t=task, m=metric: "{:+.3f} ± {:.3f}".format(
                        *paired_difference(r["tasks"][t], dense["tasks"][t], m)))))
    for label, fmt in metrics:
        table.add_row(label, *[fmt(r) for r in columns.values()])
    return table


SWEEP_SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "sweep" / "sweep.py"


def add_sweep(sub) -> None:
    p = sub.add_parser("sweep", add_help=False, prefix_chars="\0",
                       help="every method at every sparsity level, compared (source checkout: bench/sweep)")
    p.add_argument("args", nargs=argparse.REMAINDER)
    p.set_defaults(run=run_sweep)


def run_sweep(args) -> int:
    """The sweep is a research tool that ships with the source repository (it draws plots and
    reads the benchmark assets), not with the package: run it from the checkout."""
    if not SWEEP_SCRIPT.is_file():
        raise FileNotFoundError("`subfit sweep` runs bench/sweep/sweep.py from a source checkout of subfit, and this "
                                "installation has none. Clone the repository and `pip install -e \".[dev]\"` there.")
    return subprocess.call([sys.executable, str(SWEEP_SCRIPT), *args.args])


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="subfit", description="SubFit compression and fast decode of LLMs.")
    sub = parser.add_subparsers(dest="command", required=True)
    add_compress(sub)
    add_eval(sub)
    add_sweep(sub)
    add_runtime_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except BAD_INPUT as e:  # bad input: one line saying what is wrong and what to do, no traceback
        return refuse(f"subfit {args.command}", e)


if __name__ == "__main__":
    sys.exit(main())
