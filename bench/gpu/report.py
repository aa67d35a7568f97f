"""Merge the phases' figures into OUT/gpu.json and OUT/gpu.md, read the targets off them, and print
the closing table. Runs after every phase (a run cut short still leaves its report) and imports
no torch, so it takes a fraction of a second.

    python -m bench.gpu.report --work WORK --out OUT
"""
from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

PHASES = {1: "device: versions, copy bandwidth, bf16 matmul", 2: "CUDA tests", 3: "kernel microbenchmarks",
          4: "decode: transformers vs runtime", 5: "compress Llama-3.2-1B shape at 25% on the GPU"}
TIMED_OUT = (124, 137)


def load_phases(work: Path) -> dict[int, dict]:
    """Each phase's JSON (with its children's rows and notes merged in) and how its process ended."""
    phases: dict[int, dict] = {}
    for number in PHASES:
        path = work / f"phase{number}.json"
        data = json.loads(path.read_text()) if path.exists() else {"figures": {}, "rows": [], "notes": [],
                                                                    "status": "no output"}
        for part in sorted(work.glob(f"phase{number}_*.json")):
            child = json.loads(part.read_text())
            data["rows"] += child["rows"]
            data["notes"] += child["notes"] + ([f"{part.stem}: {child['status']}"] if child["status"] != "ok" else [])
        rc_file = work / f"phase{number}.rc"
        if rc_file.exists():
            rc, box, seconds = (float(v) for v in rc_file.read_text().split())
            data.update(exit=int(rc), box_s=box, wall_s=seconds)
            if int(rc) in TIMED_OUT:
                data["status"] = f"TIMED OUT at its {box:.0f} s box"
            elif rc and data["status"] in ("ok", "running"):
                data["status"] = f"exit {int(rc)}"
        elif data["status"] == "running":
            data["status"] = "did not finish"
        phases[number] = data
    return phases


def _rows(phases, number, **match) -> list[dict]:
    return [r for r in phases[number]["rows"] if all(r.get(k) == v for k, v in match.items())]


def _one(phases, number, **match) -> dict | None:
    rows = _rows(phases, number, **match)
    return rows[0] if rows else None


def _us(row: dict | None) -> float | None:
    """A kernel row's per-call time: inside a CUDA graph where there is one."""
    if row is None or row.get("eager_us") is None:
        return None
    return row["graph_us"] if row.get("graph_us") is not None else row["eager_us"]


def targets(phases: dict[int, dict]) -> list[dict]:
    """The performance targets (bench/GPU_NOTES.md), each with what was measured (None: not in this run)."""
    figures = phases[1]["figures"]
    bandwidth, launch = figures.get("copy_bandwidth_Bps"), figures.get("launch_us_graph")
    out = []

    def target(name: str, goal: str, measured: float | None, met: bool | None, unit: str = "") -> None:
        out.append({"target": name, "goal": goal, "measured": None if measured is None else round(measured, 3),
                    "unit": unit, "met": met})

    norm = dict(op="add_rms_norm", model="Llama-3.1-8B", phase="prefill")
    ours, liger = _one(phases, 3, impl="triton", **norm), _one(phases, 3, impl="liger", **norm)
    pct = ours.get("pct_copy_bw") if ours else None
    target("add+RMSNorm 4096x4096: % of copy bandwidth", ">= 90", pct, None if pct is None else pct >= 90, "%")
    ratio = _us(liger) / _us(ours) if _us(liger) and _us(ours) else None
    target("add+RMSNorm 4096x4096: Liger time / ours", ">= 1.0", ratio, None if ratio is None else ratio >= 1.0, "x")

    bypass = dict(op="bypass_ffn", model="Llama-3.2-1B", phase="decode")
    ours, eager = _one(phases, 3, impl="triton", **bypass), _one(phases, 3, impl="eager", **bypass)
    if ours and _us(ours) and bandwidth and launch:
        floor_us = ours["bytes"] / bandwidth * 1e6 + launch
        target("bypass 1 row h2048 r1024: time / (bytes / bandwidth + 1 launch)", "<= 1.3",
               _us(ours) / floor_us, _us(ours) / floor_us <= 1.3, "x")
    else:
        target("bypass 1 row h2048 r1024: time / (bytes / bandwidth + 1 launch)", "<= 1.3", None, None, "x")
    ratio = _us(eager) / _us(ours) if _us(eager) and _us(ours) else None
    target("bypass 1 row h2048 r1024: eager reference time / ours (graphs)", ">= 2", ratio,
           None if ratio is None else ratio >= 2, "x")

    for model in ("Llama-3.2-1B", "Llama-3.1-8B"):
        row = _one(phases, 3, op="decode_attention", model=model, impl="triton", shape=_attention_shape(phases, model))
        pct = row.get("pct_copy_bw") if row else None
        target(f"decode attention ctx 4096 batch 8 {model}: % of copy BW", ">= 70", pct,
               None if pct is None else pct >= 70, "%")

    decode = dict(model="Llama-3.2-1B", batch=1)
    dense = _one(phases, 4, contender="runtime dense", **decode)
    roof = 100 * dense["roofline"] if dense and dense.get("roofline") is not None else None
    target("decode 1B batch 1: runtime dense % of roofline", ">= 60 (aim 75)", roof,
           None if roof is None else roof >= 60, "%")
    for label, goal in (("transformers static cache + torch.compile", 1.3), ("transformers eager", 3.0)):
        other = _one(phases, 4, contender=label, **decode)
        ratio = dense["tokens_per_s"] / other["tokens_per_s"] if dense and other else None
        target(f"decode 1B batch 1: runtime dense / {label}", f">= {goal}", ratio,
               None if ratio is None else ratio >= goal, "x")
    plan25 = _one(phases, 4, contender="runtime 25%", **decode)
    ratio = plan25["tokens_per_s"] / dense["tokens_per_s"] if dense and plan25 else None
    target("decode 1B batch 1: runtime 25% / runtime dense", ">= 1.2", ratio,
           None if ratio is None else ratio >= 1.2, "x")
    runtime_rows = [r for r in phases[4]["rows"] if "kv_exact" in r]
    exact = sum(r["kv_exact"] for r in runtime_rows)
    target("KV bytes = retained / all attention x dense (every row)", "exact", exact if runtime_rows else None,
           exact == len(runtime_rows) if runtime_rows else None, f" of {len(runtime_rows)} rows exact")
    return out


