"""The quality sweep: every method at every sparsity level on one model and one calibration set.

`python bench/sweep/sweep.py MODEL --calib FILE --ppl FILE --tasks TASKS [--include-path DIR] --cache DIR
--out PREFIX` (or `subfit sweep ...` from a source checkout) compresses the model with SubFit, its
ablations and the baselines at each level (`sweep_variants.VARIANTS`), evaluates every plan as
`subfit eval` does (perplexity by `subfit.evaluation`, tasks by lm-evaluation-harness through
`subfit.harness`), pairs SubFit with each other method on the same windows and examples, and writes `<out>.json`, `<out>.md` and two PNG plots (`sweep_report`).
Everything expensive is cached and reused (`sweep_cache`); `run_sweep.py` holds the presets.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from sweep_cache import cached_evaluation, check_manifest, file_id, plan_digest, store_evaluation
from sweep_report import level_tag, output_paths, write_outputs
from sweep_variants import DELETION_OF_SUBFIT, SECONDARY_TASKS, VARIANTS

from subfit.argtypes import BAD_INPUT, ArgumentParser, positive_int, refuse, sparsity
from subfit.config import TEXT_CALIBRATION, DevOptions, SubFitConfig
from subfit.files import write_json

LEVELS = (0.125, 0.1875, 0.25, 0.3125, 0.375)


@dataclass
class SweepConfig:
    """What to sweep and how to evaluate it. Paths may be any text file / task files."""

    model: str | None  # hub id, folder or .gguf (None = the embedded SmolLM2)
    calib: str  # calibration text file (or hf:ID...)
    out: str  # results prefix: <out>.json, <out>.md, <out>_quality.png, <out>_layers.png
    cache: str  # cache folder (plans, statistics, evaluations)
    ppl: str | None = None  # text file for perplexity
    tasks: list[str] = field(default_factory=list)  # lm-eval task names
    include_path: str | None = None  # folder of extra lm-eval task YAMLs (bench/tasks: the offline copies)
    calib_samples: int = TEXT_CALIBRATION[0]
    calib_len: int = TEXT_CALIBRATION[1]
    seed: int = 0
    levels: list[float] = field(default_factory=lambda: list(LEVELS))
    methods: list[str] = field(default_factory=lambda: list(VARIANTS))
    window: int = 1024
    max_tokens: int | None = 16384
    limit: int | None = 300
    metric: str = "acc"  # "acc" | "acc_norm": the accuracy the retention is computed from
    agreement: bool = False  # also KL(dense || model) and top-1 agreement on the perplexity text
    subfit: dict = field(default_factory=dict)  # SubFitConfig / DevOptions fields: selection_draws, step, ...
    ridge: float | None = None  # ReplaceMe's ridge (default baselines.REPLACEME_RIDGE)
    map_levels: list[float] = field(default_factory=lambda: [0.25])  # levels of the per-layer removal maps
    batch_size: int = 16  # evaluation batch
    walk_batch: int = 8  # calibration walk batch
    device: str | None = None
    title: str | None = None
    progress: bool = False

    def plan_key(self, fingerprint: str) -> dict:
        """The data every plan depends on: a cache made under another key is not reused."""
        return {"fingerprint": fingerprint, "model": self.model, "calib": self.calib,
                "calib_samples": self.calib_samples, "calib_len": self.calib_len, "seed": self.seed,
                "ridge": self.ridge}

    def subfit_settings(self, options: dict) -> tuple[SubFitConfig, DevOptions]:
        """The config and options a SubFit variant is made with: the sweep's calibration and the
        variant's ablation, with the sweep's `subfit` fields on top."""
        config_fields = {f.name for f in fields(SubFitConfig)}
        unknown = set(self.subfit) - config_fields - {f.name for f in fields(DevOptions)}
        if unknown:
            raise ValueError(f"Unknown SubFit settings {sorted(unknown)}: give SubFitConfig or DevOptions fields.")
        config = SubFitConfig(calib_samples=self.calib_samples, calib_len=self.calib_len, seed=self.seed,
                              device=self.device, **{k: v for k, v in self.subfit.items() if k in config_fields})
        dev = DevOptions(batch_size=self.walk_batch, **options,
                         **{k: v for k, v in self.subfit.items() if k not in config_fields})
        return config, dev

    def settings_record(self, options: dict) -> dict:
        """What a SubFit variant's plans depend on besides the data (not where or in what batches
        they ran): a cached plan made with another record is made again."""
        config, dev = self.subfit_settings(options)
        record = {"config": config.record(), "options": dev.record()}
        del record["config"]["device"], record["options"]["batch_size"]
        return record

    def eval_key(self) -> dict:
        """What an evaluation depends on: settings, and the text and task definitions it read."""
        files = [self.ppl] if self.ppl else []
        if self.include_path:
            files += sorted(str(f) for f in Path(self.include_path).iterdir() if f.is_file())
        return {"ppl": self.ppl, "window": self.window, "max_tokens": self.max_tokens, "tasks": list(self.tasks),
                "include_path": self.include_path, "limit": self.limit, "agreement": self.agreement,
                "files": {str(f): file_id(f) for f in files}}


def check_config(config: SweepConfig, *, overwrite: bool = False) -> None:
    """Refuse a sweep that cannot finish as asked, before any work: unknown methods, bad levels or
    settings, missing or unreadable input files, a device this machine lacks, a cache that is not
    a folder, and outputs the overwrite rule forbids (existing ones need `overwrite`)."""
    from subfit.calibration import SELF, read_text
    from subfit.config import check_sparsity
    from subfit.devices import check_device
    from subfit.evaluation import check_inputs
    from subfit.files import check_output

    unknown = [m for m in config.methods if m not in VARIANTS]
    if unknown:
        raise ValueError(f"Unknown methods {unknown}; choose from {', '.join(VARIANTS)}.")
    if config.metric not in ("acc", "acc_norm"):
        raise ValueError(f"metric={config.metric!r}: choose acc or acc_norm.")
    for level in config.levels:
        check_sparsity(level)
    for name in config.methods:
        if VARIANTS[name][0] == "subfit":
            config.subfit_settings(VARIANTS[name][1])
    if config.device is not None:
        check_device(config.device)
    if config.ppl is None and not config.tasks:
        raise ValueError("Nothing to evaluate: give a perplexity text file and/or lm-eval tasks.")
    check_inputs(ppl=config.ppl, window=config.window, max_tokens=config.max_tokens)
    if config.tasks:
        from subfit.harness import task_manager

        task_manager(config.tasks, config.include_path)
    if config.calib not in (None, SELF) and not config.calib.startswith("hf:"):
        read_text(config.calib, "Calibration file")
    if Path(config.cache).exists() and not Path(config.cache).is_dir():
        raise ValueError(f"--cache {config.cache} is a file; give a folder (it is made if missing).")
    for path in output_paths(config.out, config.map_levels):
        check_output(path, overwrite=overwrite)


def run_sweep(config: SweepConfig, *, overwrite: bool = False) -> dict:
    """Compress and evaluate every (method, level), reusing what the cache holds; write the
    JSON, markdown and plots; return the results dict (also written to `<out>.json`). Existing
    outputs are replaced only with `overwrite`; everything is checked before any work."""
    import torch

    from subfit import baselines, calibration, models
    from subfit.baselines import DenseScores, compress_baseline
    from subfit.evaluation import check_perplexity_window
    from subfit.models import Decoder
    from subfit.plan import Plan

    check_config(config, overwrite=overwrite)
    start_all = time.perf_counter()
    model, tokenizer, source = models.load(config.model, device=config.device or "cpu")
    limit = models.max_positions(model.config)
    check_perplexity_window(config.window, None, limit)
    models.check_positions(limit, config.calib_len, f"calib_len={config.calib_len} (--calib-len)")
    cache = Path(config.cache)
    (cache / "plans").mkdir(parents=True, exist_ok=True)
    (cache / "evals").mkdir(parents=True, exist_ok=True)
    decoder = Decoder(model)
    key = config.plan_key(decoder.fingerprint())
    check_manifest(cache, key)
    calib_ids = calibration.load_calibration(config.calib, model, tokenizer, config.calib_samples, config.calib_len,
                                             config.seed)
    calib_info = calibration.describe(config.calib, calib_ids, config.seed)
    walk_args = dict(batch_size=config.walk_batch, device=config.device, progress=config.progress)
    timings = cache / "timings.json"  # seconds of the shared walks, kept across resumed runs
    shared_seconds: dict[str, float] = json.loads(timings.read_text()) if timings.exists() else {}
    computed: dict[str, list[str]] = {"walks": [], "plans": [], "evals": [], "reused_evals": []}  # this run's work

    # 1. plans ---------------------------------------------------------------------------------
    plans: dict[tuple[str, float], Plan] = {}
    errors: dict[tuple[str, float], str] = {}
    compress_seconds: dict[tuple[str, float], float] = {}
    todo = []
    for name in config.methods:
        for level in config.levels:
            folder = cache / "plans" / f"{name}@{level_tag(level)}"
            cached = Plan.load(folder) if (folder / "plan.json").exists() else None
            if cached is not None and _current(cached, name, config):
                plans[(name, level)] = cached
                compress_seconds[(name, level)] = cached.method.get("compress_seconds")
            elif Path(f"{folder}.error").exists():  # not feasible: as deterministic as a plan
                errors[(name, level)] = Path(f"{folder}.error").read_text()
            else:
                todo.append((name, level))
    scores = None
    if any(VARIANTS[name][0] != "subfit" for name, _ in todo):
        score_file = cache / "dense_scores.pt"
        if score_file.exists():
            scores = DenseScores.load(score_file)
        else:
            t = time.perf_counter()
            scores = baselines.dense_scores(decoder, calib_ids, **walk_args)
            shared_seconds["dense_scores"] = round(time.perf_counter() - t, 3)
            computed["walks"].append("dense_scores")
            scores.save(score_file)
            _log(f"dense scores: one walk, {shared_seconds['dense_scores']:.1f} s")
    fits = {}
    replaceme_todo = [(n, l) for n, l in todo if VARIANTS[n][0] == "replaceme"]
    if replaceme_todo:
        empty = Plan.empty(decoder, source)
        blocks = set()
        for _, level in replaceme_todo:
            try:
                n = baselines.layers_for(level, empty)
            except ValueError:
                continue  # reported when the plan is built
            blocks.add((baselines.uidl_block(scores, n)[0], n))
        t = time.perf_counter()
        ridge = baselines.REPLACEME_RIDGE if config.ridge is None else config.ridge
        fits = baselines.fit_blocks(decoder, calib_ids, sorted(blocks), ridge=ridge, **walk_args)
        shared_seconds["replaceme_fit"] = round(time.perf_counter() - t, 3)
        computed["walks"].append("replaceme_fit")
        _log(f"ReplaceMe: {len(blocks)} block maps in one walk, {shared_seconds['replaceme_fit']:.1f} s")
    if computed["walks"]:
        write_json(timings, shared_seconds, overwrite=True)
    def finish(i: int, name: str, level: float, plan, seconds: float) -> None:
        plan.method["compress_seconds"] = seconds
        plan.method["variant"] = name
        if VARIANTS[name][0] == "subfit":
            plan.method["sweep_settings"] = config.settings_record(VARIANTS[name][1])
        plan.save(cache / "plans" / f"{name}@{level_tag(level)}", overwrite=True)  # settings changed: made again
        computed["plans"].append(f"{name}@{level_tag(level)}")
        plans[(name, level)] = plan
        compress_seconds[(name, level)] = seconds
        _log(f"[{i}/{len(todo)}] {name} @ {level}: {', '.join(plan.removed_units())} ({seconds:.1f} s)")

    for i, (name, level) in enumerate(todo, 1):
        method, options = VARIANTS[name]
        if (name, level) in plans or (name, level) in errors:  # settled with its variant's other levels
            continue
        if method == "subfit":
            # One greedy trajectory serves every missing level of the variant; the deletion
            # ablation is SubFit's own selection with the bypasses dropped.
            if name == DELETION_OF_SUBFIT and ("subfit", level) in plans:
                finish(i, name, level, plans[("subfit", level)].without_bypasses(), 0.0)
                continue
            from subfit.compression import compress_levels
            from subfit.selection import infeasible

            levels = []
            for n, lv in todo:
                problem = infeasible(Plan.empty(decoder, source), lv, options.get("granularity", "unit"))
                if n == name and problem:
                    errors[(name, lv)] = problem
                    (cache / "plans" / f"{name}@{level_tag(lv)}.error").write_text(problem)
                    _log(f"[{i}/{len(todo)}] {name} @ {lv}: not feasible: {problem}")
                elif n == name:
                    levels.append(lv)
            if not levels:
                continue
            t = time.perf_counter()
            subfit_config, dev = config.subfit_settings(options)
            made = compress_levels(model, levels, calib_ids, config=subfit_config, dev=dev, progress=config.progress)
            seconds = round((time.perf_counter() - t) / len(levels), 3)  # shared walks: amortised per level
            for lv, plan in zip(levels, made):
                plan.base.update(path=source.path, gguf_file=source.gguf_file)
                plan.method["calibration"] = calib_info
                finish(i, name, lv, plan, seconds)
            continue
        extra = {}
        if method == "replaceme":
            n = None
            try:
                n = baselines.layers_for(level, Plan.empty(decoder, source))
            except ValueError:
                pass
            if n is not None:
                extra["fit"] = fits.get((baselines.uidl_block(scores, n)[0], n))
            extra["ridge"] = config.ridge
        t = time.perf_counter()
        try:
            plan = compress_baseline(model, method, level, calib_ids, source=source, scores=scores,
                                     calib_info=calib_info, **walk_args, **extra)
        except ValueError as e:
            errors[(name, level)] = str(e)
            (cache / "plans" / f"{name}@{level_tag(level)}.error").write_text(str(e))
            _log(f"[{i}/{len(todo)}] {name} @ {level}: not feasible: {e}")
            continue
        finish(i, name, level, plan, round(time.perf_counter() - t, 3))

    # 2. evaluations ---------------------------------------------------------------------------
    from subfit.evaluation import evaluate
    from subfit.reference import ReferenceModel

    eval_key = json.loads(json.dumps(config.eval_key()))
    if config.tasks:
        from subfit.harness import score_tasks, task_manager

        task_index = task_manager(config.tasks, config.include_path)
    device = next(model.parameters()).device
    dense_ref = ReferenceModel(model)

    def on_device(ref):
        """The executor itself on CPU; elsewhere a wrapper that moves the token ids to the model's device."""
        return ref if device.type == "cpu" else _OnDevice(ref, device)

    def evaluated(tag: str, plan) -> tuple[dict, float | None]:
        settings = {**eval_key, "plan": plan_digest(plan) if plan is not None else "dense"}
        cached = cached_evaluation(cache / "evals", tag, settings)
        if cached is not None:
            report, seconds, twin = cached
            if twin:
                computed["reused_evals"].append(tag)
            return report, seconds
        t = time.perf_counter()
        report = {}
        if config.ppl is not None:
            fn = on_device(ReferenceModel(model, plan)) if plan is not None else on_device(dense_ref)
            report = evaluate(fn, tokenizer, ppl=config.ppl, window=config.window, max_tokens=config.max_tokens,
                              dense_fn=on_device(dense_ref) if (config.agreement and plan is not None) else None,
                              progress=config.progress)
        if config.tasks:
            report["tasks"] = sweep_tasks(score_tasks(model, tokenizer, plan, config.tasks, limit=config.limit,
                                                      task_index=task_index, batch_size=config.batch_size))
        seconds = round(time.perf_counter() - t, 3)
        store_evaluation(cache / "evals", tag, settings, report, seconds)
        computed["evals"].append(tag)
        _log(f"evaluated {tag} ({seconds:.1f} s)")
        return report, seconds

    dense_report, dense_seconds = evaluated("dense", None)
    rows, reports = [], {}
    for name in config.methods:
        for level in config.levels:
            row = {"method": name, "base_method": VARIANTS[name][0], "options": VARIANTS[name][1], "level": level}
            if (name, level) in errors:
                rows.append({**row, "error": errors[(name, level)]})
                continue
            plan = plans[(name, level)]
            report, seconds = evaluated(f"{name}@{level_tag(level)}", plan)
            reports[(name, level)] = report
            rows.append({**row, **_row_metrics(plan, report, dense_report, config.metric),
                         "compress_seconds": compress_seconds.get((name, level)), "eval_seconds": seconds})
    subfit_rows = {r["level"]: r for r in rows if r["method"] == "subfit" and "error" not in r}
    for row in rows:
        ours = subfit_rows.get(row["level"])
        if ours is None or row is ours or "error" in row:
            continue
        paired = paired_against(reports[("subfit", row["level"])], reports[(row["method"], row["level"])],
                                dense_report, config.metric)
        if paired:
            row["subfit_paired"] = {"subfit_sparsity": ours["sparsity"], **paired}

    results = {
        "title": config.title or f"SubFit quality sweep: {source.describe()}",
        "config": {**asdict(config), "model_source": source.describe()},
        "calibration": calib_info,
        "model": {"num_layers": decoder.num_layers, "hidden_size": decoder.hidden_size,
                  "block_params": decoder.block_params(), "unit_params": Plan.empty(decoder, source).unit_params},
        "metric": config.metric,
        "dense": {**_dense_metrics(dense_report), "eval_seconds": dense_seconds},
        "rows": rows,
        "shared_seconds": shared_seconds,
        "computed_this_run": computed,
        "total_seconds": time.perf_counter() - start_all,
        "torch_threads": torch.get_num_threads(),
    }
    results["outputs"] = [str(p) for p in write_outputs(results, config.out, config.map_levels, overwrite=overwrite)]
    return results


