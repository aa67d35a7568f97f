"""The low-rank bypass that replaces a removed Attention or FeedForward submodule.

    h = x + residual;  n = RMSNorm(h) * norm_weight;  out = h + (n @ down) @ up + bias

The same op serves the attention bypass (down=A, up=B) and the shared-basis FeedForward bypass
(down=U shared by layers, up=B_l). Three launches:

1. add_rms_norm's kernel writes h (into `out`) and n: exact Hugging Face casting needs each row's
   full-row rstd before any element of n exists, and this pass is M x hidden, tiny next to weights.
2. `_lowrank_down_kernel`: t = n @ down, tiled over (rows, rank) and split over hidden into
   float32 partials. At decode (<= DECODE_ROWS rows) the split spreads the read of `down` over
   the SMs; at prefill the row tiles alone fill the GPU, there is one split, and t is stored
   directly in the model dtype.
3. `_lowrank_up_kernel`: sums the partials (deterministically, no atomics), rounds t to the model
   dtype as an unfused t = n @ down would, then out = h + t @ up + bias in float32, rounded once.
"""
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from ._common import (
    Backend,
    as_rows,
    check_float,
    check_out,
    check_same_device,
    check_shape,
    check_unit_last_stride,
    dot_precision,
    finish,
    next_pow2,
    num_sms,
    use_triton,
)
from .add_rms_norm import MAX_HIDDEN, add_rms_norm_reference, add_rms_norm_rows

DECODE_ROWS = 64


