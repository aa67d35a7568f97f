"""Microbenchmarks of subfit_kernels at decode and prefill shapes of SmolLM2-135M and Llama-3.2-1B.

Per case, side by side (one pytest-benchmark group): our Triton kernel, the PyTorch reference
eager, the reference under torch.compile, and Liger-Kernel where it has the same op. On CUDA each
implementation is also timed with triton.testing.do_bench (median) and inside a CUDA graph (how
the decode runtime runs), and a markdown table with achieved GB/s (bytes read + written) and the
share of this device's measured copy bandwidth goes to bench/results/kernels_<device>.md. On CPU
only eager vs compile run (the Triton interpreter says nothing about speed), with few rounds.
With --benchmark-disable every implementation runs once: a smoke test, and no table is written.
"""
import functools
import re
import statistics
import time
from pathlib import Path
from typing import Callable, NamedTuple

import pytest
import torch

import subfit_kernels as K

ON_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if ON_CUDA else "cpu"
DTYPE = torch.bfloat16 if ON_CUDA else torch.float32
PREFILL_TOKENS = 2048 if ON_CUDA else 128
CONTEXT = 2048 if ON_CUDA else 256  # cached tokens seen by decode attention
ROUNDS = 50 if ON_CUDA else 10
EPS = 1e-5
RESULTS_DIR = Path(__file__).resolve().parents[1] / "results"

MODELS = {
    "smollm2-135m": dict(hidden=576, q_heads=9, kv_heads=3, head_dim=64, ffn=1536, attn_rank=64, ffn_rank=256),
    "llama3.2-1b": dict(hidden=2048, q_heads=32, kv_heads=8, head_dim=64, ffn=8192, attn_rank=128, ffn_rank=512),
}
IMPLS = ["triton", "eager", "compile", "liger"]


class Case(NamedTuple):
    shape: str
    nbytes: int  # bytes read + written by an ideal implementation
    run: dict[str, Callable[[], object]]  # implementation -> zero-argument call


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
    return (scale * torch.randn(*shape, device=DEVICE)).to(DTYPE)


def _impls(kernel: Callable, reference: Callable, *args, liger: Callable | None = None) -> dict[str, Callable]:
    compiled = torch.compile(reference, dynamic=False)
    run = {
        "triton": lambda: kernel(*args, backend="triton"),
        "eager": lambda: reference(*args),
        "compile": lambda: compiled(*args),
    }
    if liger is not None:
        run["liger"] = liger
    return run


def _liger(name: str):
    try:
        import liger_kernel.ops as ops

        return getattr(ops, name)
    except (ImportError, AttributeError):
        return None


def _add_rms_norm(cfg: dict, rows: int) -> Case:
    x, residual, weight = _randn(rows, cfg["hidden"]), _randn(rows, cfg["hidden"]), _randn(cfg["hidden"])
    liger_fn = _liger("fused_add_rms_norm_forward")
    liger = (lambda: liger_fn(x, residual, weight, EPS, 0.0, "llama")) if liger_fn else None
    run = _impls(K.add_rms_norm, K.add_rms_norm_reference, x, residual, weight, EPS, liger=liger)
    return Case(f"[{rows}, {cfg['hidden']}]", _nbytes(x, residual, weight, x, x), run)


def _swiglu(cfg: dict, rows: int) -> Case:
    gate, up = _randn(rows, cfg["ffn"]), _randn(rows, cfg["ffn"])
    liger_fn = _liger("swiglu_forward")
    liger = (lambda: liger_fn(gate, up)) if liger_fn else None
    return Case(f"[{rows}, {cfg['ffn']}]", _nbytes(gate, up, gate), _impls(K.swiglu, K.swiglu_reference, gate, up, liger=liger))