def _current(plan, name: str, config: SweepConfig) -> bool:
    """A cached plan is reused unless it is SubFit's and was made with other settings."""
    method, options = VARIANTS[name]
    if method != "subfit" or plan.method.get("sweep_settings") == json.loads(json.dumps(config.settings_record(options))):
        return True
    _log(f"{name}: cached plan made with other SubFit settings; making it again")
    return False


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class _OnDevice:
    """A reference executor that takes token ids on the CPU, for a model on another device."""

    def __init__(self, ref, device):
        self.ref, self.device = ref, device

    def __call__(self, ids):
        return self.ref(ids.to(self.device))

    @property
    def max_positions(self) -> int | None:
        return self.ref.max_positions


def sweep_tasks(tasks: dict) -> dict:
    """lm-eval task reports as the sweep compares them: an offline copy under the name of the task
    it copies (`piqa_local` -> `piqa`), and acc standing in for acc_norm (with its per-example
    outcomes) where a task has no length-normalised score (WinoGrande, LAMBADA), so that either
    metric covers every task."""
    out = {}
    for name, result in tasks.items():
        result = dict(result)
        if "acc_norm" not in result:
            result.update(acc_norm=result["acc"], acc_norm_stderr=result.get("acc_stderr"))
            if "correct" in result:
                result["correct_norm"] = result["correct"]
        out[name.removesuffix("_local")] = result
    return out