@triton.jit
def _lowrank_down_kernel(
    N, D, P,
    n_rows, hidden, rank, k_per_split,
    stride_n, stride_d,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """P[split, rows, ranks] = N[rows, k-range of split] @ D[k-range of split, ranks], float32 accumulation."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    ranks = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    split = tl.program_id(2)
    k_lo = split * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, hidden)
    row_mask = rows < n_rows
    rank_mask = ranks < rank
    acc = tl.zeros([BLOCK_M, BLOCK_R], tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < k_hi
        a = tl.load(N + rows[:, None].to(tl.int64) * stride_n + ks[None, :],
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(D + ks[:, None].to(tl.int64) * stride_d + ranks[None, :],
                    mask=k_mask[:, None] & rank_mask[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
    part = (split * n_rows + rows[:, None]).to(tl.int64) * rank + ranks[None, :]
    tl.store(P + part, acc.to(P.dtype.element_ty), mask=row_mask[:, None] & rank_mask[None, :])


@triton.jit
def _lowrank_up_kernel(
    P, U, H, BIAS, OUT,
    n_rows, hidden, rank, num_splits,
    stride_u, stride_h, stride_out,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """OUT[rows, cols] = H + round(sum_split P) @ U[:, cols] + BIAS[cols], accumulated in float32."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    col_mask = cols < hidden
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        ranks = r0 + tl.arange(0, BLOCK_R)
        rank_mask = ranks < rank
        t_mask = row_mask[:, None] & rank_mask[None, :]
        t = tl.zeros([BLOCK_M, BLOCK_R], tl.float32)
        for split in range(num_splits):
            part = (split * n_rows + rows[:, None]).to(tl.int64) * rank + ranks[None, :]
            t += tl.load(P + part, mask=t_mask, other=0.0).to(tl.float32)
        u = tl.load(U + ranks[:, None].to(tl.int64) * stride_u + cols[None, :],
                    mask=rank_mask[:, None] & col_mask[None, :], other=0.0)
        acc = tl.dot(t.to(U.dtype.element_ty), u, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(BIAS + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    out_mask = row_mask[:, None] & col_mask[None, :]
    rows64 = rows[:, None].to(tl.int64)
    h = tl.load(H + rows64 * stride_h + cols[None, :], mask=out_mask, other=0.0).to(tl.float32)
    tl.store(OUT + rows64 * stride_out + cols[None, :], (h + acc).to(OUT.dtype.element_ty), mask=out_mask)


class _Config(NamedTuple):
    block_m: int
    block_n: int
    block_r: int
    block_k: int
    splits: int
    k_per_split: int


def _config(n_rows: int, hidden: int, rank: int, device: torch.device) -> _Config:
    """Decode: split hidden so that up to ~2 programs per SM stream `down`. Every stage-3 program
    re-reads all partials (splits x rows x rank x 4 bytes), so splits x rows <= 16 keeps that at
    most its own slice of `up` (rank x 32 x 2 bytes). Prefill: one split."""
    block_k = 64
    block_r = min(64, max(16, next_pow2(rank)))
    k_blocks = triton.cdiv(hidden, block_k)
    if n_rows <= DECODE_ROWS:
        block_m = max(16, next_pow2(n_rows))  # tl.dot needs at least 16 rows
        tiles = triton.cdiv(rank, block_r)
        splits = min(k_blocks, triton.cdiv(2 * num_sms(device), tiles), max(1, 16 // n_rows))
        block_n = 32
    else:
        block_m, block_n, splits = 64, 64, 1
    k_per_split = triton.cdiv(k_blocks, splits) * block_k
    return _Config(block_m, block_n, block_r, block_k, triton.cdiv(hidden, k_per_split), k_per_split)


@torch.library.custom_op("subfit::fused_bypass", mutates_args=("out",))
def _fused_bypass_op(
    x: Optional[torch.Tensor], residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
    down: torch.Tensor, up: torch.Tensor, bias: Optional[torch.Tensor], out: torch.Tensor,
) -> None:
    n_rows, hidden = residual.shape
    rank = down.shape[1]
    if n_rows == 0:
        return
    normed = torch.empty((n_rows, hidden), dtype=down.dtype, device=down.device)
    if x is None:  # h is residual itself
        add_rms_norm_rows(residual, None, norm_weight, eps, normed, None)
        h = residual
    else:
        add_rms_norm_rows(x, residual, norm_weight, eps, normed, out)
        h = out
    cfg = _config(n_rows, hidden, rank, down.device)
    partial_dtype = torch.float32 if cfg.splits > 1 else down.dtype  # one split: t itself, already rounded
    partials = torch.empty((cfg.splits, n_rows, rank), dtype=partial_dtype, device=down.device)
    precision = dot_precision(down.dtype)
    _lowrank_down_kernel[(triton.cdiv(n_rows, cfg.block_m), triton.cdiv(rank, cfg.block_r), cfg.splits)](
        normed, down, partials, n_rows, hidden, rank, cfg.k_per_split, normed.stride(0), down.stride(0),
        BLOCK_M=cfg.block_m, BLOCK_R=cfg.block_r, BLOCK_K=cfg.block_k, PRECISION=precision, num_warps=4,
    )
    _lowrank_up_kernel[(triton.cdiv(n_rows, cfg.block_m), triton.cdiv(hidden, cfg.block_n))](
        partials, up, h, bias, out, n_rows, hidden, rank, cfg.splits, up.stride(0), h.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_R=cfg.block_r,
        PRECISION=precision, num_warps=4,
    )


@_fused_bypass_op.register_fake
def _(x, residual, norm_weight, eps, down, up, bias, out) -> None:
    return None


def fused_bypass_reference(
    x: Optional[torch.Tensor],
    residual: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    down: torch.Tensor,
    up: torch.Tensor,
    bias: Optional[torch.Tensor],
) -> torch.Tensor:
    """float32 math with the unfused path's roundings: h, n and t = n @ down in their dtypes."""
    if x is None:
        normed, h = add_rms_norm_reference(residual, None, norm_weight, eps)
    else:
        normed, h = add_rms_norm_reference(x, residual, norm_weight, eps, residual_in_fp32=residual.dtype == torch.float32)
    t = (normed.to(down.dtype).float() @ down.float()).to(down.dtype)
    out = h.float() + t.float() @ up.float()
    if bias is not None:
        out = out + bias.float()
    return out.to(h.dtype)


def fused_bypass(
    x: Optional[torch.Tensor],
    residual: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    down: torch.Tensor,
    up: torch.Tensor,
    bias: Optional[torch.Tensor],
    *,
    out: Optional[torch.Tensor] = None,
    backend: Backend = None,
) -> torch.Tensor:
    """out = h + (RMSNorm(h) * norm_weight) @ down @ up + bias, with h = x + residual (h = residual if
    x is None): the new residual stream, shaped like residual, in residual's dtype.

    residual: [..., hidden] in the model dtype (that of down) or float32; x: None or like residual
    in the model dtype; norm_weight: [hidden], model dtype or float32; down: [hidden, r]; up:
    [r, hidden]; bias: None or [hidden]; down, up, bias in the model dtype. Weights are read in place
    (row strides allowed, unit stride along their last dim required). `out` may be residual itself,
    updating the residual stream in place.
    """
    check_float("residual", residual)
    if residual.dim() == 0:
        raise ValueError("residual must have at least one dim ([..., hidden])")
    hidden = residual.shape[-1]
    check_float("down", down)
    check_shape("down", down, (hidden, None), "[hidden, rank]")
    rank = down.shape[1]
    dtype = down.dtype
    check_float("residual", residual, (dtype, torch.float32), "down's dtype (the model dtype) or float32")
    if x is not None:
        check_float("x", x, (dtype,), "down's dtype (the model dtype)")
        check_shape("x", x, tuple(residual.shape), "the shape of residual")
    check_float("norm_weight", norm_weight, (dtype, torch.float32), "the model dtype or float32")
    check_shape("norm_weight", norm_weight, (hidden,), "[hidden]")
    check_float("up", up, (dtype,), "down's dtype")
    check_shape("up", up, (rank, hidden), f"[rank = {rank}, hidden = {hidden}]")
    if bias is not None:
        check_float("bias", bias, (dtype,), "down's dtype")
        check_shape("bias", bias, (hidden,), "[hidden]")
    for name, w in (("norm_weight", norm_weight), ("down", down), ("up", up), ("bias", bias)):
        if w is not None:
            check_unit_last_stride(name, w)
    check_same_device(x=x, residual=residual, norm_weight=norm_weight, down=down, up=up, bias=bias, out=out)
    check_out(out, residual.shape, residual.dtype, residual.device)
    if hidden > MAX_HIDDEN:
        raise ValueError(f"hidden size {hidden} exceeds {MAX_HIDDEN}, the most one normalisation program holds")

    if not use_triton(residual, backend):
        return finish(fused_bypass_reference(x, residual, norm_weight, eps, down, up, bias), out)
    out = torch.empty(residual.shape, dtype=residual.dtype, device=residual.device) if out is None else out
    torch.ops.subfit.fused_bypass(
        None if x is None else as_rows(x), as_rows(residual), norm_weight, eps, down, up, bias, out.view(-1, hidden)
    )
    return out
