"""Rotary position embedding for q and k, optionally fused with the KV-cache write of k and v.

Hugging Face's non-interleaved convention: out = x * cos + rotate_half(x) * sin with rotate_half
swapping the two halves of the head dim. The caller builds the float32 tables (so llama3/yarn
scaling stays in Hugging Face's code) and passes their first halves, [max_pos, head_dim // 2]
(Hugging Face's cos repeats its first half). Rotation is done in float32 and rounded once.
Fusing the cache write saves the decode step a second pass over k (and the separate copy of v).
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import (
    Backend,
    check_dtype,
    check_float,
    check_same_device,
    check_shape,
    check_unit_last_stride,
    check_writable,
    inner_contiguous,
    next_pow2,
    use_triton,
)


@triton.jit
def _load_halves(X, stride_h, n_heads, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """Both halves of the head dim of n_heads heads, as float32 [BLOCK_H, BLOCK_HALF] tiles."""
    heads = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (heads < n_heads) & (d < HALF)
    ptr = X + heads * stride_h + d
    return (
        tl.load(ptr, mask=mask, other=0.0).to(tl.float32),
        tl.load(ptr + HALF, mask=mask, other=0.0).to(tl.float32),
    )


@triton.jit
def _store_halves(Y, stride_h, n_heads, y1, y2, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    heads = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (heads < n_heads) & (d < HALF)
    ptr = Y + heads * stride_h + d
    tl.store(ptr, y1.to(Y.dtype.element_ty), mask=mask)
    tl.store(ptr + HALF, y2.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(
    Q, K, V, COS, SIN, POS, QO, KO, KC, VC,
    seq_len, n_pos, cache_len, n_q_heads, n_kv_heads,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_pb, stride_pt, stride_cos, stride_sin,
    stride_cb, stride_ch, stride_cs,
    HALF: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HKV: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    WRITE_CACHE: tl.constexpr,
):
    """One token per program: all its q and k heads share one gathered cos/sin row."""
    token = tl.program_id(0).to(tl.int64)
    b = token // seq_len
    t = token % seq_len
    pos = tl.load(POS + b * stride_pb + t * stride_pt).to(tl.int64)
    d = tl.arange(0, BLOCK_HALF)
    table_mask = d < tl.where((pos >= 0) & (pos < n_pos), HALF, 0)  # out-of-range positions read nothing
    cos = tl.load(COS + pos * stride_cos + d, mask=table_mask, other=0.0)[None, :]
    sin = tl.load(SIN + pos * stride_sin + d, mask=table_mask, other=0.0)[None, :]

    q1, q2 = _load_halves(Q + b * stride_qb + t * stride_qt, stride_qh, n_q_heads, HALF, BLOCK_HQ, BLOCK_HALF)
    _store_halves(QO + token * n_q_heads * 2 * HALF, 2 * HALF, n_q_heads,
                  q1 * cos - q2 * sin, q2 * cos + q1 * sin, HALF, BLOCK_HQ, BLOCK_HALF)
    k1, k2 = _load_halves(K + b * stride_kb + t * stride_kt, stride_kh, n_kv_heads, HALF, BLOCK_HKV, BLOCK_HALF)
    k1, k2 = k1 * cos - k2 * sin, k2 * cos + k1 * sin
    _store_halves(KO + token * n_kv_heads * 2 * HALF, 2 * HALF, n_kv_heads, k1, k2, HALF, BLOCK_HKV, BLOCK_HALF)
    if WRITE_CACHE:
        heads_written = tl.where((pos >= 0) & (pos < cache_len), n_kv_heads, 0)  # never write out of bounds
        slot = b * stride_cb + pos * stride_cs
        _store_halves(KC + slot, stride_ch, heads_written, k1, k2, HALF, BLOCK_HKV, BLOCK_HALF)
        v1, v2 = _load_halves(V + b * stride_vb + t * stride_vt, stride_vh, n_kv_heads, HALF, BLOCK_HKV, BLOCK_HALF)
        _store_halves(VC + slot, stride_ch, heads_written, v1, v2, HALF, BLOCK_HKV, BLOCK_HALF)


@torch.library.custom_op("subfit::apply_rope", mutates_args=("q_out", "k_out", "k_cache", "v_cache"))
def _apply_rope_op(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
    v: Optional[torch.Tensor], q_out: torch.Tensor, k_out: torch.Tensor,
    k_cache: Optional[torch.Tensor], v_cache: Optional[torch.Tensor],
) -> None:
    batch, seq_len, n_q_heads, head_dim = q.shape
    if batch * seq_len == 0:
        return
    write_cache = k_cache is not None
    half = head_dim // 2
    _rope_kernel[(batch * seq_len,)](
        q, k, v, cos, sin, positions, q_out, k_out, k_cache, v_cache,
        seq_len, cos.shape[0], k_cache.shape[2] if write_cache else 0, n_q_heads, k.shape[2],
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        *(v.stride()[:3] if write_cache else (0, 0, 0)),
        positions.stride(0), positions.stride(1), cos.stride(0), sin.stride(0),
        *(k_cache.stride()[:3] if write_cache else (0, 0, 0)),
        HALF=half,
        BLOCK_HQ=next_pow2(n_q_heads),
        BLOCK_HKV=next_pow2(k.shape[2]),
        BLOCK_HALF=next_pow2(half),
        WRITE_CACHE=write_cache,
        num_warps=4,
    )


@_apply_rope_op.register_fake
def _(q, k, cos, sin, positions, v, q_out, k_out, k_cache, v_cache) -> None:
    return None


def apply_rope_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor,
    *,
    k_cache: Optional[torch.Tensor] = None,
    v_cache: Optional[torch.Tensor] = None,
    v: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    cos_t = cos.float()[positions][:, :, None, :]  # [B, T, 1, D/2]
    sin_t = sin.float()[positions][:, :, None, :]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat((x1 * cos_t - x2 * sin_t, x2 * cos_t + x1 * sin_t), dim=-1).to(x.dtype)

    q_rot, k_rot = rotate(q), rotate(k)
    if k_cache is not None:
        batch = torch.arange(q.shape[0], device=q.device)[:, None]
        k_cache[batch, :, positions] = k_rot  # indexed view is [B, T, Hkv, D], like k
        v_cache[batch, :, positions] = v
    return q_rot, k_rot


def apply_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor,
    *,
    k_cache: Optional[torch.Tensor] = None,
    v_cache: Optional[torch.Tensor] = None,
    v: Optional[torch.Tensor] = None,
    out: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    backend: Backend = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotated (q, k), new contiguous tensors shaped like q and k (or the `out` pair).

    q: [B, T, Hq, D], k: [B, T, Hkv, D] (any strides with the head dim innermost, e.g. views of a
    fused qkv projection). cos, sin: float32 [max_pos, D // 2] (row-strided views such as
    hf_cos[:, :D // 2] are read without a copy). positions: int32/int64 [B, T],
    each token's absolute position (< max_pos, and < S_max when writing caches; the kernel masks
    out-of-range positions instead of faulting, leaving their outputs meaningless and caches
    untouched). With k_cache, v_cache [B, Hkv, S_max, D] and v [B, T, Hkv, D], also writes rotated
    k and v into the caches at [b, :, positions[b, t], :].
    """
    check_float("q", q)
    check_shape("q", q, (None, None, None, None), "[batch, tokens, q_heads, head_dim]")
    batch, seq_len, _, head_dim = q.shape
    if head_dim % 2:
        raise ValueError(f"head_dim {head_dim} must be even: rotate_half splits it into two halves")
    check_float("k", k, (q.dtype,), "the dtype of q")
    check_shape("k", k, (batch, seq_len, None, head_dim), "[batch, tokens, kv_heads, head_dim] matching q")
    n_kv_heads = k.shape[2]
    for name, table in (("cos", cos), ("sin", sin)):
        check_dtype(name, table, torch.float32, "build the rotary tables in float32")
        check_shape(name, table, (None, head_dim // 2), f"[max_pos, head_dim // 2 = {head_dim // 2}]")
    check_shape("sin", sin, tuple(cos.shape), "the shape of cos")
    if positions.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"positions has dtype {positions.dtype}; expected int32 or int64")
    check_shape("positions", positions, (batch, seq_len), "[batch, tokens]")
    given = [t is not None for t in (k_cache, v_cache, v)]
    if any(given) and not all(given):
        raise ValueError("the fused cache write needs all of k_cache, v_cache and v (or none of them)")
    if k_cache is not None:
        check_shape("v", v, tuple(k.shape), "the shape of k")
        check_float("v", v, (q.dtype,), "the dtype of q")
        for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
            check_shape(name, cache, (batch, n_kv_heads, None, head_dim), "[batch, kv_heads, S_max, head_dim]")
            check_float(name, cache, (q.dtype,), "the dtype of q")
            check_unit_last_stride(name, cache)
        if v_cache.shape != k_cache.shape or v_cache.stride() != k_cache.stride():
            raise ValueError(
                f"k_cache and v_cache must share shape and strides, got {tuple(k_cache.shape)} {k_cache.stride()} and "
                f"{tuple(v_cache.shape)} {v_cache.stride()}"
            )
    if out is not None:
        for name, o, like in (("out[0]", out[0], q), ("out[1]", out[1], k)):
            if o.shape != like.shape or o.dtype != like.dtype:
                raise ValueError(f"{name} has shape {tuple(o.shape)}, dtype {o.dtype}; expected {tuple(like.shape)}, {like.dtype}")
            check_writable(name, o)
    check_same_device(q=q, k=k, cos=cos, sin=sin, positions=positions, k_cache=k_cache, v_cache=v_cache, v=v,
                      q_out=None if out is None else out[0], k_out=None if out is None else out[1])

    if not use_triton(q, backend):
        q_rot, k_rot = apply_rope_reference(q, k, cos, sin, positions, k_cache=k_cache, v_cache=v_cache, v=v)
        return (q_rot, k_rot) if out is None else (out[0].copy_(q_rot), out[1].copy_(k_rot))

    if out is None:
        out = (torch.empty(q.shape, dtype=q.dtype, device=q.device), torch.empty(k.shape, dtype=k.dtype, device=k.device))
    torch.ops.subfit.apply_rope(
        inner_contiguous(q), inner_contiguous(k), inner_contiguous(cos), inner_contiguous(sin), positions,
        inner_contiguous(v), out[0], out[1], k_cache, v_cache,
    )
    return out[0], out[1]
