"""The quality sweep: every method at every sparsity level on one model and one calibration set.

`run_sweep(SweepConfig(...))` (or `subfit sweep ...`) compresses the model with SubFit, its
ablations and the baselines at each level, evaluates every plan with `subfit.evaluate` (the same
code path as `subfit eval`), and writes `<out>.json`, `<out>.md` and two PNG plots.

Everything expensive is cached under `cache/` and reused:
- `dense_scores.pt`: the ONE dense walk every baseline ranks by (ShortGPT, UIDL, ReplaceMe, LLM-Drop);
- ReplaceMe's block maps for all missing levels are fitted in one more (partial) walk;
- `plans/<method>@<level>/`: each plan, so an interrupted sweep resumes where it stopped;
- `evals/<method>@<level>.json`: each evaluation, keyed by the evaluation settings.
`manifest.json` records the data every plan depends on (model, calibration); a cache made with
other data is refused rather than silently mixed in. Each SubFit plan also records the settings it
was made with (compress defaults and options): after a change of SubFit's defaults only the SubFit
rows are made again, and the baselines are reused.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

LEVELS = (0.125, 0.1875, 0.25, 0.3125, 0.375)
# name -> (method of subfit.baselines.METHODS, options): SubFit, its three ablations, four baselines.
VARIANTS: dict[str, tuple[str, dict]] = {
    "subfit": ("subfit", {}),
    "subfit-layer": ("subfit", {"granularity": "layer"}),
    "subfit-contiguous": ("subfit", {"contiguous": True}),
    "subfit-delete": ("subfit", {"bypass": False}),
    "shortgpt": ("shortgpt", {}),
    "uidl": ("uidl", {}),
    "replaceme": ("replaceme", {}),
    "llm-drop": ("llm-drop", {}),
}
DESCRIPTIONS = {
    "subfit": "SubFit: units, non-contiguous, fitted bypasses",
    "subfit-layer": "SubFit ablation: whole layers only",
    "subfit-contiguous": "SubFit ablation: one contiguous run of units",
    "subfit-delete": "SubFit ablation: SubFit's selection, units deleted (no bypass)",
    "shortgpt": "ShortGPT: layers of lowest Block Influence, deleted",
    "uidl": "UIDL: contiguous block of least angular distance, deleted",
    "replaceme": "ReplaceMe (LS): UIDL's block replaced by a fitted linear map",
    "llm-drop": "LLM-Drop: units of highest input/output cosine, deleted",
}
DELETION_OF_SUBFIT = "subfit-delete"
TASKS = ("piqa", "arc_easy", "arc_challenge", "winogrande", "lambada_openai")
# On small models WinoGrande sits at chance even when dense and LAMBADA collapses with perplexity:
# the core retention leaves them out, so the mean is read with and without them.
SECONDARY_TASKS = ("winogrande", "lambada_openai")
MANIFEST = "manifest.json"


@dataclass
class SweepConfig:
    """What to sweep and how to evaluate it. Paths may be any text file / task files."""

    model: str | None  # hub id, folder or .gguf (None = the embedded SmolLM2)
    calib: str  # calibration text file (or hf:ID...)
    out: str  # results prefix: <out>.json, <out>.md, <out>_quality.png, <out>_layers.png
    cache: str  # cache folder (plans, statistics, evaluations)
    ppl: str | None = None  # text file for perplexity
    tasks: list[str] = field(default_factory=list)  # task files (.jsonl, subfit.evaluate formats)
    calib_samples: int = 272  # compression.CALIB_SAMPLES (a test holds them together)
    calib_len: int = 512
    seed: int = 0
    levels: list[float] = field(default_factory=lambda: list(LEVELS))
    methods: list[str] = field(default_factory=lambda: list(VARIANTS))
    window: int = 1024
    max_tokens: int | None = 16384
    limit: int | None = 300
    metric: str = "acc"  # "acc" | "acc_norm": the accuracy the retention is computed from
    agreement: bool = False  # also KL(dense || model) and top-1 agreement on the perplexity text
    subfit: dict = field(default_factory=dict)  # options for compress_levels(): step, score_samples, score, ...
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

    def subfit_settings(self, options: dict) -> dict:
        """What a SubFit variant's plans depend on besides the data: compress_levels()'s defaults
        with the variant's options and the sweep's `subfit` options on top (the calibration
        arguments are the sweep's own, and the batch size changes no result)."""
        return json.loads(json.dumps({**_compress_defaults(), **options, **self.subfit}))

    def eval_key(self) -> dict:
        files = [self.ppl, *self.tasks]
        return {"ppl": self.ppl, "window": self.window, "max_tokens": self.max_tokens, "tasks": list(self.tasks),
                "limit": self.limit, "agreement": self.agreement, "files": {str(f): _file_id(f) for f in files if f}}


# compress_levels() options added after sweeps had cached plans, at the value that reproduces the
# plans made before them.
OPTIONS_BEFORE_ADDED = {"selection_draws": 1}


def _compress_defaults() -> dict:
    """compress_levels()'s result-changing options at their defaults."""
    import inspect

    from subfit.compression import compress_levels

    return {name: p.default for name, p in inspect.signature(compress_levels).parameters.items()
            if name not in ("progress", "device", "tokenizer", "calib", "model", "levels", "calib_samples",
                            "calib_len", "seed", "batch_size")
            and isinstance(p.default, (int, float, str, bool))}


def _file_id(path: str | os.PathLike) -> str:
    """Size and head hash: tells an edited evaluation file from the one a cached result used."""
    p = Path(path)
    with p.open("rb") as f:
        head = f.read(1 << 20)
    return f"{p.stat().st_size}:{hashlib.sha1(head).hexdigest()[:12]}"


def plan_digest(plan) -> str:
    """Hash of a plan's decisions and weights: an evaluation is reused only for the very plan it scored."""
    h = hashlib.sha1(json.dumps([plan.attn, plan.ffn, plan.base.get("fingerprint")]).encode())
    for name in sorted(plan.tensors):
        h.update(name.encode())
        h.update(plan.tensors[name].detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def level_tag(level: float) -> str:
    return f"{level:.4f}".rstrip("0").rstrip(".")


def _log(message: str) -> None:
    from rich.console import Console

    Console(stderr=True).print(message, highlight=False)


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------
def run_sweep(config: SweepConfig) -> dict:
    """Compress and evaluate every (method, level), reusing what the cache holds; write the
    JSON, markdown and plots; return the results dict (also written to `<out>.json`)."""
    import torch

    from subfit import baselines, calibration, models
    from subfit.baselines import DenseScores, compress_baseline
    from subfit.models import Decoder
    from subfit.plan import Plan

    unknown = [m for m in config.methods if m not in VARIANTS]
    if unknown:
        raise ValueError(f"Unknown methods {unknown}; choose from {', '.join(VARIANTS)}.")
    if config.metric not in ("acc", "acc_norm"):
        raise ValueError(f"metric={config.metric!r}: choose acc or acc_norm.")
    for path in [config.ppl, *config.tasks]:
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"Evaluation file {path} does not exist.")
    if config.ppl is None and not config.tasks:
        raise ValueError("Nothing to evaluate: give a perplexity text file and/or task files.")

    cache = Path(config.cache)
    (cache / "plans").mkdir(parents=True, exist_ok=True)
    (cache / "evals").mkdir(parents=True, exist_ok=True)
    start_all = time.perf_counter()
    model, tokenizer, source = models.load(config.model, device=config.device or "cpu")
    decoder = Decoder(model)
    key = config.plan_key(decoder.fingerprint())
    manifest = cache / MANIFEST
    if manifest.exists():
        cached_key = json.loads(manifest.read_text())
        if {k: cached_key.get(k) for k in key} != json.loads(json.dumps(key)):
            raise ValueError(f"The cache {cache} holds plans made with other settings ({cached_key}); "
                             "use another --cache folder, or delete this one to start afresh.")
    else:
        manifest.write_text(json.dumps(key, indent=1))
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
        timings.write_text(json.dumps(shared_seconds, indent=1))
    def finish(i: int, name: str, level: float, plan, seconds: float) -> None:
        plan.method["compress_seconds"] = seconds
        plan.method["variant"] = name
        if VARIANTS[name][0] == "subfit":
            plan.method["sweep_settings"] = config.subfit_settings(VARIANTS[name][1])
        plan.save(cache / "plans" / f"{name}@{level_tag(level)}")
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
            from subfit.compression import compress_levels, infeasible

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
            made = compress_levels(model, levels, calib_ids, batch_size=config.walk_batch, device=config.device,
                                   progress=config.progress, **{**options, **config.subfit})
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
    device = next(model.parameters()).device
    dense_ref = ReferenceModel(model)

    def on_device(ref):
        """The executor itself on CPU (keeps its `logits_at` fast path); elsewhere a wrapper that
        moves the token ids to the model's device first."""
        return ref if device.type == "cpu" else _OnDevice(ref, device)

    def evaluated(tag: str, plan) -> tuple[dict, float | None]:
        path = cache / "evals" / f"{tag}.json"
        settings = {**eval_key, "plan": plan_digest(plan) if plan is not None else "dense"}
        if path.exists():
            blob = json.loads(path.read_text())
            if blob.get("settings") == settings:
                return blob["report"], blob.get("seconds")
        twin = next((other for other in sorted((cache / "evals").glob("*.json")) if other != path
                     and json.loads(other.read_text()).get("settings") == settings), None)
        if twin is not None:  # another method made the very same plan (e.g. ShortGPT and UIDL): same scores
            blob = {**json.loads(twin.read_text()), "same_plan_as": twin.stem}
            path.write_text(json.dumps(blob, indent=1))
            computed["reused_evals"].append(tag)
            return blob["report"], blob.get("seconds")
        t = time.perf_counter()
        fn = on_device(ReferenceModel(model, plan)) if plan is not None else on_device(dense_ref)
        report = evaluate(fn, tokenizer, ppl=config.ppl, tasks=config.tasks, limit=config.limit,
                          window=config.window, max_tokens=config.max_tokens,
                          dense_fn=on_device(dense_ref) if (config.agreement and plan is not None) else None,
                          batch_size=config.batch_size, progress=config.progress)
        seconds = time.perf_counter() - t
        seconds = round(seconds, 3)
        path.write_text(json.dumps({"settings": settings, "seconds": seconds, "report": report}, indent=1))
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
    results["outputs"] = [str(p) for p in write_outputs(results, config.out, config.map_levels)]
    return results


def _current(plan, name: str, config: SweepConfig) -> bool:
    """A cached plan is reused unless it is SubFit's and was made with other settings."""
    method, options = VARIANTS[name]
    if method != "subfit":
        return True
    # An option compress gained after the plan was made counts at the value that does what compress
    # did before it (its default then, which may no longer be the default).
    made_with = plan.method.get("sweep_settings")
    if made_with is None or {**_compress_defaults(), **OPTIONS_BEFORE_ADDED, **made_with} \
            != config.subfit_settings(options):
        _log(f"{name}: cached plan made with other SubFit settings; making it again")
        return False
    return True


class _OnDevice:
    def __init__(self, ref, device):
        self.ref, self.device = ref, device

    def __call__(self, ids):
        return self.ref(ids.to(self.device))

    def logits_at(self, ids, index):
        return self.ref.logits_at(ids.to(self.device), index.to(self.device))


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
        "layer_map": layer_map(plan.attn, plan.ffn),
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


def layer_map(attn: list[str], ffn: list[str]) -> str:
    """Two characters per layer: '.' kept, upper case deleted, lower case bypassed (A/a attention,
    F/f FeedForward)."""
    def mark(action: str, letter: str) -> str:
        return "." if action == "keep" else (letter.upper() if action == "delete" else letter.lower())

    return " ".join(mark(a, "a") + mark(f, "f") for a, f in zip(attn, ffn))


# ---------------------------------------------------------------------------------------------
# outputs
# ---------------------------------------------------------------------------------------------
def write_outputs(results: dict, out: str | os.PathLike, map_levels=(0.25,)) -> list[Path]:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = [Path(f"{out}.json"), Path(f"{out}.md")]
    paths[0].write_text(json.dumps(results, indent=1, default=_json_default))
    paths[1].write_text(markdown(results, map_levels))
    paths += plot(results, out, map_levels)
    return paths


def _json_default(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    return str(value)


def _fmt(value, spec: str, missing: str = "–") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return missing
    return format(value, spec)


def markdown(results: dict, map_levels=(0.25,)) -> str:
    rows, dense, metric = results["rows"], results["dense"], results["metric"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    levels = sorted({r["level"] for r in rows})
    tasks = list(dense.get("tasks", {}))
    cfg = results["config"]
    lines = [f"# {results['title']}", ""]
    lines += [
        f"- model: `{cfg['model_source']}` ({results['model']['num_layers']} layers, hidden "
        f"{results['model']['hidden_size']}, {results['model']['block_params']:,} block parameters; one attention unit = "
        f"{results['model']['unit_params']['attn']:,}, one FeedForward = {results['model']['unit_params']['ffn']:,})",
        f"- calibration: `{cfg['calib']}`, {cfg['calib_samples']} x {cfg['calib_len']} tokens, seed {cfg['seed']}",
        f"- perplexity: `{cfg['ppl']}`, window {cfg['window']}, first {cfg['max_tokens']} tokens"
        if cfg["ppl"] else "- perplexity: not measured",
        f"- tasks: {', '.join(f'`{Path(t).name}`' for t in cfg['tasks'])}, "
        + (f"first {cfg['limit']} examples each; " if cfg["limit"] else "every example (full splits); ") +
        f"accuracy = `{metric}`; retention = method accuracy / dense accuracy, mean over tasks",
        f"- sparsity = removed transformer-block parameters / all block parameters (Plan.accounting); layer-level "
        "methods remove the nearest whole number of layers, so their exact sparsity differs from the target",
        f"- dense: " + ", ".join(([f"perplexity {dense['ppl']:.3f}"] if "ppl" in dense else [])
                                 + [f"{t} {dense['tasks'][t][metric]:.3f}" for t in tasks]),
        "",
        "Methods: " + "; ".join(f"`{m}` = {DESCRIPTIONS.get(m, m)}" for m in methods) + ".",
        "",
    ]

    def pivot(title: str, key: str, spec: str, better: str) -> list[str]:
        out = [f"## {title} ({better})", "", "| method | " + " | ".join(f"{l:g}" for l in levels) + " |",
               "|---|" + "---:|" * len(levels)]
        by = {(r["method"], r["level"]): r for r in rows}
        for m in methods:
            cells = []
            for l in levels:
                r = by.get((m, l), {})
                v = r.get(key)
                if v is None:
                    cells.append("n/a" if "error" in r else "–")
                    continue
                cells.append(_fmt(v, spec) + f" ({r['sparsity']:.3f})")
            out.append(f"| {m} | " + " | ".join(cells) + " |")
        return out + [""]

    lines += ["Pivot cells: value (exact sparsity). At one target the methods differ in exact sparsity (whole-layer "
              "methods round to the nearest layer, unit methods never exceed the target, a contiguous run may fill "
              "less): compare at equal exact sparsity, as the plots do. n/a = not feasible at that level.", ""]
    if "ppl" in dense:
        lines += pivot("Perplexity ratio to dense", "ppl_ratio", ".3f", "lower is better")
    if tasks:
        lines += pivot("Mean accuracy retention, % of dense", "mean_retention", ".1f", "higher is better")
        core = [t for t in tasks if t not in SECONDARY_TASKS]
        if any("core_retention" in r for r in rows):
            lines += pivot(f"Mean accuracy retention without {', '.join(t for t in tasks if t not in core)} "
                           f"({', '.join(core)}), % of dense", "core_retention", ".1f", "higher is better")
    lines += paired_table([r for r in rows if "subfit_paired" in r], tasks)
    head = ["target", "method", "sparsity", "removed A/F", "bypass params", "KV red."]
    if "ppl" in dense:
        head += ["PPL", "PPL ratio"]
        if any("kl" in r for r in rows):
            head += ["KL", "top-1"]
    head += [t for t in tasks] + (["mean % dense"] if tasks else []) + ["layers"]
    notes: dict[str, int] = {}
    lines += ["## All results", "",
              "layers: two characters per layer, `.` kept, upper case deleted, lower case bypassed "
              "(A/a attention, F/f FeedForward).", "",
              "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for l in levels:
        for r in (r for r in rows if r["level"] == l):
            if "error" in r:
                lines.append(f"| {l:g} | {r['method']} | n/a [{notes.setdefault(r['error'], len(notes) + 1)}] |"
                             + " |" * (len(head) - 3))
                continue
            cells = [f"{l:g}", r["method"], f"{r['sparsity']:.4f}", f"{r['removed_attn']}/{r['removed_ffn']}",
                     f"{r['bypass_params']:,}", f"{r['kv_reduction']:.1%}"]
            if "ppl" in dense:
                cells += [_fmt(r.get("ppl"), ".3f"), _fmt(r.get("ppl_ratio"), ".3f")]
                if "KL" in head:
                    cells += [_fmt(r.get("kl"), ".3f"), _fmt(r.get("top1_agreement"), ".3f")]
            cells += [_fmt(r["tasks"][t][metric], ".3f") for t in tasks] if tasks else []
            cells += [_fmt(r.get("mean_retention"), ".1f")] if tasks else []
            cells.append(f"`{r['layer_map']}`")
            lines.append("| " + " | ".join(cells) + " |")
    lines.append(f"| — | dense | 0 | 0/0 | 0 | 0.0% | " + (f"{dense['ppl']:.3f} | 1.000 | " if "ppl" in dense else "")
                 + ("– | – | " if "KL" in head else "")
                 + "".join(f"{dense['tasks'][t][metric]:.3f} | " for t in tasks) + ("100.0 | " if tasks else "")
                 + "`" + " ".join([".."] * results["model"]["num_layers"]) + "` |")
    lines += [""] + [f"[{i}] not feasible: {text}" for text, i in notes.items()]
    name = Path(results["config"]["out"]).name
    maps = ", ".join(f"`{map_path(name, l, i == 0)}` (units removed at {l:g})" for i, l in enumerate(map_levels))
    lines += ["", f"Plots: `{name}_quality.png` (retention and perplexity ratio vs exact sparsity), {maps}."]
    timing = [r for r in rows if r.get("compress_seconds") is not None]
    if timing:
        lines += ["", "## Cost", "", "| method | compress s (mean per level) | eval s (mean) |", "|---|---:|---:|"]
        for m in methods:
            rs = [r for r in timing if r["method"] == m]
            if rs:
                ev = [r["eval_seconds"] for r in rs if r.get("eval_seconds") is not None]
                lines.append(f"| {m} | {sum(r['compress_seconds'] for r in rs) / len(rs):.1f} | "
                             f"{(sum(ev) / len(ev)) if ev else float('nan'):.1f} |")
        shared = results.get("shared_seconds") or {}
        if shared:
            lines += ["", "Shared walks (once for all levels): " + ", ".join(f"{k} {v:.1f} s" for k, v in shared.items())]
    return "\n".join(lines) + "\n"


def paired_table(rows: list[dict], tasks: list[str]) -> list[str]:
    """SubFit against each other method at its level, from `paired_against`."""
    if not rows:
        return []

    def cell(value, stderr, spec) -> str:
        if value is None:
            return "–"
        text = f"{value:{spec}} ± {stderr:{spec.lstrip('+')}}" if stderr == stderr else f"{value:{spec}}"
        return f"**{text}**" if stderr == stderr and abs(value) > 2 * stderr else text

    head = ["level", "method (sparsity)", "SubFit (sparsity)", "PPL SubFit / method", "mean retention diff",
            "core retention diff"] + [f"{t} diff" for t in tasks]
    lines = ["## SubFit against each method, paired", "",
             "The same perplexity windows and task examples score both, so each difference has a standard error "
             "from the per-window (per-example) differences: far smaller than either score's own error when the "
             "two models mostly agree. ± is one standard error; bold: more than two from zero. PPL: SubFit's "
             "perplexity over the method's (below 1: SubFit better), ± on its log. Retention: SubFit minus the "
             "method, in points of dense accuracy (above 0: SubFit better).", "",
             "| " + " | ".join(head) + " |", "|---|---|---|" + "---:|" * (len(head) - 3)]
    for r in rows:
        p = r["subfit_paired"]
        ppl = "–"
        if "ppl_ratio" in p:
            ratio, log_se = p["ppl_ratio"], p["ppl_ratio_log_stderr"]
            ppl = f"{ratio:.3f} (log ± {log_se:.3f})"
            ppl = f"**{ppl}**" if abs(math.log(ratio)) > 2 * log_se else ppl
        per_task = [cell(p["retention_diff"][t]["diff"], p["retention_diff"][t]["stderr"], "+.1f")
                    if t in p.get("retention_diff", {}) else "–" for t in tasks]
        lines.append("| " + " | ".join([
            f"{r['level']:g}", f"{r['method']} ({r['sparsity']:.3f})", f"{p['subfit_sparsity']:.3f}", ppl,
            cell(p.get("mean_retention_diff"), p.get("mean_retention_diff_stderr"), "+.1f"),
            cell(p.get("core_retention_diff"), p.get("core_retention_diff_stderr"), "+.1f"), *per_task]) + " |")
    return lines + [""]


STYLE = {  # colour, line style, marker
    "subfit": ("#d62728", "-", "o"),
    "subfit-layer": ("#ff9896", "--", "s"),
    "subfit-contiguous": ("#e377c2", "--", "^"),
    "subfit-delete": ("#8c564b", "--", "v"),
    "shortgpt": ("#1f77b4", ":", "D"),
    "uidl": ("#2ca02c", ":", "P"),
    "replaceme": ("#17becf", ":", "X"),
    "llm-drop": ("#9467bd", ":", "*"),
}


def map_path(out: str | os.PathLike, level: float, first: bool) -> Path:
    """`<out>_layers.png` for the first map level, `<out>_layers_<level>.png` for the others."""
    return Path(f"{out}_layers.png" if first else f"{out}_layers_{level_tag(level)}.png")


def plot(results: dict, out: str | os.PathLike, map_levels=(0.25,)) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results["rows"] if "error" not in r]
    methods = list(dict.fromkeys(r["method"] for r in results["rows"]))
    paths = []
    panels = [(k, label) for k, label, need in (
        ("mean_retention", f"mean accuracy retention (% of dense, {results['metric']})", "tasks"),
        ("core_retention", "retention without " + "/".join(t.split("_")[0] for t in SECONDARY_TASKS) + " (%)", "tasks"),
        ("ppl_ratio", "perplexity / dense perplexity (log scale)", "ppl"))
        if need in results["dense"] and any(k in r for r in rows)]
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.6), squeeze=False)
        for ax, (key, label) in zip(axes[0], panels):
            for m in methods:
                pts = sorted((r["sparsity"], r["level"], r[key]) for r in rows if r["method"] == m and key in r)
                if not pts:
                    continue
                color, ls, marker = STYLE.get(m, ("gray", "-", "o"))
                ax.plot([p[0] for p in pts], [p[2] for p in pts], ls, marker=marker, color=color, label=m,
                        lw=2.4 if m == "subfit" else 1.5, ms=7 if m == "subfit" else 5, alpha=0.9)
            if key == "ppl_ratio":
                ax.set_yscale("log")
                ax.axhline(1.0, color="k", lw=0.6)
            else:
                ax.axhline(100.0, color="k", lw=0.6)
            for level in sorted({r["level"] for r in results["rows"]}):
                ax.axvline(level, color="0.85", lw=0.6, zorder=0)
            ax.set_xlabel("sparsity (removed block parameters / all; exact, per plan)")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3, which="both")
        axes[0][0].legend(fontsize=8, loc="best")
        fig.suptitle(results["title"], fontsize=10)
        fig.tight_layout()
        path = Path(f"{out}_quality.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    for i, level in enumerate(map_levels):
        path = plot_layers(results, map_path(out, level, i == 0), level)
        if path is not None:
            paths.append(path)
    return paths


def plot_layers(results: dict, path: Path, level: float) -> Path | None:
    """Rows: methods (an attention row and a FeedForward row each); columns: layers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    n_layers = results["model"]["num_layers"]
    code = {"keep": 0, "bypass": 1, "delete": 2}
    by = {r["method"]: r for r in results["rows"] if abs(r["level"] - level) < 1e-9}
    shown = list(by)
    if not shown:
        return None
    grid = np.full((2 * len(shown), n_layers), 3)
    for i, m in enumerate(shown):
        if "actions" in by[m]:
            grid[2 * i] = [code[a] for a in by[m]["actions"]["attn"]]
            grid[2 * i + 1] = [code[a] for a in by[m]["actions"]["ffn"]]
    note = "replaceme" in shown  # its one block map needs a word on how it is drawn
    height = 0.5 * len(shown) + 1.7 + 0.2 * note  # the legend (and note) sit in a fixed margin in inches
    fig, ax = plt.subplots(figsize=(max(6.5, 0.3 * n_layers + 3.4), height))
    ax.imshow(grid, cmap=ListedColormap(["#f2f2f2", "#4c9be8", "#d62728", "#ffffff"]), vmin=0, vmax=3,
              aspect="auto", interpolation="nearest")
    ax.set_xticks(range(n_layers))
    ax.set_xticklabels([str(i) for i in range(n_layers)], fontsize=7)
    ax.set_yticks(range(2 * len(shown)))
    labels = []
    for m in shown:
        sp = f"{by[m]['sparsity']:.3f}" if "sparsity" in by[m] else "n/a"
        labels += [f"{m} ({sp})  attn", "ffn"]
    ax.set_yticklabels(labels, fontsize=7)
    for y in range(2, 2 * len(shown), 2):
        ax.axhline(y - 0.5, color="k", lw=1.0)
    for x in range(n_layers):
        ax.axvline(x - 0.5, color="white", lw=0.5)
    ax.set_xlabel("layer")
    ax.set_title(f"Units removed at target sparsity {level:g} (exact sparsity in brackets)", fontsize=9)
    handles = [Patch(color="#f2f2f2", label="kept"), Patch(color="#4c9be8", label="bypassed (fitted map)"),
               Patch(color="#d62728", label="deleted"), Patch(facecolor="white", edgecolor="0.5", label="not feasible")]
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=7, frameon=False)
    if note:
        fig.text(0.5, 0.3 / height, "ReplaceMe: its one block map is drawn on the block's first attention; the rest "
                 "of the block is deleted", ha="center", fontsize=6, color="0.35")
    fig.tight_layout(rect=(0, (0.5 + 0.15 * note) / height, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------
SWEEP_EXAMPLES = """examples:
  subfit sweep HuggingFaceTB/SmolLM2-135M --calib wiki_passages.txt --ppl wiki.test.raw \\
      --tasks piqa.jsonl arc_easy.jsonl arc_challenge.jsonl winogrande.jsonl lambada_openai.jsonl \\
      --limit 300 --window 1024 --max-tokens 16384 --cache plans/sweep_smollm2 --out bench/results/sweep_smollm2
  subfit sweep ./stories260K --calib part1.txt --ppl part2.txt --methods subfit shortgpt --levels 0.25 0.375 ...
Interrupted? Run the same command again: cached plans and evaluations are reused.
"""


def add_commands(sub) -> None:
    p = sub.add_parser("sweep", help="compress with every method at every sparsity level and compare quality",
                       epilog=SWEEP_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default=None, help="Hugging Face id, folder or .gguf (default: embedded SmolLM2)")
    p.add_argument("--calib", required=True, help="calibration text file (or hf:ID[:CONFIG[:SPLIT]])")
    p.add_argument("--calib-samples", type=int, default=SweepConfig.calib_samples,
                   help=f"calibration sequences (default {SweepConfig.calib_samples}, as compress)")
    p.add_argument("--calib-len", type=int, default=512, help="tokens per calibration sequence (default 512)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ppl", default=None, help="text file for perplexity (e.g. wiki.test.raw)")
    p.add_argument("--tasks", nargs="*", default=[], help="task files (.jsonl): piqa, arc_easy, ...")
    p.add_argument("--limit", type=int, default=300, help="first N examples per task (default 300; 0 = all)")
    p.add_argument("--window", type=int, default=1024, help="perplexity window (default 1024)")
    p.add_argument("--max-tokens", type=int, default=16384, help="first N tokens of --ppl (default 16384; 0 = all)")
    p.add_argument("--levels", type=float, nargs="+", default=list(LEVELS), help="target sparsities")
    p.add_argument("--methods", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="METHOD",
                   help=f"methods to run (default all: {' '.join(VARIANTS)})")
    p.add_argument("--metric", default="acc", choices=["acc", "acc_norm"], help="accuracy for retention (default acc)")
    p.add_argument("--agreement", action="store_true", help="also KL and top-1 agreement with dense (2x perplexity cost)")
    p.add_argument("--step", type=float, default=None, help="SubFit sparsity per scoring walk (compress default)")
    p.add_argument("--score-samples", type=int, default=None, help="SubFit scoring sequences (compress default)")
    p.add_argument("--score", default=None, help="SubFit score (compress default)")
    p.add_argument("--selection-draws", type=int, default=None, help="SubFit selection draws (compress default)")
    p.add_argument("--ridge", type=float, default=None, help="ReplaceMe ridge (default 1e-4, relative)")
    p.add_argument("--map-levels", type=float, nargs="+", default=[0.25],
                   help="levels of the per-layer map plots (default 0.25): PREFIX_layers.png, PREFIX_layers_<level>.png")
    p.add_argument("--batch-size", type=int, default=16, help="evaluation batch (default 16)")
    p.add_argument("--device", default=None, help="device for the model and walks (default cpu)")
    p.add_argument("--cache", required=True, help="cache folder: statistics, plans, evaluations (resumable)")
    p.add_argument("--out", required=True, help="results prefix: writes PREFIX.json, PREFIX.md, PREFIX_*.png")
    p.add_argument("--title", default=None)
    p.add_argument("--progress", action="store_true", help="progress bars")
    p.set_defaults(run=run_sweep_command)


def config_from_args(args) -> SweepConfig:
    subfit = {k: v for k, v in (("step", args.step), ("score_samples", args.score_samples),
                                ("score", args.score), ("selection_draws", args.selection_draws)) if v is not None}
    return SweepConfig(
        model=args.model, calib=args.calib, out=args.out, cache=args.cache, ppl=args.ppl, tasks=list(args.tasks),
        calib_samples=args.calib_samples, calib_len=args.calib_len, seed=args.seed, levels=list(args.levels),
        methods=list(args.methods), window=args.window, max_tokens=args.max_tokens or None, limit=args.limit or None,
        metric=args.metric, agreement=args.agreement, subfit=subfit, ridge=args.ridge, map_levels=list(args.map_levels),
        batch_size=args.batch_size, device=args.device, title=args.title, progress=args.progress,
    )


def run_sweep_command(args) -> int:
    results = run_sweep(config_from_args(args))
    _log(f"wrote {', '.join(results['outputs'])} ({results['total_seconds']:.0f} s)")
    print(Path(f"{args.out}.md").read_text())
    return 0
