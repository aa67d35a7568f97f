"""The C++ kernels of batch-1 CPU decode, built on first use: a bfloat16 matrix-vector product, the
fused residual add + RMSNorm, and whole decode units built from the two.

Every matmul of a batch-1 decode step is `W @ x` over a weight read once from memory, so the step
runs at the rate one core streams weights. PyTorch's bfloat16 `torch.mv` leaves time on the table
there: ~25 us per call before any weight is read (121 calls per SmolLM2 token), and small matrices
streamed at 8-9 GB/s where float32's reach 13-14. `gemv_out` reads four rows side by side with
a prefetch ahead: ~5 us per call and 10-12 GB/s on those matrices (bench/results/gemv_cpu.md;
docs/cpu_decode.md has the effect on whole decode steps). float32 weights need no kernel of their own
for that (MKL's `torch.mv` already streams at the copy bandwidth); a float32 version serves the
whole-unit calls below.

Between the matmuls, every unit opens with a residual add and an RMSNorm of the float32 stream: as
PyTorch ops nine dispatches, ~30 us with the caches cold from the weights just streamed, 61 times
per SmolLM2 token; `add_rms_norm_out` does it in one call (docs/cpu_decode.md). A batch-1 decode
step goes further: `attention_decode`, `feed_forward_decode` and `bypass_decode` each run a whole
unit (norm, matmuls, RoPE, cache write and attention, activation, residual add) in one call, where
op by op a unit was 10-30 dispatches of tiny tensors.

The extension is compiled with the machine's C++ compiler the first time a process needs it (about
13 s on the 2-core CPU; cached under TORCH_EXTENSIONS_DIR, ~/.cache/torch_extensions by default, per
checkout). Commands that will run on the CPU start that build in the background before they load
the model (`build_in_background`), so a first run pays for the longer of the two, not their sum.
Where it cannot be built or the CPU lacks the instructions, `kernel_for` and `decode_kernels` return
None and callers use PyTorch ops: slower, same results up to float32 summation order.
"""
from __future__ import annotations

import functools
import threading
import warnings
from pathlib import Path

import torch

from subfit.hardware import cpu_has

SOURCE = Path(__file__).with_suffix(".cpp")
FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-fopenmp"]


def supported() -> bool:
    """Whether this CPU has the instructions the kernel needs (AVX-512 with BF16 dot products)."""
    return cpu_has("avx512_f", "avx512_bw", "avx512_vl", "avx512_bf16")


_BUILD_LOCK = threading.Lock()  # one build at a time; a caller waits for the one under way


def _extension():
    """The compiled module, or None (with one warning saying why) where it cannot be built."""
    with _BUILD_LOCK:
        return _build()


@functools.cache
def _build():
    if not supported():
        return None
    try:
        from torch.utils.cpp_extension import load

        return load("subfit_cpu_kernels", [str(SOURCE)], extra_cflags=FLAGS, extra_ldflags=["-fopenmp"])
    except Exception as e:  # no compiler or ninja: decode still works, on PyTorch ops
        warnings.warn(f"subfit's CPU decode kernels could not be built ({type(e).__name__}: {str(e)[:200]}); "
                      "CPU decode falls back to PyTorch ops, which are slower. Install a C++ compiler (g++) and "
                      "ninja to get them.", RuntimeWarning, stacklevel=4)
        return None


def build_in_background() -> None:
    """Start building (or loading) the extension on a thread, for a command about to spend seconds on
    something else, such as loading a model. Not a daemon thread: a build cut off at exit would
    leave its lock file behind and block every later build."""
    threading.Thread(target=_extension, name="subfit-cpu-kernels-build").start()


def kernel_for(weight: torch.Tensor):
    """The unchecked kernel `gemv_out(weight, x, bias, out)` if it serves this weight (2-D, contiguous,
    bfloat16, on a CPU that has the instructions), else None; for callers that guarantee `gemv`'s
    argument rules themselves, as `model.Dense` does. Builds the extension on first use."""
    if weight.device.type != "cpu" or weight.dtype != torch.bfloat16 or weight.dim() != 2 or not weight.is_contiguous():
        return None
    extension = _extension()
    return None if extension is None else extension.gemv_out