def _dense_metrics(report: dict) -> dict:
    out = {}
    if "perplexity" in report:
        out["ppl"] = report["perplexity"]["ppl"]
        out["ppl_tokens"] = report["perplexity"]["tokens"]
    out["tasks"] = {t: {"acc": r["acc"], "acc_norm": r["acc_norm"], "n": r["n"]} for t, r in report.get("tasks", {}).items()}
    return out


def _row_metrics(plan, report: dict, dense: dict, metric: str) -> dict:
    acc = plan.accounting()
    row = {
        "sparsity": acc["sparsity"],
        "net_sparsity": acc["net_sparsity"],
        "removed_params": acc["removed_params"],
        "bypass_params": acc["bypass_params"],
        "kv_reduction": acc["kv_reduction"],
        "removed_attn": acc["removed_attn"],
        "removed_ffn": acc["removed_ffn"],
        "removed_units": plan.removed_units(),
        "actions": {"attn": list(plan.attn), "ffn": list(plan.ffn)},
        "layer_map": plan.layer_map(),
    }
    if "perplexity" in report:
        p = report["perplexity"]
        row["ppl"] = p["ppl"]
        row["ppl_ratio"] = p["ppl"] / dense["perplexity"]["ppl"]
        if "kl" in p:
            row["kl"], row["top1_agreement"] = p["kl"], p["top1_agreement"]
    tasks = report.get("tasks", {})
    if tasks:
        row["tasks"] = {t: {"acc": r["acc"], "acc_norm": r["acc_norm"], "n": r["n"]} for t, r in tasks.items()}
        retention = {t: 100.0 * r[metric] / dense["tasks"][t][metric] if dense["tasks"][t][metric] > 0 else float("nan")
                     for t, r in tasks.items()}
        row["retention"] = retention
        row["mean_retention"] = sum(retention.values()) / len(retention)
        core = [v for t, v in retention.items() if t not in SECONDARY_TASKS]
        if core and len(core) < len(retention):
            row["core_retention"] = sum(core) / len(core)
        row["mean_acc"] = sum(r[metric] for r in tasks.values()) / len(tasks)
    return row