def _bypass(cfg: dict, rows: int, rank_key: str) -> Case:
    hidden, rank = cfg["hidden"], cfg[rank_key]
    x, residual = _randn(rows, hidden), _randn(rows, hidden)
    norm_weight, bias = _randn(hidden), _randn(hidden, scale=0.1)
    down, up = _randn(hidden, rank, scale=hidden**-0.5), _randn(rank, hidden, scale=rank**-0.5)
    args = (x, residual, norm_weight, EPS, down, up, bias)
    nbytes = _nbytes(x, residual, x, norm_weight, down, up, bias)
    return Case(f"[{rows}, {hidden}] r={rank}", nbytes, _impls(K.fused_bypass, K.fused_bypass_reference, *args))


def _rope(cfg: dict, tokens: int) -> Case:
    hq, hkv, d = cfg["q_heads"], cfg["kv_heads"], cfg["head_dim"]
    qkv = _randn(1, tokens, (hq + 2 * hkv) * d)  # q, k, v are views of one fused projection
    q, k, v = (t.unflatten(-1, (-1, d)) for t in qkv.split([hq * d, hkv * d, hkv * d], dim=-1))
    max_pos = CONTEXT + PREFILL_TOKENS
    angles = torch.arange(max_pos, device=DEVICE)[:, None] * torch.rand(d // 2, device=DEVICE)
    cos, sin = angles.cos(), angles.sin()
    start = 0 if tokens > 1 else CONTEXT  # prefill from 0; decode appends after CONTEXT tokens
    positions = torch.arange(start, start + tokens, device=DEVICE)[None]
    k_cache = torch.zeros(1, hkv, max_pos, d, dtype=DTYPE, device=DEVICE)
    v_cache = torch.zeros_like(k_cache)

    def kernel(*args, backend):
        return K.apply_rope(*args, k_cache=k_cache, v_cache=v_cache, v=v, backend=backend)

    def reference(*args):
        return K.apply_rope_reference(*args, k_cache=k_cache, v_cache=v_cache, v=v)

    nbytes = 2 * _nbytes(q, k) + 3 * _nbytes(v) + 2 * tokens * (d // 2) * 4
    return Case(f"T={tokens} {hq}/{hkv} heads d={d}", nbytes, _impls(kernel, reference, q, k, cos, sin, positions))


def _decode_attention(cfg: dict, batch: int) -> Case:
    hq, hkv, d = cfg["q_heads"], cfg["kv_heads"], cfg["head_dim"]
    q = _randn(batch, hq, d)
    k_cache, v_cache = _randn(batch, hkv, CONTEXT, d), _randn(batch, hkv, CONTEXT, d)
    seq_lens = torch.full((batch,), CONTEXT, dtype=torch.int32, device=DEVICE)
    run = _impls(K.decode_attention, K.decode_attention_reference, q, k_cache, v_cache, seq_lens)
    return Case(f"B={batch} ctx={CONTEXT} {hq}/{hkv} heads d={d}", _nbytes(q, q, k_cache, v_cache, seq_lens), run)


def _case_builders() -> dict[str, Callable[[], Case]]:
    builders = {}
    for model, cfg in MODELS.items():
        for phase, rows in (("decode", 1), ("prefill", PREFILL_TOKENS)):
            builders[f"add_rms_norm/{model}/{phase}"] = functools.partial(_add_rms_norm, cfg, rows)
            builders[f"swiglu/{model}/{phase}"] = functools.partial(_swiglu, cfg, rows)
            builders[f"rope+cache/{model}/{phase}"] = functools.partial(_rope, cfg, rows)
            builders[f"bypass_attn/{model}/{phase}"] = functools.partial(_bypass, cfg, rows, "attn_rank")
            builders[f"bypass_ffn/{model}/{phase}"] = functools.partial(_bypass, cfg, rows, "ffn_rank")
        builders[f"decode_attention/{model}/decode"] = functools.partial(_decode_attention, cfg, 1)
    return builders


BUILDERS = _case_builders()


@functools.lru_cache(maxsize=None)
def case(name: str) -> Case:
    """Inputs are built once per case and shared by its implementations."""
    torch.manual_seed(0)
    return BUILDERS[name]()


def _synced(fn: Callable) -> Callable:
    if not ON_CUDA:
        return fn
    return lambda: (fn(), torch.cuda.synchronize())


def _cuda_times(fn: Callable) -> tuple[float, float | None]:
    """(do_bench median, CUDA-graph median) in seconds; the graph time is None where capture fails."""
    import triton.testing

    eager = triton.testing.do_bench(fn, return_mode="median") / 1e3
    try:
        graph = triton.testing.do_bench_cudagraph(fn, return_mode="median") / 1e3
    except Exception:  # e.g. an implementation that syncs with the host cannot be captured
        graph = None
    return eager, graph


@functools.lru_cache(maxsize=1)
def copy_bandwidth() -> float:
    """Bytes/s of a large device-to-device copy_ (read + write), measured in this run."""
    src = torch.empty(2**28 if ON_CUDA else 2**24, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    if ON_CUDA:
        import triton.testing

        seconds = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median") / 1e3
    else:
        samples = []
        for _ in range(5):
            start = time.perf_counter()
            dst.copy_(src)
            samples.append(time.perf_counter() - start)
        seconds = statistics.median(samples)
    return 2 * src.numel() / seconds


RESULTS: dict[str, dict[str, tuple[float, float | None]]] = {}


@pytest.fixture(scope="module", autouse=True)
def results_table():
    """Writes the table after the module's benchmarks ran (not in --benchmark-disable runs). On CPU
    everything runs on one thread: OpenMP barriers on a busy machine would swamp small ops."""
    threads = torch.get_num_threads()
    if not ON_CUDA:
        torch.set_num_threads(1)
    yield
    try:
        if RESULTS:
            _write_table()
    finally:
        torch.set_num_threads(threads)


def _write_table() -> None:
    device = torch.cuda.get_device_name() if ON_CUDA else "cpu"
    slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")
    bandwidth = copy_bandwidth()
    timer = ("triton.testing.do_bench median; graph: do_bench_cudagraph median" if ON_CUDA
             else "pytest-benchmark median, one thread")
    lines = [
        f"# subfit_kernels microbenchmarks on {device}",
        "",
        f"dtype {str(DTYPE).removeprefix('torch.')}; prefill = {PREFILL_TOKENS} tokens; decode attention over "
        f"{CONTEXT} cached tokens. Timer: {timer}. Measured copy bandwidth: {bandwidth / 1e9:.0f} GB/s. "
        "GB/s counts the bytes an ideal implementation reads and writes; % is of the copy bandwidth.",
        "",
        "| case | shape | impl | time (us) | GB/s | % copy BW |" + (" graph (us) | graph GB/s |" if ON_CUDA else ""),
        "| --- | --- | --- | ---: | ---: | ---: |" + (" ---: | ---: |" if ON_CUDA else ""),
    ]
    for name in BUILDERS:
        for impl, (seconds, graph) in RESULTS.get(name, {}).items():
            c = case(name)
            gbs = c.nbytes / seconds / 1e9
            row = f"| {name} | {c.shape} | {impl} | {seconds * 1e6:.1f} | {gbs:.1f} | {100 * gbs * 1e9 / bandwidth:.1f} |"
            if ON_CUDA:
                row += f" {graph * 1e6:.1f} | {c.nbytes / graph / 1e9:.1f} |" if graph else " n/a | n/a |"
            lines.append(row)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / f"kernels_{slug}.md").write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", list(BUILDERS))
def test_kernel(benchmark, name: str, impl: str):
    if not ON_CUDA and impl in ("triton", "liger"):
        pytest.skip(f"{impl} on CPU runs only in Triton's interpreter, which says nothing about speed")
    fn = case(name).run.get(impl)
    if fn is None:
        pytest.skip(f"{impl} has no implementation of {name.split('/')[0]} (or liger_kernel is not importable)")
    benchmark.group = name
    fn()  # compile / autotune outside the timed rounds
    benchmark.pedantic(_synced(fn), rounds=ROUNDS, iterations=1, warmup_rounds=1)
    if not benchmark.disabled:
        timed = _cuda_times(fn) if ON_CUDA else (benchmark.stats.stats.median, None)
        RESULTS.setdefault(name, {})[impl] = timed