def gemv(weight: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None = None,
         out: torch.Tensor | None = None) -> torch.Tensor:
    """`weight @ x + bias` in bfloat16, summed in float32; `x` ([in], float32 or bfloat16) is rounded
    to bfloat16 first, as in `torch.mv(weight, x.to(torch.bfloat16))`."""
    bf16 = torch.bfloat16
    if weight.dim() != 2 or weight.dtype != bf16 or not weight.is_contiguous():
        raise ValueError(f"weight must be a contiguous 2-D bfloat16 matrix, got {tuple(weight.shape)} {weight.dtype}")
    rows, cols = weight.shape
    if x.shape != (cols,) or x.dtype not in (torch.float32, bf16):
        raise ValueError(f"x must be a [{cols}] float32 or bfloat16 vector for a {rows} x {cols} "
                         f"weight, got {tuple(x.shape)} {x.dtype}")
    if bias is not None and (bias.shape != (rows,) or bias.dtype != bf16 or not bias.is_contiguous()):
        raise ValueError(f"bias must be a contiguous [{rows}] bfloat16 vector, got {tuple(bias.shape)} {bias.dtype}")
    if out is None:
        out = torch.empty(rows, dtype=bf16)
    elif out.shape != (rows,) or out.dtype != bf16 or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous [{rows}] bfloat16 vector, got {tuple(out.shape)} {out.dtype}")
    kernel = kernel_for(weight)
    if kernel is None:
        raise RuntimeError("subfit's CPU decode kernels are not available here (see the warning above, or "
                           "cpu_kernels.supported()); use torch.mv")
    kernel(weight, x, bias, out)
    return out


def gemv_reference(weight: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The same product in float64 from the same rounded inputs (`gemv` sums in float32, then rounds)."""
    y = weight.double() @ x.to(weight.dtype).double()
    return y if bias is None else y + bias.double()


def decode_kernels():
    """The extension module where it is built here, else None; builds it on first use. Its
    `add_rms_norm_out(x | None, residual, weight, eps, h, normed)` is unchecked (callers guarantee
    `add_rms_norm`'s argument rules, as `ops.TorchOps` does); the whole-unit kernels
    `attention_decode`, `feed_forward_decode` and `bypass_decode` check their arguments themselves."""
    return _extension()


def add_rms_norm(x: torch.Tensor | None, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(h) * weight, h) with h = x + residual (residual itself when x is None), float32, as
    Hugging Face's LlamaRMSNorm computes it on a float32 stream; x may be bfloat16 (a bf16 matmul's
    output), added in float32."""
    f32 = torch.float32
    if residual.dtype != f32 or not residual.is_contiguous() or residual.dim() == 0:
        raise ValueError(f"residual must be a contiguous float32 tensor, got {tuple(residual.shape)} {residual.dtype}")
    n = residual.shape[-1]
    if x is not None and (x.shape != residual.shape or x.dtype not in (f32, torch.bfloat16) or not x.is_contiguous()):
        raise ValueError(f"x must be a contiguous float32 or bfloat16 tensor shaped like residual "
                         f"{tuple(residual.shape)}, got {tuple(x.shape)} {x.dtype}")
    if weight.shape != (n,) or weight.dtype != f32 or not weight.is_contiguous():
        raise ValueError(f"weight must be a contiguous [{n}] float32 vector, got {tuple(weight.shape)} {weight.dtype}")
    extension = _extension()
    if extension is None:
        raise RuntimeError("subfit's CPU decode kernels are not available here (see the warning above, or "
                           "cpu_kernels.supported()); use ops.rms_norm")
    h = residual if x is None else torch.empty_like(residual)
    normed = torch.empty_like(residual)
    extension.add_rms_norm_out(x, residual, weight, eps, h, normed)
    return normed, h


def add_rms_norm_reference(x: torch.Tensor | None, residual: torch.Tensor, weight: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The same in float64."""
    h = residual.double() if x is None else x.double() + residual.double()
    return weight.double() * h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps), h