def paired_against(report: dict, other: dict, dense: dict, metric: str) -> dict:
    """`report`'s model against `other`'s on the same windows and examples: perplexity ratio (with
    the standard error of its log) and retention differences in points of dense accuracy (with
    standard errors from per-example differences; tasks independent). Empty for reports made
    before evaluations kept per-window and per-example scores."""
    from subfit.evaluation import paired_difference, perplexity_ratio

    out: dict = {}
    if "window_nll" in report.get("perplexity", {}) and "window_nll" in other.get("perplexity", {}):
        ratio, log_se = perplexity_ratio(report["perplexity"], other["perplexity"])
        out["ppl_ratio"], out["ppl_ratio_log_stderr"] = ratio, log_se
    tasks = {t: r for t, r in report.get("tasks", {}).items() if "correct" in r and "correct" in other["tasks"].get(t, {})
             and dense["tasks"][t][metric] > 0}
    if not tasks:
        return out
    diffs = {}
    for t, r in tasks.items():
        diff, se = paired_difference(r, other["tasks"][t], metric)
        scale = 100.0 / dense["tasks"][t][metric]
        diffs[t] = (diff * scale, se * scale)
    out["retention_diff"] = {t: {"diff": d, "stderr": e} for t, (d, e) in diffs.items()}
    for key, names in (("mean", list(diffs)), ("core", [t for t in diffs if t not in SECONDARY_TASKS])):
        if names and (key == "mean" or len(names) < len(diffs)):
            out[f"{key}_retention_diff"] = sum(diffs[t][0] for t in names) / len(names)
            out[f"{key}_retention_diff_stderr"] = math.sqrt(sum(diffs[t][1] ** 2 for t in names)) / len(names)
    return out


