"""Phase 3: kernel microbenchmarks at decode (1 row) and prefill (4096 rows) shapes of SmolLM2-135M,
Llama-3.2-1B and Llama-3.1-8B (hidden 576 / 2048 / 4096), bf16.

Per case and implementation (ours, the PyTorch reference eager and under torch.compile,
Liger-Kernel where it has the op): microseconds per call inside a CUDA graph (the GPU's time) and
launched eagerly, and GB/s of the bytes an ideal implementation must move, against the copy
bandwidth of phase 1. Inputs rotate through sets 3x the L2 in size. The cases the targets are
read from run first, so a time box cuts the least important ones.
"""
from __future__ import annotations

import importlib.metadata

import torch

from bench.gpu.figures import Phase, attempt, phase_args
from bench.gpu.shapes import MODELS, config_of
from bench.gpu.timing import copy_bandwidth, rotation_sets, time_calls
from bench.kernels.cases import IMPLS, LIGER_OPS, Builder, ModelShape, specs

PREFILL_ROWS = 4096
# (op, model, phase, rows) the targets are read from
TARGET_CASES = [("add_rms_norm", "Llama-3.1-8B", "prefill", PREFILL_ROWS), ("bypass_ffn", "Llama-3.2-1B", "decode", 1),
                ("decode_attention", "Llama-3.2-1B", "decode", 8), ("decode_attention", "Llama-3.1-8B", "decode", 8)]


def load_liger(phase: Phase):
    """liger_kernel.ops, or None with a loud note: its column must never vanish silently."""
    try:
        import liger_kernel.ops as ops

        phase.figure("liger", f"liger-kernel {importlib.metadata.version('liger-kernel')}")
        return ops
    except Exception as error:  # noqa: BLE001 - any import failure is reported, not raised
        reason = f"{type(error).__name__}: {error}"
        phase.figure("liger", f"UNAVAILABLE ({reason})")
        phase.note(f"LIGER-KERNEL IS NOT IMPORTABLE ({reason}); its column reads 'unavailable'. Bring the pinned "
                   "wheel in .whl/ (bench/GPU_NOTES.md says how).")
        return None


def main() -> None:
    args = phase_args(__doc__.splitlines()[0])
    phase = Phase(3, "kernels", args)
    with phase.running():
        device = torch.device("cpu" if args.dry_run else "cuda")
        dtype = torch.float32 if args.dry_run else torch.bfloat16
        bandwidth = copy_bandwidth(args.work, device)
        phase.figure("copy_bandwidth_Bps", bandwidth)
        phase.figure("dtype", str(dtype).removeprefix("torch."))
        liger = load_liger(phase)
        prefill_rows = 8 if args.dry_run else PREFILL_ROWS
        builder = Builder(device, dtype, lambda moved: rotation_sets(moved, device),
                          compile_backend="eager" if args.dry_run else "inductor", liger=liger,
                          context=64 if args.dry_run else 4096)
        todo = [(op, name, ph, rows) for name in MODELS for op, ph, rows in specs(prefill_rows)]
        todo.sort(key=lambda spec: spec not in TARGET_CASES)  # stable: targets first, then model by model
        for done, (op, name, ph, rows) in enumerate(todo):
            if phase.seconds_left() < 20:  # a case (compile + four implementations) takes up to ~10 s
                phase.note(f"time box reached: {len(todo) - done} of {len(todo)} cases not measured")
                break
            with attempt(phase, f"{op} {name} {ph}"):
                measure(phase, builder.build(op, ModelShape.of(name, config_of(name, args.dry_run)), ph, rows),
                        device, bandwidth, liger, repeats=1 if args.dry_run else 10)
            if device.type == "cuda":
                torch.cuda.empty_cache()


def measure(phase: Phase, case, device: torch.device, bandwidth: float, liger, repeats: int) -> None:
    print(f"{case.op} {case.model} {case.phase} {case.shape}: {case.nbytes / 1e6:.2f} MB moved, {case.sets} sets",
          flush=True)
    for impl in IMPLS:
        row = {"op": case.op, "model": case.model, "phase": case.phase, "shape": case.shape, "impl": impl,
               "bytes": case.nbytes, "sets": case.sets}
        if impl not in case.impls:
            has_op = case.op in LIGER_OPS
            row["status"] = ("UNAVAILABLE: liger-kernel not importable" if has_op and liger is None
                             else "n/a: Liger-Kernel has no such op")
            phase.row(row)
            continue
        try:
            times = time_calls(case.impls[impl], case.sets, device, repeats)
        except Exception as error:  # noqa: BLE001 - one implementation failing is a figure, not the end
            row["status"] = f"error: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            phase.row(row)
            continue
        seconds = times.graph_s if times.graph_s is not None else times.eager_s
        row.update(eager_us=times.eager_s * 1e6, graph_us=None if times.graph_s is None else times.graph_s * 1e6,
                   gbps=case.nbytes / seconds / 1e9, pct_copy_bw=100 * case.nbytes / seconds / bandwidth,
                   status="ok" if times.graph_error is None else f"ok (no graph: {times.graph_error})")
        phase.row(row)


if __name__ == "__main__":
    main()
