"""Phase 1: the machine, and the two ceilings every other figure is read against.

Device name, driver, clocks and versions; the copy bandwidth (a 1 GiB device-to-device copy timed
with device events, bytes read + written) and the bf16 matrix rate (8192^3 on random data); and
the cost of one kernel launch, back to back inside a CUDA graph and from Python.
"""
from __future__ import annotations

import platform
import subprocess
import sys
import time

import torch

from bench.gpu.figures import Phase, attempt, phase_args
from bench.gpu.timing import event_seconds, time_calls
from subfit.runtime.bench import memory_bandwidth

SMI_FIELDS = ("name", "driver_version", "memory.total", "clocks.sm", "clocks.max.sm", "clocks.mem", "power.draw",
              "power.limit", "temperature.gpu", "compute_mode")


def versions() -> dict[str, str]:
    import transformers
    import triton

    return {"python": platform.python_version(), "torch": torch.__version__, "cuda": str(torch.version.cuda),
            "triton": triton.__version__, "transformers": transformers.__version__}


def nvidia_smi() -> dict[str, str]:
    query = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(SMI_FIELDS)}", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=10, check=True)
    return dict(zip(SMI_FIELDS, (v.strip() for v in query.stdout.splitlines()[0].split(","))))


def host_clock_bandwidth(device: torch.device, nbytes: int = 1 << 28) -> float:
    """The copy bandwidth as it was measured before device events: the best of five 256 MiB copies
    between host clock reads (synchronize on both sides). Kept beside the real figure only to
    check bench/GPU_NOTES.md's prediction of how far off it read."""
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * src.nbytes / best


def matmul_tflops(n: int, dtype: torch.dtype, device: torch.device) -> float:
    a, b = torch.randn(n, n, device=device).to(dtype), torch.randn(n, n, device=device).to(dtype)
    return 2 * n ** 3 / event_seconds(lambda: a @ b) / 1e12


def launch_us(device: torch.device) -> tuple[float, float | None]:
    """Microseconds per launch of a one-element kernel: (eager, in a CUDA graph)."""
    x = torch.zeros(1, device=device)
    times = time_calls(lambda i: x.add_(1.0), 1, device)
    return times.eager_s * 1e6, None if times.graph_s is None else times.graph_s * 1e6


def main() -> None:
    args = phase_args(__doc__.splitlines()[0])
    phase = Phase(1, "device", args)
    with phase.running():
        device = torch.device("cpu" if args.dry_run else "cuda")
        phase.figure("versions", versions())
        if device.type == "cuda":
            props = torch.cuda.get_device_properties(device)
            phase.figure("device", props.name)
            phase.figure("sms", props.multi_processor_count)
            phase.figure("l2_bytes", getattr(props, "L2_cache_size", None))
            phase.figure("memory_bytes", props.total_memory)
            phase.figure("capability", f"{props.major}.{props.minor}")
            with attempt(phase, "nvidia-smi"):
                phase.figure("nvidia_smi", nvidia_smi())
        else:
            phase.figure("device", f"cpu ({platform.machine()}, dry run)")
        nbytes = 1 << 30 if device.type == "cuda" else 1 << 24
        phase.figure("copy_bytes", nbytes)
        phase.figure("copy_bandwidth_Bps", memory_bandwidth(device, nbytes))
        print(f"copy bandwidth {phase.data['figures']['copy_bandwidth_Bps'] / 1e9:.0f} GB/s", flush=True)
        if device.type == "cuda":
            phase.figure("copy_bandwidth_host_clock_256MiB_Bps", host_clock_bandwidth(device))
        n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (256, torch.float32)
        with attempt(phase, "matmul"):
            phase.figure("matmul", f"{n}^3 {str(dtype).removeprefix('torch.')}")
            phase.figure("matmul_tflops", matmul_tflops(n, dtype, device))
        with attempt(phase, "launch"):
            eager, graph = launch_us(device)
            phase.figure("launch_us_eager", eager)
            phase.figure("launch_us_graph", graph)
        print(f"{sys.argv[0]}: {phase.data['figures']}", flush=True)


if __name__ == "__main__":
    main()