SWEEP_EXAMPLES = """examples:
  subfit sweep HuggingFaceTB/SmolLM2-135M --calib wiki_passages.txt --ppl wiki.test.raw \\
      --tasks piqa_local arc_easy_local arc_challenge_local winogrande_local lambada_openai_local \\
      --include-path bench/tasks \\
      --limit 300 --window 1024 --max-tokens 16384 --cache plans/sweep_smollm2 --out bench/results/sweep_smollm2
  subfit sweep ./stories260K --calib part1.txt --ppl part2.txt --methods subfit shortgpt --levels 0.25 0.375 ...
Interrupted? Run the same command again: cached plans and evaluations are reused.
Existing results under --out are replaced only with --overwrite.
"""


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="subfit sweep", epilog=SWEEP_EXAMPLES,
                                description="Compress with every method at every sparsity level and compare quality.",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default=None, help="Hugging Face id, folder or .gguf (default: embedded SmolLM2)")
    p.add_argument("--calib", required=True, help="calibration text file (or hf:ID[:CONFIG[:SPLIT]])")
    p.add_argument("--calib-samples", type=positive_int, default=SweepConfig.calib_samples,
                   help=f"calibration sequences (default {SweepConfig.calib_samples}, as compress)")
    p.add_argument("--calib-len", type=positive_int, default=512, help="tokens per calibration sequence (default 512)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ppl", default=None, help="text file for perplexity (e.g. wiki.test.raw)")
    p.add_argument("--tasks", nargs="*", default=[], help="lm-eval tasks, e.g. piqa arc_easy (offline: piqa_local ...)")
    p.add_argument("--include-path", default=None, help="folder of extra lm-eval task YAMLs, e.g. bench/tasks")
    p.add_argument("--limit", type=int, default=300, help="first N examples per task (default 300; 0 = all)")
    p.add_argument("--window", type=positive_int, default=1024, help="perplexity window (default 1024)")
    p.add_argument("--max-tokens", type=int, default=16384, help="first N tokens of --ppl (default 16384; 0 = all)")
    p.add_argument("--levels", type=sparsity, nargs="+", default=list(LEVELS), help="target sparsities")
    p.add_argument("--methods", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="METHOD",
                   help=f"methods to run (default all: {' '.join(VARIANTS)})")
    p.add_argument("--metric", default="acc", choices=["acc", "acc_norm"], help="accuracy for retention (default acc)")
    p.add_argument("--agreement", action="store_true", help="also KL and top-1 agreement with dense (2x perplexity cost)")
    p.add_argument("--subfit", nargs="+", action="extend", default=[], metavar="FIELD=VALUE",
                   help="SubFit settings, SubFitConfig or DevOptions fields, e.g. selection_draws=1 score_samples=32")
    p.add_argument("--ridge", type=float, default=None, help="ReplaceMe ridge (default 1e-4, relative)")
    p.add_argument("--map-levels", type=float, nargs="+", default=[0.25],
                   help="levels of the per-layer map plots (default 0.25): PREFIX_layers.png, PREFIX_layers_<level>.png")
    p.add_argument("--batch-size", type=positive_int, default=16, help="evaluation batch (default 16)")
    p.add_argument("--device", default=None, help="device for the model and walks (default cpu)")
    p.add_argument("--cache", required=True, help="cache folder: statistics, plans, evaluations (resumable)")
    p.add_argument("--out", required=True, help="results prefix: writes PREFIX.json, PREFIX.md, PREFIX_*.png")
    p.add_argument("--overwrite", action="store_true", help="replace existing results under --out")
    p.add_argument("--title", default=None)
    p.add_argument("--progress", action="store_true", help="progress bars")
    return p


