"""The whole-unit CPU decode kernels (`attention_decode`, `feed_forward_decode`, `bypass_decode` in
`subfit/runtime/cpu_kernels.cpp`) against float64 references that round to bfloat16 where the
kernels do (the normed input of a bf16 matmul, q, the cached k and v, the attention output, the
SwiGLU activation), and the runtime routing a bf16 batch-1 decode step through them."""
from __future__ import annotations

import math

import pytest
import torch

from subfit.runtime import Runtime, cpu_kernels

pytestmark = pytest.mark.skipif(not cpu_kernels.supported(), reason="this CPU lacks AVX512-BF16")

BF16_EPS = 2.0 ** -8
X_KINDS = ["x_f32", "x_bf16", "x_f16", "no_x"]  # x: the pending output of the unit before
PROMPTS = ["Once upon a time", "Lily and Ben", "The cat sat on the", "One day, a little boy named Tim"]


@pytest.fixture(scope="module")
def kernels():
    return cpu_kernels.decode_kernels()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def rounded(t: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """`t` as the kernels store it between float32 sums: in the weights' dtype."""
    return t.to(dtype).double()


DTYPES = [torch.bfloat16, torch.float32]
TOLERANCE = {torch.bfloat16: 4 * BF16_EPS, torch.float32: 1e-5}  # several bf16 roundings; float32 sums


def stream(hidden: int, x_kind: str) -> tuple[torch.Tensor | None, torch.Tensor]:
    residual = torch.randn(1, 1, hidden) * 3
    dtypes = {"x_f32": torch.float32, "x_bf16": torch.bfloat16, "x_f16": torch.float16}
    x = None if x_kind == "no_x" else torch.randn(1, 1, hidden, dtype=dtypes[x_kind])
    return x, residual


def open_reference(x, residual, norm_weight, eps) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, normed) of a unit's opening add + RMSNorm, float64, flattened."""
    h = residual.double().flatten() + (0 if x is None else x.double().flatten())
    return h, norm_weight.double() * h * torch.rsqrt(h.pow(2).mean() + eps)


def with_threads(threads: int, fn):
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return fn()
    finally:
        torch.set_num_threads(saved)


