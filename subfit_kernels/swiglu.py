"""SwiGLU activation silu(gate) * up, the elementwise core of every Llama-style FeedForward.

Casting matches Hugging Face's `act_fn(gate) * up`: silu is computed in float32 and rounded to the
input dtype, then the product is rounded once more. gate and up may be row-strided views (e.g. the
two halves of a fused gate_up projection): no copy is made for them.
"""
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import Backend, as_rows, check_float, check_out, check_same_device, check_shape, finish, next_pow2, use_triton

BLOCK_N = 1024


@triton.jit
def _swiglu_kernel(G, U, O, stride_g, stride_u, stride_o, n_cols, BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    act = (g * tl.sigmoid(g)).to(O.dtype.element_ty).to(tl.float32)
    tl.store(O + row * stride_o + cols, (act * u).to(O.dtype.element_ty), mask=mask)


@torch.library.custom_op("subfit::swiglu", mutates_args=("out",))
def _swiglu_op(gate: torch.Tensor, up: torch.Tensor, out: torch.Tensor) -> None:
    rows, n_cols = gate.shape
    if rows == 0 or n_cols == 0:
        return
    block = min(BLOCK_N, next_pow2(n_cols))
    _swiglu_kernel[(rows, triton.cdiv(n_cols, block))](
        gate, up, out, gate.stride(0), up.stride(0), out.stride(0), n_cols, BLOCK_N=block, num_warps=4
    )


@_swiglu_op.register_fake
def _(gate, up, out) -> None:
    return None


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate.float()).to(gate.dtype) * up


def swiglu(
    gate: torch.Tensor, up: torch.Tensor, *, out: Optional[torch.Tensor] = None, backend: Backend = None
) -> torch.Tensor:
    """silu(gate) * up for gate, up of one shape [..., ffn] and one dtype; returns that shape and dtype."""
    check_float("gate", gate)
    if gate.dim() == 0:
        raise ValueError("gate and up must have at least one dim ([..., ffn])")
    check_float("up", up, (gate.dtype,), "the dtype of gate")
    check_shape("up", up, tuple(gate.shape), "the shape of gate")
    check_same_device(gate=gate, up=up, out=out)
    check_out(out, gate.shape, gate.dtype, gate.device)
    if not use_triton(gate, backend):
        return finish(swiglu_reference(gate, up), out)
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device) if out is None else out
    torch.ops.subfit.swiglu(as_rows(gate), as_rows(up), out.view(-1, gate.shape[-1]))
    return out
