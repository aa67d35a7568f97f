"""Single-query (decode) attention over a padded KV cache, flash-decoding style.

With one query token a (batch, kv head) pair is far too little work for a GPU, so the cache is cut
into chunks along the sequence: stage 1 runs one program per (batch, kv head, chunk) and leaves a
partial (max, sum, unnormalised output); stage 2 merges the chunks. Each program handles the whole
group of query heads sharing its kv head (grouped-query attention), so K/V are read once per group.
Chunks are sized from the cache capacity S_max, not from seq_lens, so no host sync is needed and
the launch is CUDA-graph safe; chunks past a sequence's length exit at once.
"""
import math
from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import (
    Backend,
    check_float,
    check_out,
    check_same_device,
    check_shape,
    check_unit_last_stride,
    dot_precision,
    finish,
    inner_contiguous,
    next_pow2,
    num_sms,
    use_triton,
)

BLOCK_S = 64  # cache positions per inner step
MAX_SPLITS = 64  # partials merged in registers by stage 2
LOG2E = 1.4426950408889634


@triton.jit
def _decode_partial_kernel(
    Q, K, V, SEQ_LENS, ACC, M, L,
    qk_scale, cache_len, chunk, num_splits, n_q_heads,
    stride_qb, stride_qh,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Online softmax over one chunk for one kv head's group of query heads (base-2 exponent)."""
    b = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.minimum(tl.load(SEQ_LENS + b).to(tl.int32), cache_len)
    lo = split * chunk
    hi = tl.minimum(lo + chunk, seq_len)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    heads = kv_head * GROUP + g
    head_mask = g < GROUP
    d_mask = d < HEAD_DIM
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
                mask=head_mask[:, None] & d_mask[None, :], other=0.0)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    k_base = K + b * stride_kb + kv_head * stride_kh
    v_base = V + b * stride_vb + kv_head * stride_vh
    for start in range(lo, hi, BLOCK_S):
        s = start + tl.arange(0, BLOCK_S)
        s_mask = s < hi
        kv_mask = s_mask[:, None] & d_mask[None, :]
        k = tl.load(k_base + s[:, None] * stride_ks + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + s[:, None] * stride_vs + d[None, :], mask=kv_mask, other=0.0)  # in flight with k
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        scores = tl.where(s_mask[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new

    part = (b * n_q_heads + heads) * num_splits + split  # partials are [B, Hq, splits(, D)]
    tl.store(M + part, m_i, mask=head_mask)
    tl.store(L + part, l_i, mask=head_mask)
    tl.store(ACC + part[:, None] * HEAD_DIM + d[None, :], acc, mask=head_mask[:, None] & d_mask[None, :])


@triton.jit
def _decode_reduce_kernel(
    ACC, M, L, O,
    num_splits, n_q_heads, stride_ob, stride_oh,
    HEAD_DIM: tl.constexpr,
    BLOCK_SPLITS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Merge one head's chunk partials; an empty sequence (all chunks empty) gives zeros, not NaN."""
    b = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    sp = tl.arange(0, BLOCK_SPLITS)
    d = tl.arange(0, BLOCK_D)
    sp_mask = sp < num_splits
    part = (b * n_q_heads + head) * num_splits + sp
    m = tl.load(M + part, mask=sp_mask, other=float("-inf"))
    m_max = tl.max(m, axis=0)
    w = tl.exp2(m - tl.where(m_max == float("-inf"), 0.0, m_max))
    l_sum = tl.sum(w * tl.load(L + part, mask=sp_mask, other=0.0), axis=0)
    acc = tl.load(ACC + part[:, None] * HEAD_DIM + d[None, :], mask=sp_mask[:, None] & (d < HEAD_DIM)[None, :], other=0.0)
    o = tl.sum(w[:, None] * acc, axis=0) / tl.where(l_sum > 0, l_sum, 1.0)
    tl.store(O + b * stride_ob + head * stride_oh + d, o.to(O.dtype.element_ty), mask=d < HEAD_DIM)


def _auto_splits(batch: int, n_kv_heads: int, cache_len: int, device: torch.device) -> int:
    """Enough chunks for about two programs per SM."""
    return max(1, min(MAX_SPLITS, triton.cdiv(cache_len, BLOCK_S), triton.cdiv(2 * num_sms(device), batch * n_kv_heads)))


@torch.library.custom_op("subfit::decode_attention", mutates_args=("out",))
def _decode_attention_op(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seq_lens: torch.Tensor,
    scale: float, num_splits: Optional[int], out: torch.Tensor,
) -> None:
    batch, n_q_heads, head_dim = q.shape
    n_kv_heads, cache_len = k_cache.shape[1], k_cache.shape[2]
    if batch == 0 or n_q_heads == 0:
        return
    splits = num_splits or _auto_splits(batch, n_kv_heads, cache_len, q.device)
    chunk = triton.cdiv(triton.cdiv(max(cache_len, 1), splits), BLOCK_S) * BLOCK_S
    splits = triton.cdiv(max(cache_len, 1), chunk)  # no chunk starts past the cache
    group = n_q_heads // n_kv_heads
    acc = torch.empty((batch, n_q_heads, splits, head_dim), dtype=torch.float32, device=q.device)
    m = torch.empty((batch, n_q_heads, splits), dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    block_d = max(16, next_pow2(head_dim))
    _decode_partial_kernel[(batch, n_kv_heads, splits)](
        q, k_cache, v_cache, seq_lens, acc, m, l,
        scale * LOG2E, cache_len, chunk, splits, n_q_heads,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        GROUP=group,
        HEAD_DIM=head_dim,
        BLOCK_G=max(16, next_pow2(group)),  # tl.dot needs at least 16 rows
        BLOCK_S=BLOCK_S,
        BLOCK_D=block_d,
        PRECISION=dot_precision(q.dtype),
        num_warps=4,
        num_stages=2,  # 3 stages of float32 K/V tiles at head_dim 128 would not fit 100 KB of shared memory
    )
    _decode_reduce_kernel[(batch, n_q_heads)](
        acc, m, l, out, splits, n_q_heads, out.stride(0), out.stride(1),
        HEAD_DIM=head_dim, BLOCK_SPLITS=next_pow2(splits), BLOCK_D=block_d, num_warps=4,
    )


@_decode_attention_op.register_fake
def _(q, k_cache, v_cache, seq_lens, scale, num_splits, out) -> None:
    return None


def decode_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """float32 softmax(q k^T * scale) v over positions < seq_lens[b]; zeros for an empty sequence."""
    group = q.shape[1] // k_cache.shape[1]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    valid = torch.arange(k_cache.shape[2], device=q.device)[None, :] < seq_lens[:, None].long()  # [B, S]
    invalid = ~valid[:, None, :, None]  # the cache tail may hold anything, NaN included
    k = k_cache.float().masked_fill(invalid, 0.0).repeat_interleave(group, dim=1)  # [B, Hq, S, D]
    v = v_cache.float().masked_fill(invalid, 0.0).repeat_interleave(group, dim=1)
    scores = torch.einsum("bhd,bhsd->bhs", q.float(), k) * scale
    probs = torch.softmax(scores.masked_fill(~valid[:, None, :], float("-inf")), dim=-1)
    probs = torch.where(valid[:, None, :], probs, 0.0)  # an empty row is all-NaN before this
    return torch.einsum("bhs,bhsd->bhd", probs, v).to(q.dtype)


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: Optional[float] = None,
    *,
    num_splits: Optional[int] = None,
    out: Optional[torch.Tensor] = None,
    backend: Backend = None,
) -> torch.Tensor:
    """Attention of one new query token per sequence over its cached keys and values.

    q: [B, Hq, D]; k_cache, v_cache: [B, Hkv, S_max, D] with Hq a multiple of Hkv (any strides with
    the head dim innermost); seq_lens: int32/int64 [B], the valid positions 0..len-1 of each
    sequence (a length of 0 gives zeros; lengths above S_max are clipped to S_max). scale defaults
    to 1/sqrt(D). num_splits: sequence chunks per (batch, kv head), 1..64 (None: enough to fill the
    GPU). Returns [B, Hq, D] in q's dtype.
    """
    check_float("q", q)
    check_shape("q", q, (None, None, None), "[batch, q_heads, head_dim]")
    batch, n_q_heads, head_dim = q.shape
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        check_float(name, cache, (q.dtype,), "the dtype of q")
        check_shape(name, cache, (batch, None, None, head_dim), "[batch, kv_heads, S_max, head_dim]")
        check_unit_last_stride(name, cache)
    check_shape("v_cache", v_cache, tuple(k_cache.shape), "the shape of k_cache")
    if k_cache.shape[1] == 0 or n_q_heads % k_cache.shape[1]:
        raise ValueError(f"q_heads ({n_q_heads}) must be a positive multiple of kv_heads ({k_cache.shape[1]})")
    if seq_lens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"seq_lens has dtype {seq_lens.dtype}; expected int32 or int64")
    check_shape("seq_lens", seq_lens, (batch,), "[batch]")
    if num_splits is not None and not 1 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"num_splits must be in 1..{MAX_SPLITS} (or None for automatic), got {num_splits}")
    check_same_device(q=q, k_cache=k_cache, v_cache=v_cache, seq_lens=seq_lens, out=out)
    check_out(out, q.shape, q.dtype, q.device)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)

    if not use_triton(q, backend):
        return finish(decode_attention_reference(q, k_cache, v_cache, seq_lens, scale), out)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device) if out is None else out
    torch.ops.subfit.decode_attention(inner_contiguous(q), k_cache, v_cache, seq_lens.contiguous(), scale, num_splits, out)
    return out
