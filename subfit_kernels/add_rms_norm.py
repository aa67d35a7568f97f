"""Fused residual add + RMSNorm: the pre-norm of every decoder block, in one pass over the row.

Casting follows Hugging Face's LlamaRMSNorm exactly: h = x + residual is rounded to h's dtype,
normalised in float32, rounded back to h's dtype (`hidden.to(input_dtype)`), then multiplied by the
weight; y is stored in x's dtype.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import (
    Backend,
    as_rows,
    check_dtype,
    check_float,
    check_out,
    check_same_device,
    check_shape,
    check_unit_last_stride,
    check_writable,
    finish,
    next_pow2,
    use_triton,
)

MAX_HIDDEN = 65536  # one row per program, held in registers


@triton.jit
def _add_rms_norm_kernel(
    X, R, W, Y, H,
    stride_x, stride_r, stride_y, stride_h,
    n_cols, eps,
    HAS_RESIDUAL: tl.constexpr,
    STORE_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One row per program; without STORE_H, h is x itself and needs no rounding."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)  # issued with the row's loads, not after the sum
    h = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        h += tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
    if STORE_H:
        h_dtype = H.dtype.element_ty
        h = h.to(h_dtype)
        tl.store(H + row * stride_h + cols, h, mask=mask)
        h = h.to(tl.float32)
    else:
        h_dtype = X.dtype.element_ty
    rstd = tl.rsqrt(tl.sum(h * h, axis=0) / n_cols + eps)
    normed = (h * rstd).to(h_dtype).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (normed * w).to(Y.dtype.element_ty), mask=mask)


def add_rms_norm_rows(
    x: torch.Tensor,
    residual: Optional[torch.Tensor],
    weight: torch.Tensor,
    eps: float,
    y: torch.Tensor,
    h: Optional[torch.Tensor],
) -> None:
    """Launch on 2-D row views (unit stride along hidden); h=None means h is x."""
    rows, n_cols = x.shape
    if rows == 0:
        return
    block = next_pow2(n_cols)
    _add_rms_norm_kernel[(rows,)](
        x, residual, weight, y, h,
        x.stride(0), 0 if residual is None else residual.stride(0), y.stride(0), 0 if h is None else h.stride(0),
        n_cols, eps,
        HAS_RESIDUAL=residual is not None,
        STORE_H=h is not None,
        BLOCK_N=block,
        num_warps=min(16, max(4, block // 256)),
    )


@torch.library.custom_op("subfit::add_rms_norm", mutates_args=("y", "h"))
def _add_rms_norm_op(
    x: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor, eps: float,
    y: torch.Tensor, h: Optional[torch.Tensor],
) -> None:
    add_rms_norm_rows(x, residual, weight, eps, y, h)


@_add_rms_norm_op.register_fake
def _(x, residual, weight, eps, y, h) -> None:
    return None


@torch.library.custom_op("subfit::add_rms_norm_inplace", mutates_args=("residual", "y"))
def _add_rms_norm_inplace_op(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, y: torch.Tensor
) -> None:
    add_rms_norm_rows(x, residual, weight, eps, y, residual)


@_add_rms_norm_inplace_op.register_fake
def _(x, residual, weight, eps, y) -> None:
    return None


def add_rms_norm_reference(
    x: torch.Tensor,
    residual: Optional[torch.Tensor],
    weight: torch.Tensor,
    eps: float,
    *,
    residual_in_fp32: bool = False,
    in_place: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same math in PyTorch; equals LlamaRMSNorm(x + residual) bit for bit when dtypes agree."""
    h_dtype = torch.float32 if residual_in_fp32 else x.dtype
    h = x.to(h_dtype) if residual is None else (x.float() + residual.float()).to(h_dtype)
    if in_place:
        h = residual.copy_(h)
    h32 = h.float()
    normed = (h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)
    return (weight.float() * normed.float()).to(x.dtype), h


def add_rms_norm(
    x: torch.Tensor,
    residual: Optional[torch.Tensor],
    weight: torch.Tensor,
    eps: float,
    *,
    residual_in_fp32: bool = False,
    in_place: bool = False,
    out: Optional[torch.Tensor] = None,
    backend: Backend = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, h): h = x + residual (h = x when residual is None), y = RMSNorm(h) * weight.

    x, residual: [..., hidden]; residual has x's dtype or float32. weight: [hidden], x's dtype or
    float32. y has x's dtype (written into `out` when given); h is float32 with residual_in_fp32,
    else x's dtype. in_place writes h into `residual` and returns it as h (it must then be contiguous
    and of h's dtype). backend: None (automatic), "triton" or "reference".
    """
    check_float("x", x)
    if x.dim() == 0:
        raise ValueError("x must have at least one dim ([..., hidden])")
    hidden = x.shape[-1]
    if residual is not None:
        check_float("residual", residual, (x.dtype, torch.float32), "x's dtype or float32")
        check_shape("residual", residual, tuple(x.shape), "the shape of x")
    check_float("weight", weight, (x.dtype, torch.float32), "x's dtype or float32")
    check_shape("weight", weight, (hidden,), "[hidden]")
    check_unit_last_stride("weight", weight)
    check_same_device(x=x, residual=residual, weight=weight, out=out)
    check_out(out, x.shape, x.dtype, x.device)
    if hidden > MAX_HIDDEN:
        raise ValueError(f"hidden size {hidden} exceeds {MAX_HIDDEN}, the most one program holds")
    h_dtype = torch.float32 if residual_in_fp32 else x.dtype
    if in_place:
        if residual is None:
            raise ValueError("in_place=True writes h into residual, but residual is None")
        check_dtype("residual", residual, h_dtype, "in_place=True stores h in it, and h is float32 when "
                    "residual_in_fp32=True, else x's dtype")
        check_writable("residual", residual)

    if not use_triton(x, backend):
        y, h = add_rms_norm_reference(x, residual, weight, eps, residual_in_fp32=residual_in_fp32, in_place=in_place)
        return finish(y, out), h

    y = torch.empty(x.shape, dtype=x.dtype, device=x.device) if out is None else out
    x_rows, y_rows = as_rows(x), y.view(-1, hidden)
    if in_place:
        torch.ops.subfit.add_rms_norm_inplace(x_rows, residual.view(-1, hidden), weight, eps, y_rows)
        return y, residual
    if residual is None and h_dtype == x.dtype:
        torch.ops.subfit.add_rms_norm(x_rows, None, weight, eps, y_rows, None)
        return y, x
    h = torch.empty(x.shape, dtype=h_dtype, device=x.device)
    residual_rows = None if residual is None else as_rows(residual)
    torch.ops.subfit.add_rms_norm(x_rows, residual_rows, weight, eps, y_rows, h.view(-1, hidden))
    return y, h
