"""`subfit` command line: compress | eval | sweep (and the runtime's generate | bench)."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from subfit.runtime.cli import add_commands as add_runtime_commands, number, positive_int

console = Console(stderr=True)

COMPRESS_EXAMPLES = """examples:
  subfit compress --sparsity 0.25 --out plans/smollm2-25          # default model, self-generated calibration
  subfit compress --sparsity 0.25 --calib-samples 128 --score-samples 32 --selection-draws 1 --out plans/quick
                                                                  # a quick first plan on a CPU (one draw)
  subfit compress HuggingFaceTB/SmolLM2-135M --sparsity 0.25 --calib wiki.txt --out plans/s25
  subfit compress ./my-llama --sparsity 0.375 --calib hf:wikitext:wikitext-2-raw-v1:train --out plans/l375
  subfit compress HuggingFaceTB/SmolLM2-135M --method shortgpt --sparsity 0.25 --calib wiki.txt --out plans/sg25
  subfit compress HuggingFaceTB/SmolLM2-135M --granularity layer --sparsity 0.25 --calib wiki.txt --out plans/l25
"""
EVAL_EXAMPLES = """examples:
  subfit eval plans/smollm2-25 --ppl wiki.test.raw --window 1024 --max-tokens 16384
  subfit eval plans/smollm2-25 --tasks piqa.jsonl arc_easy.jsonl --limit 300 --json report.json
  subfit eval HuggingFaceTB/SmolLM2-135M --ppl wiki.test.raw                # a dense model alone
  subfit eval plans/smollm2-25 --lm-eval piqa arc_easy --limit 300           # lm-evaluation-harness tasks
  subfit eval plans/smollm2-25 --lm-eval piqa_local --include-path bench/tasks  # offline: local task files
