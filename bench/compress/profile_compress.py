"""Where one compress spends its time: calibration, scoring walks, output-KL probes, the draws'
held-out losses, the final fitting walk; peak resident memory.

`python bench/compress/profile_compress.py [--calib FILE] [--sparsity 0.25] [--threads N]
[--out bench/results/compress_profile]` compresses the embedded SmolLM2-135M-Instruct with
compress's defaults (text sampled from the model without --calib) and writes the breakdown as JSON
(and markdown with --out). The phases are timed by wrapping the functions that do them, so the
package carries no timing code. `--set draw=N` runs only compress's draw N (what it is in a full
compress); `--float32` turns bf16 matmuls off where the machine has them, as on a CPU without bf16
units, to show what their rounding changes.
"""
from __future__ import annotations

import argparse
import functools
import json
import platform
import resource
import sys
import threading
import time
from pathlib import Path

OUTSIDE = "fits, packing and the rest"


class MemoryByPhase:
    """Peak resident memory per phase, sampled from /proc every 50 ms by a daemon thread, so the
    report says where the peak is, not only how high."""

    def __init__(self):
        self.phase = OUTSIDE
        self.peak: dict[str, float] = {}
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while True:
            with open("/proc/self/statm") as f:
                rss = int(f.read().split()[1]) * resource.getpagesize() / 2**30
            self.peak[self.phase] = max(self.peak.get(self.phase, 0.0), rss)
            time.sleep(0.05)


def timed(module, name: str, phase: str, log: dict, memory: MemoryByPhase) -> None:
    """Replace `module.name` by a wrapper that adds its wall time to `log[phase]` and names the
    phase for `memory` while it runs."""
    original = getattr(module, name)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        start, outer = time.perf_counter(), memory.phase
        memory.phase = phase
        try:
            return original(*args, **kwargs)
        finally:
            memory.phase = outer
            log.setdefault(phase, []).append(time.perf_counter() - start)

    setattr(module, name, wrapper)


def settings(items: list[str]):
    """`SubFitConfig` and `DevOptions` from FIELD=VALUE items (values in JSON; the rest default)."""
    from dataclasses import fields

    from subfit.config import DevOptions, SubFitConfig

    config_fields, dev_fields = ({f.name for f in fields(c)} for c in (SubFitConfig, DevOptions))
    known = ", ".join(sorted(config_fields | dev_fields))
    overrides = {}
    for item in items:
        name, _, value = item.partition("=")
        if name not in config_fields | dev_fields:
            raise ValueError(f"--set {item}: no field {name!r}; the fields are {known}.")
        try:
            overrides[name] = json.loads(value)
        except ValueError:
            raise ValueError(f"--set {item}: give the value in JSON, e.g. {name}=3, {name}=0.01, {name}=null.") \
                from None
    return (SubFitConfig(**{k: v for k, v in overrides.items() if k in config_fields}),
            DevOptions(**{k: v for k, v in overrides.items() if k in dev_fields}))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib", default=None, help="calibration text file (default: sampled from the model)")
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.25])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None, help="results prefix: writes PREFIX.json and PREFIX.md")
    parser.add_argument("--save", default=None, help="folder to save the plans in (one per level)")
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="SubFitConfig / DevOptions fields, e.g. selection_draws=1 (default: compress's defaults)")
    parser.add_argument("--float32", action="store_true", help="no bf16 matmuls, as on a CPU without bf16 units")
    args = parser.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from subfit import calibration, compression, hardware, models, selection

    if args.float32:
        hardware.fast_bf16 = lambda device: False  # the walks', fits' and losses' bf16 decisions all go through it

    phases: dict[str, list[float]] = {}
    memory = MemoryByPhase()
    timed(calibration, "load_calibration", "calibration", phases, memory)
    timed(selection, "walk", "scoring walks", phases, memory)
    timed(selection, "output_effects", "output-KL probes", phases, memory)
    timed(compression, "mean_token_loss", "draws' held-out loss", phases, memory)
    timed(compression, "_fit_bypasses", "final fitting walk", phases, memory)
    try:
        config, dev = settings(args.set)
    except ValueError as e:  # before the model loads
        parser.error(str(e))
    start = time.perf_counter()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    memory.phase = "model load"
    model, tokenizer, _ = models.load(None)
    memory.phase = OUTSIDE
    loaded = time.perf_counter()
    plans = compression.compress_levels(model, args.sparsity, args.calib, tokenizer=tokenizer, config=config,
                                        dev=dev, progress=False)
    done = time.perf_counter()
    total = done - loaded
    for level, plan in zip(args.sparsity, plans):
        if args.save:
            plan.save(Path(args.save) / f"{level:g}")
    result = {
        "command": "python bench/compress/profile_compress.py " + " ".join(argv),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
        "bf16_matmuls": hardware.fast_bf16("cpu"),
        "load_s": loaded - start, "compress_s": total,
        "phases": {k: {"seconds": sum(v), "calls": len(v)} for k, v in phases.items()},
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "page_faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults,  # load and compress
        "config": config.record(), "options": dev.record(),
        "plans": [{"sparsity": p.accounting()["sparsity"], "removed": p.removed_units(),
                   "selection": p.method.get("selection")} for p in plans],
    }
    accounted = sum(v["seconds"] for v in result["phases"].values())
    result["phases"][OUTSIDE] = {"seconds": total - accounted, "calls": 1}
    for name, value in result["phases"].items():
        value["peak_rss_gb"] = memory.peak.get(name)
    print(json.dumps(result, indent=1))
    if args.out:
        Path(f"{args.out}.json").write_text(json.dumps(result, indent=1) + "\n")
        rows = [f"| {name} | {v['calls']} | {v['seconds']:.0f} s | {v['seconds'] / total:.0%} | "
                f"{v['peak_rss_gb'] or 0:.2f} GB |" for name, v in result["phases"].items()]
        Path(f"{args.out}.md").write_text("\n".join([
            f"# Where compress spends its time: SmolLM2-135M-Instruct at {', '.join(map(str, args.sparsity))}", "",
            f"`{result['command']}` on {result['machine']}: compress {total:.0f} s ({total / 60:.1f} min), model "
            f"load {result['load_s']:.0f} s, peak resident memory {result['peak_rss_gb']:.2f} GB, "
            f"{result['page_faults'] / 1e6:.1f} million page faults.", "",
            "| phase | calls | time | share | peak memory |", "|---|---:|---:|---:|---:|", *rows, ""]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
