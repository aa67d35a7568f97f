"""The low-rank bypass that replaces a removed Attention or FeedForward submodule.

    h = x + residual;  n = RMSNorm(h) * norm_weight;  out = h + (n @ down) @ up + bias

The same op serves the attention bypass (down=A, up=B) and the shared-basis FeedForward bypass
(down=U shared by layers, up=B_l). Two launches, each one matrix product:

1. `_down_kernel`: t = n @ down. RMSNorm's 1/rms is one number per row, so it factors out of the
   product: each program accumulates (h * norm_weight) @ down over its slice of hidden together
   with that slice's sum of h^2, and 1/rms scales the total at the end. There is no separate
   normalisation pass (nor its launch), and no weight load waits behind a full-row reduction.
2. `_up_kernel`: out = h + t @ up + bias, in tiles of 128 output columns, h recomputed from x and
   residual (out may be residual itself: each element is read and then written by one program).

At decode (<= DECODE_ROWS rows) one output tile is far too little work to stream a weight
matrix, so each product is also split over its reduction dimension (hidden for `down`, rank for
`up`) until about two programs per SM read the weights. The float32 partials are reduced once, in
a fixed order, by the last program of each tile to finish: an atomic ticket per tile tells each
program whether it is the last (the last one resets the ticket), so the sum is deterministic and
costs no extra launch. At prefill the row tiles fill the GPU: one split, no partials.

Roundings: h in residual's dtype, t rounded once to the model dtype (as an unfused n @ down would
be), out accumulated in float32 and rounded once. The operand h * norm_weight is rounded to the
model dtype before 1/rms is known; in float16 (5 exponent bits) each block is first scaled by its
largest element per row so that it cannot overflow.
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
from .add_rms_norm import add_rms_norm_reference

DECODE_ROWS = 64


@triton.jit
def _is_last_of_tile(TICKETS, tile, n_splits):
    """Take this program's ticket for its output tile; True for the last of the tile's n_splits
    programs, which then sees every other program's partial (acquire/release at GPU scope) and
    resets the ticket for the next launch."""
    tl.debug_barrier()  # every thread's partial store is issued before the release below
    ticket = tl.atomic_add(TICKETS + tile, 1, sem="acq_rel", scope="gpu")
    last = ticket == n_splits - 1
    if last:
        tl.store(TICKETS + tile, 0)
    return last


@triton.jit
def _down_kernel(
    X, R, W, D, T, PART, SUMSQ, TICKETS,
    n_rows, hidden, rank, k_per_split, n_splits, eps,
    stride_x, stride_r, stride_d, stride_t,
    HAS_X: tl.constexpr,
    SPLIT: tl.constexpr,
    SCALE_OPERAND: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """T[rows, ranks] = round(RMSNorm(h) * W @ D[:, ranks]) with h = X + R, over hidden-slice `split`."""
    pid_r = tl.program_id(1)
    split = tl.program_id(2)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    ranks = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < n_rows
    rank_mask = ranks < rank
    rows64 = rows.to(tl.int64)
    k_lo = split * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, hidden)
    acc = tl.zeros([BLOCK_M, BLOCK_R], tl.float32)
    sumsq = tl.zeros([BLOCK_M], tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < k_hi
        # every load of the step first, independent of one another
        w_norm = tl.load(W + ks, mask=k_mask, other=0.0).to(tl.float32)
        weights = tl.load(D + ks[:, None].to(tl.int64) * stride_d + ranks[None, :],
                          mask=k_mask[:, None] & rank_mask[None, :], other=0.0)
        tile_mask = row_mask[:, None] & k_mask[None, :]
        h = tl.load(R + rows64[:, None] * stride_r + ks[None, :], mask=tile_mask, other=0.0)
        if HAS_X:
            x = tl.load(X + rows64[:, None] * stride_x + ks[None, :], mask=tile_mask, other=0.0)
            h = (x.to(tl.float32) + h.to(tl.float32)).to(R.dtype.element_ty)
        h = h.to(tl.float32)
        sumsq += tl.sum(h * h, axis=1)
        a = h * w_norm[None, :]
        if SCALE_OPERAND:
            scale = tl.max(tl.abs(a), axis=1)
            scale = tl.where(scale > 0, scale, 1.0)
            part = tl.dot((a / scale[:, None]).to(D.dtype.element_ty), weights, input_precision=PRECISION)
            acc += part * scale[:, None]
        else:
            acc = tl.dot(a.to(D.dtype.element_ty), weights, acc, input_precision=PRECISION)
    out_mask = row_mask[:, None] & rank_mask[None, :]
    t_at = T + rows64[:, None] * stride_t + ranks[None, :]
    if SPLIT:
        tl.store(PART + (split * n_rows + rows64[:, None]) * rank + ranks[None, :], acc, mask=out_mask)
        sumsq_at = (pid_r * n_splits + split) * n_rows + rows  # one copy per rank tile: tiles never wait on each other
        tl.store(SUMSQ + sumsq_at, sumsq, mask=row_mask)
        if _is_last_of_tile(TICKETS, tl.program_id(0) * tl.num_programs(1) + pid_r, n_splits):
            acc = tl.zeros([BLOCK_M, BLOCK_R], tl.float32)
            sumsq = tl.zeros([BLOCK_M], tl.float32)
            for s in range(n_splits):  # fixed order: deterministic
                acc += tl.load(PART + (s * n_rows + rows64[:, None]) * rank + ranks[None, :], mask=out_mask,
                               other=0.0, cache_modifier=".cg")
                sumsq += tl.load(SUMSQ + (pid_r * n_splits + s) * n_rows + rows, mask=row_mask, other=0.0,
                                 cache_modifier=".cg")
            tl.store(t_at, (acc * tl.rsqrt(sumsq / hidden + eps)[:, None]).to(T.dtype.element_ty), mask=out_mask)
    else:
        tl.store(t_at, (acc * tl.rsqrt(sumsq / hidden + eps)[:, None]).to(T.dtype.element_ty), mask=out_mask)


@triton.jit
def _up_kernel(
    T, U, X, R, BIAS, OUT, PART, TICKETS,
    n_rows, hidden, rank, r_per_split, n_splits,
    stride_t, stride_u, stride_x, stride_r, stride_out,
    HAS_X: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """OUT[rows, cols] = h + T @ U[:, cols] + BIAS[cols] with h = X + R, over rank-slice `split`."""
    split = tl.program_id(2)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    col_mask = cols < hidden
    rows64 = rows.to(tl.int64)
    r_lo = split * r_per_split
    r_hi = tl.minimum(r_lo + r_per_split, rank)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for r0 in range(r_lo, r_hi, BLOCK_R):
        ranks = r0 + tl.arange(0, BLOCK_R)
        rank_mask = ranks < r_hi
        weights = tl.load(U + ranks[:, None].to(tl.int64) * stride_u + cols[None, :],
                          mask=rank_mask[:, None] & col_mask[None, :], other=0.0)
        t = tl.load(T + rows64[:, None] * stride_t + ranks[None, :], mask=row_mask[:, None] & rank_mask[None, :],
                    other=0.0)
        acc = tl.dot(t, weights, acc, input_precision=PRECISION)
    out_mask = row_mask[:, None] & col_mask[None, :]
    if SPLIT:
        tl.store(PART + (split * n_rows + rows64[:, None]) * hidden + cols[None, :], acc, mask=out_mask)
        if _is_last_of_tile(TICKETS, tl.program_id(0) * tl.num_programs(1) + tl.program_id(1), n_splits):
            acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for s in range(n_splits):  # fixed order: deterministic
                acc += tl.load(PART + (s * n_rows + rows64[:, None]) * hidden + cols[None, :], mask=out_mask,
                               other=0.0, cache_modifier=".cg")
            _store_out(acc, X, R, BIAS, OUT, rows64, cols, col_mask, out_mask, stride_x, stride_r, stride_out,
                       HAS_X, HAS_BIAS)
    else:
        _store_out(acc, X, R, BIAS, OUT, rows64, cols, col_mask, out_mask, stride_x, stride_r, stride_out,
                   HAS_X, HAS_BIAS)


@triton.jit
def _store_out(acc, X, R, BIAS, OUT, rows64, cols, col_mask, out_mask, stride_x, stride_r, stride_out,
               HAS_X: tl.constexpr, HAS_BIAS: tl.constexpr):
    """OUT = h + acc + BIAS, h = X + R rounded to R's dtype; R is read before OUT (which may be R) is written."""
    h = tl.load(R + rows64[:, None] * stride_r + cols[None, :], mask=out_mask, other=0.0)
    if HAS_X:
        x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=out_mask, other=0.0)
        h = (x.to(tl.float32) + h.to(tl.float32)).to(R.dtype.element_ty)
    acc += h.to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(BIAS + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(OUT + rows64[:, None] * stride_out + cols[None, :], acc.to(OUT.dtype.element_ty), mask=out_mask)


class _Split(NamedTuple):
    """One product's tiling: output tiles of `block` along its output dim, the reduction dim cut
    into `splits` slices of `per_split` (a multiple of `step`)."""

    block: int
    step: int
    splits: int
    per_split: int


class _Config(NamedTuple):
    block_m: int
    down: _Split  # output dim rank, reduction over hidden
    up: _Split  # output dim hidden, reduction over rank


def _split(n_rows: int, n_out: int, n_red: int, block: int, step: int, device: torch.device) -> _Split:
    """Decode: cut the reduction until ~2 programs per SM stream the weight; the float32 partials
    (splits x rows x n_out x 4 bytes, written and read back once) stay under a quarter of the
    weight's own bytes. Prefill (rows > DECODE_ROWS): one split."""
    steps = triton.cdiv(n_red, step)
    splits = 1
    if n_rows <= DECODE_ROWS:
        splits = min(steps, triton.cdiv(2 * num_sms(device), triton.cdiv(n_out, block)), max(1, n_red // (8 * n_rows)))
    per_split = triton.cdiv(steps, splits) * step
    return _Split(block, step, triton.cdiv(n_red, per_split), per_split)


def _config(n_rows: int, hidden: int, rank: int, device: torch.device) -> _Config:
    decode = n_rows <= DECODE_ROWS
    block_m = max(16, next_pow2(n_rows)) if decode else 64  # tl.dot needs at least 16 rows
    block_r = min(64, max(16, next_pow2(rank)))
    block_n = min(128 if decode else 64, max(16, next_pow2(hidden)))  # 128 columns: 256-byte rows of `up`
    return _Config(block_m, _split(n_rows, rank, hidden, block_r, 64, device),
                   _split(n_rows, hidden, rank, block_n, block_r, device))


_tickets: dict[torch.device, torch.Tensor] = {}
_outgrown: list[torch.Tensor] = []  # kept alive: a captured CUDA graph may still point at them


def _ticket_counters(device: torch.device, count: int) -> torch.Tensor:
    """Zeroed int32 tickets, one set per device: every launch leaves its tickets at zero again, so
    the set serves every launch as long as launches on a device do not overlap (one stream at a
    time, as in the decode runtime). Allocated on first use, i.e. in the warm-up before a CUDA graph
    is captured; 1024 tickets cover hidden sizes up to 65536."""
    tickets = _tickets.get(device)
    if tickets is None or tickets.numel() < count:
        if tickets is not None:
            _outgrown.append(tickets)
        tickets = _tickets[device] = torch.zeros(max(count, 1024), dtype=torch.int32, device=device)
    return tickets


@torch.library.custom_op("subfit::fused_bypass", mutates_args=("out",))
def _fused_bypass_op(
    x: Optional[torch.Tensor], residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
    down: torch.Tensor, up: torch.Tensor, bias: Optional[torch.Tensor], out: torch.Tensor,
) -> None:
    n_rows, hidden = residual.shape
    rank = down.shape[1]
    if n_rows == 0:
        return
    device = down.device
    cfg = _config(n_rows, hidden, rank, device)
    row_tiles = triton.cdiv(n_rows, cfg.block_m)
    rank_tiles, col_tiles = triton.cdiv(rank, cfg.down.block), triton.cdiv(hidden, cfg.up.block)
    split = cfg.down.splits > 1 or cfg.up.splits > 1
    tickets = _ticket_counters(device, row_tiles * max(rank_tiles, col_tiles)) if split else None
    precision = dot_precision(down.dtype)
    t = torch.empty((n_rows, rank), dtype=down.dtype, device=device)
    part = sumsq = None
    if cfg.down.splits > 1:
        part = torch.empty((cfg.down.splits, n_rows, rank), dtype=torch.float32, device=device)
        sumsq = torch.empty((rank_tiles, cfg.down.splits, n_rows), dtype=torch.float32, device=device)
    _down_kernel[(row_tiles, rank_tiles, cfg.down.splits)](
        x, residual, norm_weight, down, t, part, sumsq, tickets,
        n_rows, hidden, rank, cfg.down.per_split, cfg.down.splits, eps,
        0 if x is None else x.stride(0), residual.stride(0), down.stride(0), t.stride(0),
        HAS_X=x is not None, SPLIT=cfg.down.splits > 1, SCALE_OPERAND=down.dtype == torch.float16,
        BLOCK_M=cfg.block_m, BLOCK_R=cfg.down.block, BLOCK_K=cfg.down.step, PRECISION=precision,
        num_warps=4, num_stages=2,
    )
    part = None
    if cfg.up.splits > 1:
        part = torch.empty((cfg.up.splits, n_rows, hidden), dtype=torch.float32, device=device)
    _up_kernel[(row_tiles, col_tiles, cfg.up.splits)](
        t, up, x, residual, bias, out, part, tickets,
        n_rows, hidden, rank, cfg.up.per_split, cfg.up.splits,
        t.stride(0), up.stride(0), 0 if x is None else x.stride(0), residual.stride(0), out.stride(0),
        HAS_X=x is not None, HAS_BIAS=bias is not None, SPLIT=cfg.up.splits > 1,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.up.block, BLOCK_R=cfg.up.step, PRECISION=precision,
        num_warps=4, num_stages=2,
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

    if not use_triton(residual, backend):
        return finish(fused_bypass_reference(x, residual, norm_weight, eps, down, up, bias), out)
    out = torch.empty(residual.shape, dtype=residual.dtype, device=residual.device) if out is None else out
    torch.ops.subfit.fused_bypass(
        None if x is None else as_rows(x), as_rows(residual), norm_weight, eps, down, up, bias, out.view(-1, hidden)
    )
    return out