"""


def _sparsity(text: str) -> float:
    from subfit.compression import MAX_SPARSITY

    return number(float, lambda v: 0.0 <= v <= MAX_SPARSITY,
                  f"a sparsity (fraction of transformer-block parameters) between 0 and {MAX_SPARSITY}, e.g. 0.25")(text)


def add_compress(sub) -> None:
    p = sub.add_parser("compress", help="compress a model into a SubFit plan", epilog=COMPRESS_EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default=None,
                   help="Hugging Face id, folder or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--sparsity", type=_sparsity, required=True,
                   help="fraction of transformer-block parameters to remove, e.g. 0.125 0.1875 0.25 0.3125 0.375")
    p.add_argument("--calib", default=None,
                   help="calibration text file, or hf:ID[:CONFIG[:SPLIT]]; default: text sampled from the model")
    p.add_argument("--calib-samples", type=positive_int, default=None,
                   help="number of sequences (default 272: 256 to fit on, 16 held out to choose between draws)")
    p.add_argument("--calib-len", type=positive_int, default=512, help="tokens per sequence (default 512)")
    p.add_argument("--seed", type=int, default=0, help="seed for sampling calibration data (default 0)")
    p.add_argument("--attn-rank", type=positive_int, default=None, help="attention bypass rank (default hidden/8)")
    p.add_argument("--ffn-rank", type=positive_int, default=None,
                   help="rank of the shared FeedForward bypass basis (default hidden/2)")
    p.add_argument("--method", default="subfit", choices=["subfit", "shortgpt", "uidl", "replaceme", "llm-drop"],
                   help="subfit (default) or a baseline: shortgpt | uidl | replaceme | llm-drop (see subfit.baselines)")
    p.add_argument("--granularity", default="unit", choices=["unit", "layer"],
                   help="subfit ablation: remove single units (default) or whole layers")
    p.add_argument("--contiguous", action="store_true", help="subfit ablation: one contiguous run of units")
    p.add_argument("--no-bypass", action="store_true", help="subfit ablation: delete the chosen units, no bypasses")
    p.add_argument("--ridge", type=float, default=None,
                   help="ridge, relative to input variance (default 1e-3 for subfit, 1e-4 for replaceme)")
    p.add_argument("--score", default="output-kl", choices=["output-kl", "bypass-error", "bypass-error-global"],
                   help="unit score (default output-kl: effect on the next-token distribution)")
    p.add_argument("--step", type=_sparsity, default=None,
                   help="sparsity committed per greedy scoring walk (default 1/32: 8 walks for 0.25)")
    p.add_argument("--score-samples", type=positive_int, default=None,
                   help="calibration sequences used for scoring walks (default 64)")
    p.add_argument("--selection-draws", type=positive_int, default=None,
                   help="run the selection K times on other scoring sequences and keep the plan with the least "
                        "loss on 16 held-out calibration sequences (default 3; 1 takes about a third of the time)")
    p.add_argument("--probe", default="held-out", choices=["held-out", "in-sample"],
                   help="sequences the output-kl score is measured on: held-out (default) calibration sequences "
                        "the scoring walk did not fit on, or in-sample (biased towards overfitted bypasses)")
    p.add_argument("--bypass-target", default=None, choices=["unit", "run", "dense"],
                   help="what each bypass is fitted to: along a run of adjacent bypasses the output of the "
                        "block the run replaces (run, the default), its unit's output (unit), or the dense "
                        "model's stream (dense, a development option); see README")
    p.add_argument("--device", default=None, help="device for the layer-by-layer walk, e.g. cuda (default cpu)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the hub (off by default)")
    p.add_argument("--out", required=True, help="plan directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing plan in --out")
    p.set_defaults(run=run_compress)


def run_compress(args) -> int:
    from subfit import models
    from subfit.compression import CALIB_SAMPLES, compress

    out = Path(args.out)
    if (out / "plan.json").exists() and not args.overwrite:
        raise SystemExit(f"error: {out} already holds a plan; choose another --out or pass --overwrite.")
    if args.calib and not args.calib.startswith("hf:") and not Path(args.calib).is_file():
        raise SystemExit(f"error: calibration file {args.calib} does not exist (or use hf:ID for a dataset).")
    ablations = args.granularity != "unit" or args.contiguous or args.no_bypass
    if args.method != "subfit" and (ablations or args.selection_draws or args.score_samples):
        raise SystemExit(f"error: --granularity/--contiguous/--no-bypass/--selection-draws/--score-samples are "
                         f"SubFit options; they do not apply to --method {args.method}.")
    calib_samples = args.calib_samples or CALIB_SAMPLES
    start = time.time()
    model, tokenizer, source = models.load(args.model, trust_remote_code=args.trust_remote_code)
    if args.method == "subfit":
        plan = compress(model, args.sparsity, args.calib, tokenizer=tokenizer, calib_samples=calib_samples,
                        calib_len=args.calib_len, seed=args.seed, attn_rank=args.attn_rank, ffn_rank=args.ffn_rank,
                        ridge=1e-3 if args.ridge is None else args.ridge, score=args.score,
                        probe=args.probe, granularity=args.granularity, contiguous=args.contiguous,
                        bypass=not args.no_bypass, device=args.device,
                        **{name: value for name, value in (("step", args.step), ("score_samples", args.score_samples),
                                                           ("selection_draws", args.selection_draws),
                                                           ("bypass_target", args.bypass_target))
                           if value is not None})
    else:
        from subfit import calibration
        from subfit.baselines import compress_baseline

        calib_ids = calibration.load_calibration(args.calib, model, tokenizer, calib_samples, args.calib_len,
                                                 args.seed)
        plan = compress_baseline(model, args.method, args.sparsity, calib_ids, source=source, ridge=args.ridge,
                                 calib_info=calibration.describe(args.calib, calib_ids, args.seed),
                                 device=args.device)
    plan.save(out)
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
        ("layers (A=attn, F=ffn removed)", _layer_map(plan)),
    ]
    for row in rows:
        table.add_row(*row)
    console.print(table)
    return 0


def _layer_map(plan) -> str:
    marks = []
    for a, f in zip(plan.attn, plan.ffn):
        marks.append(("A" if a != "keep" else ".") + ("F" if f != "keep" else "."))
    return " ".join(marks)


def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="perplexity, multiple-choice accuracy and agreement with the dense model",
                       epilog=EVAL_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", nargs="?", default=None,
                   help="plan directory, or a model (id/folder/.gguf; default the embedded SmolLM2)")
    p.add_argument("--ppl", default=None, help="text file for perplexity")
    p.add_argument("--window", type=positive_int, default=1024, help="perplexity window in tokens (default 1024)")
    p.add_argument("--stride", type=positive_int, default=None, help="perplexity stride (default: the window)")
    p.add_argument("--max-tokens", type=positive_int, default=None, help="score only the first N tokens of --ppl")
    p.add_argument("--tasks", nargs="*", default=[], help="multiple-choice task files (.jsonl)")
    p.add_argument("--limit", type=positive_int, default=None, help="first N examples of each task")
    p.add_argument("--batch-size", type=positive_int, default=16, help="sequences per forward (default 16)")
    p.add_argument("--base", default=None, help="base model location, when the plan's has moved")
    p.add_argument("--no-dense", action="store_true", help="for a plan: skip the dense model's column")
    p.add_argument("--lm-eval", nargs="+", default=None, metavar="TASK",
                   help="lm-evaluation-harness tasks instead of --ppl/--tasks (needs pip install -e \".[eval]\")")
    p.add_argument("--include-path", default=None, help="folder of extra lm-eval task YAMLs, e.g. bench/tasks")
    p.add_argument("--json", default=None, help="write the report as JSON here")
    p.set_defaults(run=run_eval)


def run_eval(args) -> int:
    from subfit import models
    from subfit.evaluation import evaluate
    from subfit.plan import Plan
    from subfit.reference import ReferenceModel

    if args.lm_eval:
        return run_lm_eval(args)
    if args.ppl is None and not args.tasks:
        raise SystemExit("error: nothing to evaluate: give --ppl FILE and/or --tasks FILE..., or --lm-eval TASK...")
    for path in [args.ppl, *args.tasks]:
        if path is not None and not Path(path).is_file():
            raise SystemExit(f"error: {path} does not exist.")
    is_plan = args.target is not None and (Path(args.target) / "plan.json").exists()
    if is_plan:
        plan = Plan.load(args.target)
        model, tokenizer, _ = models.load_base(plan.base, args.base)
        columns = {"compressed": ReferenceModel(model, plan)}
        if not args.no_dense:
            columns = {"dense": ReferenceModel(model), **columns}
    else:
        plan = None
        model, tokenizer, _ = models.load(args.target)
        columns = {"dense": ReferenceModel(model)}
    dense = columns.get("dense") if plan is not None else None
    report = {"target": args.target or "default", "columns": {}}
    if plan is not None:
        report["accounting"] = plan.accounting()
        report["removed_units"] = plan.removed_units()
    for name, fn in columns.items():
        console.print(f"[bold]evaluating {name}[/bold]")
        report["columns"][name] = evaluate(fn, tokenizer, ppl=args.ppl, tasks=args.tasks, limit=args.limit,
                                           window=args.window, stride=args.stride, max_tokens=args.max_tokens,
                                           dense_fn=dense if name != "dense" else None, batch_size=args.batch_size)
    return show_report(report, args.json)


def run_lm_eval(args) -> int:
    """`subfit eval --lm-eval`: the tasks through lm-evaluation-harness (subfit.harness)."""
    if args.ppl is not None or args.tasks:
        raise SystemExit("error: --lm-eval runs lm-evaluation-harness tasks; give it without --ppl/--tasks.")
    try:
        from subfit.harness import evaluate_tasks
    except ModuleNotFoundError as e:
        raise SystemExit(f"error: {e}") from e
    is_plan = args.target is not None and (Path(args.target) / "plan.json").exists()
    report = evaluate_tasks(args.target if is_plan else None, args.lm_eval, base=args.base if is_plan else args.target,
                            dense=not args.no_dense, limit=args.limit, include_path=args.include_path,
                            batch_size=args.batch_size)
    return show_report(report, args.json)


def show_report(report: dict, json_path: str | None) -> int:
    console.print(report_table(report))
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(report, indent=1))
        console.print(f"report written to {json_path}")
    return 0


def report_table(report: dict) -> Table:
    """Rows: metrics; columns: dense / compressed. Where a dense column was scored on the same
    windows and examples, the compressed column also shows its paired difference from it."""
    from subfit.evaluation import paired_difference, perplexity_ratio

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
            outcomes = {"acc": "correct", "acc_norm": "correct_norm"}.get(metric)
            if dense is not None and len(columns) > 1 and outcomes in result:
                metrics.append((f"{task} {metric} - dense", against_dense(
                    lambda r, t=task, m=metric: "{:+.3f} ± {:.3f}".format(
                        *paired_difference(r["tasks"][t], dense["tasks"][t], m)))))
    for label, fmt in metrics:
        table.add_row(label, *[fmt(r) for r in columns.values()])
    return table


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="subfit", description="SubFit compression and fast decode of LLMs.")
    sub = parser.add_subparsers(dest="command", required=True)
    add_compress(sub)
    add_eval(sub)
    from subfit.sweep import add_commands as add_sweep

    add_sweep(sub)
    add_runtime_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError) as e:  # bad input: say what is wrong, no traceback
        console.print(f"[red]error:[/red] {e}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