def _setting(text: str) -> tuple[str, object]:
    """`FIELD=VALUE` with VALUE as JSON where it parses (numbers, true/false), else a string."""
    name, sep, value = text.partition("=")
    if not sep:
        raise ValueError(f"--subfit takes FIELD=VALUE; got {text!r}. Give e.g. selection_draws=1.")
    try:
        return name, json.loads(value)
    except json.JSONDecodeError:
        return name, value


def config_from_args(args) -> SweepConfig:
    return SweepConfig(
        model=args.model, calib=args.calib, out=args.out, cache=args.cache, ppl=args.ppl, tasks=list(args.tasks),
        include_path=args.include_path,
        calib_samples=args.calib_samples, calib_len=args.calib_len, seed=args.seed, levels=list(args.levels),
        methods=list(args.methods), window=args.window, max_tokens=args.max_tokens or None, limit=args.limit or None,
        metric=args.metric, agreement=args.agreement, subfit=dict(map(_setting, args.subfit)), ridge=args.ridge,
        map_levels=list(args.map_levels), batch_size=args.batch_size, device=args.device, title=args.title,
        progress=args.progress,
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        results = run_sweep(config_from_args(args), overwrite=args.overwrite)
    except BAD_INPUT as e:
        return refuse(parser.prog, e)
    _log(f"wrote {', '.join(results['outputs'])} ({results['total_seconds']:.0f} s)")
    print(Path(f"{args.out}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
