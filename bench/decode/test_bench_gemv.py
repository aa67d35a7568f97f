"""The matrix-vector product of batch-1 CPU decode, per weight shape: subfit's bf16 GEMV kernel
(`subfit/runtime/cpu_kernels.py`) against `torch.mv` in bfloat16 and float32, at 1 and 2 threads.

Each case cycles through copies of its weight totalling 512 MiB or more, so every call streams its
weight from memory as a decode step does (the caches never serve a repeat); the per-call cost shows
in the 8 x 576 case, whose weight fits in L1. GB/s counts the weight bytes read; % is of the copy
bandwidth (read + write) measured in the same run at the same thread count.

    flock /tmp/subfit-cpu.lock python -m pytest bench/decode/test_bench_gemv.py --benchmark-only -s

writes bench/results/gemv_cpu.md (+ .json). No timing is asserted.
"""
from __future__ import annotations

import itertools
import json
import statistics
from pathlib import Path

import pytest
import torch

from subfit.runtime import cpu_kernels
from subfit.runtime.bench import describe, environment, memory_bandwidth

RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results"
ROTATE_BYTES = 512 << 20
# weight [out, in]: SmolLM2-135M's qkv, o, gate+up, down and LM head; Llama-3.2-1B's gate+up and down
SHAPES = {"per-call cost": (8, 576), "SmolLM2 qkv": (960, 576), "SmolLM2 o": (576, 576),
          "SmolLM2 gate+up": (3072, 576), "SmolLM2 down": (576, 1536), "SmolLM2 LM head": (49152, 576),
          "Llama-1B gate+up": (16384, 2048), "Llama-1B down": (2048, 8192)}
IMPLS = ("subfit kernel (bf16)", "torch.mv (bf16)", "torch.mv (float32)")
THREADS = (1, 2)
ROWS: list[dict] = []
_bandwidth: dict[int, float] = {}

pytestmark = pytest.mark.skipif(not cpu_kernels.supported(), reason="the kernel needs AVX512-BF16")


def weights(shape: tuple[int, int], dtype: torch.dtype) -> list[torch.Tensor]:
    torch.manual_seed(0)
    first = torch.randn(shape).to(dtype)
    return [first] + [first.clone() for _ in range(max(1, ROTATE_BYTES // first.nbytes) - 1)]


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", SHAPES)
def test_gemv(benchmark, name, impl, threads):
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        if threads not in _bandwidth:
            _bandwidth[threads] = memory_bandwidth("cpu")
        dtype = torch.float32 if "float32" in impl else torch.bfloat16
        ws = weights(SHAPES[name], dtype)
        x = torch.randn(ws[0].shape[1])
        xd = x.to(dtype)
        product = cpu_kernels.gemv if impl.startswith("subfit") else torch.mv
        calls = itertools.count()

        def call():
            return product(ws[next(calls) % len(ws)], xd)

        benchmark.pedantic(call, rounds=200, iterations=1, warmup_rounds=len(ws))
    finally:
        torch.set_num_threads(saved)
    if benchmark.stats is None:  # --benchmark-disable: each case ran once, nothing to record
        return
    seconds = statistics.median(benchmark.stats.stats.data)
    ROWS.append({"shape": name, "out": ws[0].shape[0], "in": ws[0].shape[1], "impl": impl, "threads": threads,
                 "us": seconds * 1e6, "gb_per_s": ws[0].nbytes / seconds / 1e9,
                 "roofline": ws[0].nbytes / seconds / _bandwidth[threads]})


@pytest.fixture(scope="module", autouse=True)
def write_results():
    yield
    if not ROWS:
        return
    env = environment(torch.device("cpu"))
    env.pop("threads", None)
    lines = ["# Batch-1 CPU decode's matrix-vector product", "", describe(env), "",
             "median of 200 calls, each on another copy of the weight (512 MiB in all); "
             + ", ".join(f"copy bandwidth at {t} thread{'s' * (t > 1)}: {b / 1e9:.1f} GB/s" for t, b in _bandwidth.items()),
             "", "| weight | out x in | threads | " + " | ".join(f"{i}: us, GB/s, % copy BW" for i in IMPLS) + " |",
             "|---|---|---:|" + "---:|" * len(IMPLS)]
    for name in SHAPES:
        for threads in THREADS:
            cells = {r["impl"]: r for r in ROWS if r["shape"] == name and r["threads"] == threads}
            if not cells:
                continue
            r0 = next(iter(cells.values()))
            row = [f"{cells[i]['us']:.1f}, {cells[i]['gb_per_s']:.1f}, {cells[i]['roofline']:.0%}" if i in cells else "–"
                   for i in IMPLS]
            lines.append(f"| {name} | {r0['out']} x {r0['in']} | {threads} | " + " | ".join(row) + " |")
    lines += ["", "measured with `flock /tmp/subfit-cpu.lock python -m pytest bench/decode/test_bench_gemv.py "
              "--benchmark-only -s`"]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "gemv_cpu.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "gemv_cpu.json").write_text(json.dumps({"environment": env, "bandwidth": _bandwidth, "rows": ROWS},
                                                      indent=1))