def rope_tables(max_seq: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / 10000 ** (torch.arange(0, dim, 2).double() / dim)
    angles = torch.arange(max_seq).double()[:, None] * inv[None]
    return angles.cos().float(), angles.sin().float()


def attention_reference(x, residual, norm_weight, eps, wqkv, bqkv, wo, cos, sin, pos, k_cache, v_cache, n_head):
    dtype = wqkv.dtype
    h, normed = open_reference(x, residual, norm_weight, eps)
    qkv = wqkv.double() @ rounded(normed, dtype) + (0 if bqkv is None else bqkv.double())
    n_kv, dim = k_cache.shape[1], k_cache.shape[3]
    half = dim // 2
    heads = qkv.view(n_head + 2 * n_kv, dim).clone()
    c, s = cos[pos].double(), sin[pos].double()
    first, second = heads[: n_head + n_kv, :half].clone(), heads[: n_head + n_kv, half:].clone()
    heads[: n_head + n_kv, :half] = first * c - second * s
    heads[: n_head + n_kv, half:] = second * c + first * s
    q, k, v = (rounded(part, dtype) for part in heads.split([n_head, n_kv, n_kv]))
    keys, values = k_cache[0, :, : pos + 1].double().clone(), v_cache[0, :, : pos + 1].double().clone()
    keys[:, pos], values[:, pos] = k, v
    group = n_head // n_kv
    y = torch.empty(n_head, dim, dtype=torch.float64)
    for head in range(n_head):
        scores = keys[head // group] @ q[head] / math.sqrt(dim)
        y[head] = torch.softmax(scores, 0) @ values[head // group]
    return h, h + wo.double() @ rounded(y.flatten(), dtype), k, v


# hidden, n_head, n_kv, head_dim, position: stories260K's, SmolLM2's, odd sizes, one KV head, more
# query heads per KV head than one pass serves (18 > 16), and a cache long enough that the KV heads
# are split over threads
ATTENTION_SHAPES = [(64, 8, 4, 8, 0), (576, 9, 3, 64, 37), (70, 5, 1, 14, 10), (33, 6, 2, 10, 3),
                    (40, 18, 1, 8, 20), (96, 6, 2, 24, 300)]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("x_kind", X_KINDS)
@pytest.mark.parametrize("shape", ATTENTION_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_attention_decode_matches_float64(kernels, dtype, shape, x_kind, with_bias, threads):
    hidden, n_head, n_kv, dim, pos = shape
    max_seq = pos + 5
    x, residual = stream(hidden, x_kind)
    residual_before = residual.clone()
    norm_weight, eps = torch.rand(hidden) + 0.5, 1e-5
    rows = (n_head + 2 * n_kv) * dim
    wqkv = (torch.randn(rows, hidden) / hidden ** 0.5).to(dtype)
    bqkv = torch.randn(rows).to(dtype) if with_bias else None
    wo = (torch.randn(hidden, n_head * dim) / (n_head * dim) ** 0.5).to(dtype)
    cos, sin = rope_tables(max_seq, dim)
    k_cache = torch.randn(1, n_kv, max_seq, dim).to(dtype)
    v_cache = torch.randn(1, n_kv, max_seq, dim).to(dtype)
    k_cache[:, :, pos:], v_cache[:, :, pos:] = float("nan"), float("nan")  # poisoned: the new slot and the future
    k_before, v_before = k_cache.clone(), v_cache.clone()
    h, expected, k, v = attention_reference(x, residual, norm_weight, eps, wqkv, bqkv, wo, cos, sin, pos,
                                            k_cache, v_cache, n_head)
    out = with_threads(threads, lambda: kernels.attention_decode(
        x, residual, norm_weight, eps, wqkv, bqkv, wo, None, cos, sin, pos, k_cache, v_cache, n_head))
    assert out.shape == residual.shape and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert rel_err(out.flatten() - h, expected - h) < TOLERANCE[dtype]
    assert rel_err(k_cache[0, :, pos], k) < TOLERANCE[dtype] and rel_err(v_cache[0, :, pos], v) < TOLERANCE[dtype]
    others = torch.ones(max_seq, dtype=torch.bool)
    others[pos] = False  # every other position, the poisoned future included, is left as it was (bit for bit)
    assert torch.equal(k_cache[:, :, others].view(torch.uint8), k_before[:, :, others].view(torch.uint8))
    assert torch.equal(v_cache[:, :, others].view(torch.uint8), v_before[:, :, others].view(torch.uint8))
    assert torch.equal(residual, residual_before)  # an input, never written


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("x_kind", X_KINDS)
@pytest.mark.parametrize("hidden, inter", [(64, 96), (576, 1536), (17, 33), (70, 131)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_feed_forward_decode_matches_float64(kernels, dtype, hidden, inter, x_kind, threads):
    x, residual = stream(hidden, x_kind)
    residual_before = residual.clone()
    norm_weight, eps = torch.rand(hidden) + 0.5, 1e-6
    w13 = (torch.randn(2 * inter, hidden) / hidden ** 0.5).to(dtype)
    w2 = (torch.randn(hidden, inter) / inter ** 0.5).to(dtype)
    h, normed = open_reference(x, residual, norm_weight, eps)
    gate, up = (w13.double() @ rounded(normed, dtype)).chunk(2)
    expected = h + w2.double() @ rounded(torch.nn.functional.silu(gate) * up, dtype)
    out = with_threads(threads, lambda: kernels.feed_forward_decode(x, residual, norm_weight, eps, w13, w2))
    assert out.shape == residual.shape and out.dtype == torch.float32
    assert rel_err(out.flatten() - h, expected - h) < TOLERANCE[dtype]
    assert torch.equal(residual, residual_before)


@pytest.mark.parametrize("x_kind", X_KINDS)
@pytest.mark.parametrize("hidden, rank", [(64, 8), (576, 72), (575, 287), (17, 1)], ids=str)
def test_bypass_decode_matches_float64(kernels, hidden, rank, x_kind):
    x, residual = stream(hidden, x_kind)
    norm_weight, eps = torch.rand(hidden) + 0.5, 1e-6
    down, up, bias = torch.randn(hidden, rank), torch.randn(rank, hidden) / rank ** 0.5, torch.randn(hidden)
    h, normed = open_reference(x, residual, norm_weight, eps)
    expected = h + (normed @ down.double()) @ up.double() + bias.double()
    out = kernels.bypass_decode(x, residual, norm_weight, eps, down, up, bias)
    assert rel_err(out.flatten() - h, expected - h) < 1e-5  # float32 throughout


def test_unit_kernels_refuse_bad_arguments(kernels):
    hidden, inter = 64, 96
    residual, norm_weight = torch.randn(1, 1, hidden), torch.ones(hidden)
    w13, w2 = torch.randn(2 * inter, hidden).bfloat16(), torch.randn(hidden, inter).bfloat16()
    with pytest.raises(RuntimeError, match="w2 must be a contiguous BFloat16"):
        kernels.feed_forward_decode(None, residual, norm_weight, 1e-6, w13, w2.float())  # mixed dtypes
    with pytest.raises(RuntimeError, match="w13 must be a contiguous bfloat16 or float32"):
        kernels.feed_forward_decode(None, residual, norm_weight, 1e-6, w13.half(), w2.half())
    with pytest.raises(RuntimeError, match="residual must be one contiguous float32 row"):
        kernels.feed_forward_decode(None, torch.randn(1, 2, hidden), norm_weight, 1e-6, w13, w2)
    cos, sin = rope_tables(8, 16)
    cache = torch.zeros(1, 2, 8, 16, dtype=torch.bfloat16)
    wqkv, wo = torch.randn(8 * 16, hidden).bfloat16(), torch.randn(hidden, 4 * 16).bfloat16()
    with pytest.raises(RuntimeError, match="position 8 is outside the cache"):
        kernels.attention_decode(None, residual, norm_weight, 1e-6, wqkv, None, wo, None, cos, sin, 8, cache,
                                 cache.clone(), 4)


@pytest.mark.parametrize("shape", ["empty", "p25"])
def test_bf16_decode_runs_whole_units_and_is_as_close_to_float32(stories, plan_of, shape):
    """stories260K in bf16: every unit of a decode step is one kernel call, and its logits are at
    least as close to the float32 runtime's as the same model run op by op (the units' kernels
    switched off), all three fed the float32 runtime's greedy tokens for 32 steps."""
    model, tokenizer, source = stories
    plan = plan_of(model, source, shape)
    fused, op_by_op = (Runtime.from_hf(model, plan, tokenizer, dtype=torch.bfloat16) for _ in range(2))
    reference = Runtime.from_hf(model, plan, tokenizer, dtype=torch.float32)
    units = [u for block in fused.model.layers for u in (block.attn, block.ffn) if u is not None]
    assert units and all(u.decode_kernel is not None for u in units)
    for unit in (u for block in op_by_op.model.layers for u in (block.attn, block.ffn) if u is not None):
        unit.decode_kernel = None
    for unit in (u for block in reference.model.layers for u in (block.attn, block.ffn) if u is not None):
        unit.decode_kernel = None  # the reference runs op by op in float32
    errors = {"fused": [], "op by op": []}
    for prompt in PROMPTS:
        runtimes = (reference, fused, op_by_op)
        logits = [[r.prefill(torch.tensor([tokenizer(prompt).input_ids]))] for r in runtimes]
        for _ in range(32):
            token = [int(logits[0][-1].argmax(-1))]
            for r, out in zip(runtimes, logits):
                out.append(r.decode_step(token))
        expected, got, plain = (torch.cat(out[1:]) for out in logits)
        errors["fused"].append(rel_err(got, expected))
        errors["op by op"].append(rel_err(plain, expected))
        assert (got.argmax(-1) == expected.argmax(-1)).float().mean() >= 31 / 32
    assert max(errors["fused"]) < 3e-2
    assert sum(errors["fused"]) < sum(errors["op by op"]), errors  # rounded less often: a float32 epilogue


def test_float32_decode_runs_whole_units_and_matches_the_op_by_op_path(stories, plan_of):
    """In float32 the whole-unit kernels only reorder float32 sums: logits equal the op-by-op path's
    to float32 rounding, and so do the greedy tokens."""
    model, tokenizer, source = stories
    plan = plan_of(model, source, "p25")
    fused, op_by_op = (Runtime.from_hf(model, plan, tokenizer, dtype=torch.float32) for _ in range(2))
    assert all(u.decode_kernel is not None for b in fused.model.layers for u in (b.attn, b.ffn) if u is not None)
    for unit in (u for block in op_by_op.model.layers for u in (block.attn, block.ffn) if u is not None):
        unit.decode_kernel = None
    prompt = torch.tensor([tokenizer("Once upon a time").input_ids])
    token = [int(fused.prefill(prompt).argmax(-1))]
    op_by_op.prefill(prompt)
    for _ in range(16):
        a, b = fused.decode_step(token), op_by_op.decode_step(token)
        assert rel_err(a, b) < 1e-5
        assert int(a.argmax(-1)) == int(b.argmax(-1))
        token = [int(a.argmax(-1))]
