"""CPU microbenchmarks of the ops' PyTorch references, eager vs torch.compile, at decode (1 row) and
prefill (128 rows) shapes of SmolLM2-135M and Llama-3.2-1B: the cases of bench/kernels/cases.py,
one pytest-benchmark group each, one thread. The Triton kernels run on a CPU only in the
interpreter, which says nothing about speed: on a GPU, `bash bench/gpu.sh` (phase 3) times every
implementation with device events. The table goes to bench/results/kernels_cpu.md.

    python -m pytest bench/kernels --benchmark-only -q      # --benchmark-disable: each case once
"""
import functools
from pathlib import Path

import pytest
import torch

from bench.gpu.shapes import MODELS
from bench.kernels.cases import Builder, Case, ModelShape, specs
from subfit.runtime.bench import memory_bandwidth

PREFILL_ROWS, CONTEXT, ROUNDS = 128, 256, 10
CPU_MODELS = ("SmolLM2-135M", "Llama-3.2-1B")
IMPLS = ("eager", "compile")
RESULTS = Path(__file__).resolve().parents[1] / "results" / "kernels_cpu.md"
CASES = [(name, op, phase, rows) for name in CPU_MODELS for op, phase, rows in specs(PREFILL_ROWS)]
MEDIANS: dict[tuple, dict[str, float]] = {}

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU run bash bench/gpu.sh (phase 3)")


@functools.lru_cache(maxsize=None)
def case(name: str, op: str, phase: str, rows: int) -> Case:
    torch.manual_seed(0)
    builder = Builder(torch.device("cpu"), torch.float32, lambda moved: 1, context=CONTEXT)
    return builder.build(op, ModelShape.of(name, MODELS[name]), phase, rows)


@pytest.fixture(scope="module", autouse=True)
def one_thread_and_table():
    """One thread (OpenMP barriers on a busy machine would swamp small ops); the table after the
    module's benchmarks (not in --benchmark-disable runs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    try:
        if MEDIANS:
            write_table()
    finally:
        torch.set_num_threads(threads)


def write_table() -> None:
    bandwidth = memory_bandwidth("cpu")
    lines = ["# subfit_kernels references on the CPU: eager vs torch.compile", "",
             f"float32; prefill = {PREFILL_ROWS} tokens; decode attention over {CONTEXT} cached tokens. Timer: "
             f"pytest-benchmark median, one thread. Measured copy bandwidth: {bandwidth / 1e9:.0f} GB/s. GB/s counts the "
             "bytes an ideal implementation reads and writes; % is of the copy bandwidth.", "",
             "| case | shape | impl | time (us) | GB/s | % copy BW |", "| --- | --- | --- | ---: | ---: | ---: |"]
    for key, by_impl in MEDIANS.items():
        c = case(*key)
        for impl, seconds in by_impl.items():
            gbs = c.nbytes / seconds / 1e9
            lines.append(f"| {c.op}/{c.model}/{c.phase} | {c.shape} | {impl} | {seconds * 1e6:.1f} | {gbs:.1f} | "
                         f"{100 * gbs * 1e9 / bandwidth:.1f} |")
    lines += ["", "measured with `python -m pytest bench/kernels --benchmark-only -q`"]
    RESULTS.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("key", CASES, ids=["/".join(map(str, k)) for k in CASES])
def test_kernel(benchmark, key, impl):
    call = case(*key).impls[impl]
    benchmark.group = "/".join(map(str, key))
    call(0)  # compile outside the timed rounds
    benchmark.pedantic(call, args=(0,), rounds=ROUNDS, iterations=1, warmup_rounds=1)
    if not benchmark.disabled:
        MEDIANS.setdefault(key, {})[impl] = benchmark.stats.stats.median