def _attention_shape(phases, model: str) -> str | None:
    shapes = [r["shape"] for r in _rows(phases, 3, op="decode_attention", model=model) if r["shape"].startswith("B=8 ")]
    return shapes[0] if shapes else None


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _met(flag, dry_run: bool) -> str:
    if dry_run:
        return "dry run"
    return {True: "met", False: "MISSED", None: "not measured"}[flag]


def kernel_table(phases) -> list[str]:
    """One line per case: per implementation, us per call at decode shapes, GB/s (% of copy) at prefill."""
    impls = ("triton", "eager", "compile", "liger")
    lines = ["| op | model | shape | " + " | ".join(impls) + " |", "|---|---|---|" + "---:|" * len(impls)]
    cases: dict[tuple, dict[str, dict]] = {}
    for r in phases[3]["rows"]:
        cases.setdefault((r["op"], r["model"], r["phase"], r["shape"]), {})[r["impl"]] = r
    for (op, model, phase, shape), by_impl in cases.items():
        cells = []
        for impl in impls:
            r = by_impl.get(impl)
            if r is None or _us(r) is None:
                cells.append((r or {}).get("status", "-").split(":")[0])
            elif phase == "decode":
                cells.append(f"{_us(r):.1f} us" + ("" if r.get("graph_us") is not None else " (eager)"))
            else:
                cells.append(f"{r['gbps']:.0f} GB/s ({r['pct_copy_bw']:.0f}%)")
        lines.append(f"| {op} | {model} | {shape} | " + " | ".join(cells) + " |")
    return lines


def decode_table(phases) -> list[str]:
    lines = ["| model | batch | contender | tokens/s | ms/token | % roofline | KV bytes/token | KV exact |",
             "|---|---:|---|---:|---:|---:|---:|---|"]
    for r in phases[4]["rows"]:
        roof = f"{100 * r['roofline']:.0f}%" if r.get("roofline") is not None else "-"
        lines.append(f"| {r['model']} | {r['batch']} | {r['contender']} | {r['tokens_per_s']:.1f} | "
                     f"{r['decode_ms_per_token']:.3f} | {roof} | {r['kv_bytes_per_token']:,} | {_fmt(r.get('kv_exact'))} |")
    return lines


