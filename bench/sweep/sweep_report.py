"""The sweep's outputs from its results dict: `<out>.json`, `<out>.md` (pivots, the paired table,
every row) and the plots (`<out>_quality.png`, `<out>_layers*.png`). Pure functions of the results,
so a committed JSON re-renders its committed tables exactly."""
from __future__ import annotations

import math
import os
from pathlib import Path

from sweep_variants import DESCRIPTIONS, SECONDARY_TASKS, STYLE

from subfit.files import write_json, write_text


def level_tag(level: float) -> str:
    return f"{level:.4f}".rstrip("0").rstrip(".")


def output_paths(out: str | os.PathLike, map_levels=(0.25,)) -> list[Path]:
    """Every file a sweep may write for `out`: a sweep checks them all under the overwrite rule
    (`subfit.files.check_output`) before it starts."""
    return [Path(f"{out}.json"), Path(f"{out}.md"), Path(f"{out}_quality.png"),
            *(map_path(out, level, i == 0) for i, level in enumerate(map_levels))]


def write_outputs(results: dict, out: str | os.PathLike, map_levels=(0.25,), *, overwrite: bool = False) -> list[Path]:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = [Path(f"{out}.json"), Path(f"{out}.md")]
    write_json(paths[0], results, overwrite=overwrite, default=_json_default)
    write_text(paths[1], markdown(results, map_levels), overwrite=overwrite)
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