def markdown(phases, goals, dry_run: bool) -> str:
    f1 = phases[1]["figures"]
    smi = f1.get("nvidia_smi", {})
    bw = f1.get("copy_bandwidth_Bps")
    lines = [f"# GPU check{' (DRY RUN on the CPU: no figure here is a measurement)' if dry_run else ''}: "
             f"{f1.get('device', 'unknown device')}", "",
             f"{datetime.date.today()}; driver {smi.get('driver_version', '-')}; {json.dumps(f1.get('versions', {}))}",
             "", "Reproduce: `bash bench/gpu.sh` from the repository root (bench/GPU_NOTES.md).", "",
             "## Phases", "", "| phase | what | status | seconds (box) |", "|---|---|---|---:|"]
    for n, what in PHASES.items():
        p = phases[n]
        lines.append(f"| {n} | {what} | {p['status']} | {_fmt(p.get('wall_s'))} ({_fmt(p.get('box_s'))}) |")
    lines += ["", "## Ceilings", "",
              f"- copy bandwidth: {_fmt(bw and bw / 1e9)} GB/s ({_fmt(f1.get('copy_bytes'))} B copied, read + write counted, "
              f"device events, median of 10); the former host-clock timer (256 MiB, best of 5) read "
              f"{_fmt((f1.get('copy_bandwidth_host_clock_256MiB_Bps') or 0) / 1e9)} GB/s",
              f"- matmul: {_fmt(f1.get('matmul_tflops'))} TFLOP/s ({f1.get('matmul', '-')}, random data)",
              f"- one launch: {_fmt(f1.get('launch_us_graph'))} us in a CUDA graph, {_fmt(f1.get('launch_us_eager'))} us eager",
              f"- device: {f1.get('sms', '-')} SMs, L2 {_fmt(f1.get('l2_bytes'))} B; nvidia-smi: {json.dumps(smi)}",
              "", "## Targets", "", "| target | goal | measured | |", "|---|---|---:|---|"]
    lines += [f"| {g['target']} | {g['goal']} | {_fmt(g['measured'])}{g['unit'] if g['measured'] is not None else ''} | "
              f"{_met(g['met'], dry_run)} |" for g in goals]
    f2 = phases[2]["figures"]
    lines += ["", "## Phase 2: CUDA tests", "", f"- counts: {json.dumps(f2.get('counts', {}))}",
              f"- kernel tests by dtype: {json.dumps(f2.get('kernel_tests_by_dtype', {}))}"]
    lines += [f"- FAILED {line}" for line in f2.get("failures", [])]
    f3 = phases[3]["figures"]
    lines += ["", "## Phase 3: kernels", "",
              f"{f3.get('dtype', '-')}; decode shapes: us per call inside a CUDA graph (inputs rotating past L2); "
              f"prefill: GB/s of the bytes that must move (% of the copy bandwidth); Liger-Kernel: {f3.get('liger', '-')}",
              ""] + kernel_table(phases)
    errors = [f"- {r['op']} {r['model']} {r['shape']} {r['impl']}: {r['status']}" for r in phases[3]["rows"]
              if r.get("status", "").startswith(("error", "UNAVAILABLE"))]
    if errors:
        lines += ["", "Implementations that did not run:", ""] + errors
    lines += ["", "## Phase 4: decode", "",
              "random-weight bf16 models; % roofline = (weights + KV read per step) / time / copy bandwidth", ""]
    lines += decode_table(phases)
    f5 = phases[5]["figures"]
    lines += ["", "## Phase 5: compress", "", f"- {f5.get('setting', '-')}",
              f"- compress {_fmt(f5.get('compress_s'))} s (model built in {_fmt(f5.get('model_build_s'))} s); peak GPU "
              f"memory allocated {_fmt((f5.get('peak_gpu_allocated_bytes') or 0) / 1e9)} GB, reserved "
              f"{_fmt((f5.get('peak_gpu_reserved_bytes') or 0) / 1e9)} GB (the model's "
              f"{_fmt((f5.get('model_bytes') or 0) / 1e9)} GB included); sparsity {_fmt(f5.get('sparsity'))}"]
    notes = [f"- phase {n}: {note}" for n, p in phases.items() for note in p["notes"]]
    if notes:
        lines += ["", "## Notes", ""] + notes
    return "\n".join(lines) + "\n"


def closing_table(phases, goals, out: Path, dry_run: bool) -> str:
    f1 = phases[1]["figures"]
    bw = f1.get("copy_bandwidth_Bps")
    lines = ["", "=" * 100, f"GPU CHECK: {f1.get('device', '?')}   copy {_fmt(bw and bw / 1e9)} GB/s   "
             f"matmul {_fmt(f1.get('matmul_tflops'))} TFLOP/s   launch {_fmt(f1.get('launch_us_graph'))} us (graph)"]
    lines += [f"  phase {n} {what[:48]:48s} {phases[n]['status'][:60]}" for n, what in PHASES.items()]
    counts = phases[2]["figures"].get("counts", {})
    lines.append("  tests: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    lines += [f"  {_met(g['met'], dry_run):12s} {g['target']:66s} {_fmt(g['measured'])}{g['unit'] if g['measured'] is not None else ''}"
              f" (goal {g['goal']})" for g in goals]
    if str(phases[3]["figures"].get("liger", "")).startswith("UNAVAILABLE"):
        lines.append("  LIGER-KERNEL UNAVAILABLE: " + phases[3]["figures"]["liger"])
    liger_rows = [r for r in _rows(phases, 3, impl="liger") if not r["status"].startswith("n/a")]
    failed = [r for r in liger_rows if r["status"].startswith("error")]
    if failed:  # an erroring column must be as loud as a missing one
        lines.append(f"  LIGER-KERNEL FAILED in {len(failed)} of {len(liger_rows)} cases, first: {failed[0]['status']}"
                     + (" (its kernels cannot run in Triton's interpreter)" if dry_run else ""))
    lines.append(f"  full figures: {out / 'gpu.md'}, {out / 'gpu.json'}, log {out / 'gpu.log'}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--print", action="store_true", help="print the closing table")
    args = parser.parse_args()
    phases = load_phases(args.work)
    dry_run = any(p.get("dry_run") for p in phases.values())
    goals = targets(phases)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu.json").write_text(json.dumps({"dry_run": dry_run, "phases": phases, "targets": goals}, indent=1))
    (args.out / "gpu.md").write_text(markdown(phases, goals, dry_run))
    if args.print:
        print(closing_table(phases, goals, args.out, dry_run))


if __name__ == "__main__":
    main()
