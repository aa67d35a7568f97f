"""Shared plumbing for the ops: backend choice, argument checks, launch heuristics.

Every public op follows one pattern: check the arguments here (clear ValueError/TypeError), then
either run the Triton kernel through a `torch.library` custom op (opaque to torch.compile and safe
inside CUDA-graph capture) or run the op's plain PyTorch `*_reference`.
"""
import functools
import os
from typing import Literal, Optional

import torch
from packaging.version import Version

Backend = Optional[Literal["triton", "reference"]]

# triton.jit picks the interpreter when the kernel is *decorated*, i.e. when our op modules are
# imported, so the variable is read once here (this module is imported before any kernel).
INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def use_triton(tensor: torch.Tensor, backend: Backend = None) -> bool:
    """Whether an op on `tensor` runs its Triton kernel (True) or its PyTorch reference (False).

    backend=None picks Triton for CUDA tensors, and for CPU tensors when TRITON_INTERPRET=1 was set
    before subfit_kernels was imported; "triton" forces the kernel, "reference" the reference.
    """
    interpreted = INTERPRET and tensor.device.type == "cpu"
    can_run = tensor.is_cuda or interpreted
    if backend not in (None, "triton", "reference"):
        raise ValueError(f"backend must be 'triton', 'reference' or None (automatic), got {backend!r}")
    if backend == "reference":
        return False
    if backend == "triton" and not can_run:
        raise ValueError(
            f"backend='triton' cannot run on {tensor.device} tensors: use CUDA tensors, or set "
            "TRITON_INTERPRET=1 before importing subfit_kernels to run the kernels on CPU (slowly)"
        )
    if interpreted and INTERPRETER_PROBLEM:
        raise RuntimeError(INTERPRETER_PROBLEM)
    return can_run


def interpreter_problem(triton_version: Optional[str] = None, numpy_version: Optional[str] = None) -> Optional[str]:
    """Why Triton's interpreter cannot run our kernels with the installed Triton and NumPy, else None.

    Before Triton 3.7 the interpreter turns a loop bound computed from program_id into an int with
    int() of a one-element array, which NumPy 2.4 made an error: every split kernel would fail with a
    TypeError from deep inside the interpreter. Compiled (CUDA) kernels are unaffected.
    """
    if triton_version is None or numpy_version is None:
        import numpy
        import triton

        triton_version, numpy_version = triton.__version__, numpy.__version__
    if Version(triton_version).release[:2] < (3, 7) and Version(numpy_version).release[:2] >= (2, 4):
        return (f"Triton {triton_version}'s interpreter (TRITON_INTERPRET=1) cannot run these kernels with "
                f"NumPy {numpy_version}: install NumPy < 2.4 (pip install 'numpy<2.4') or Triton >= 3.7, "
                "or run on a CUDA device")
    return None


# read once, at import: use_triton runs inside torch.compile'd code, which should see a constant
INTERPRETER_PROBLEM: Optional[str] = interpreter_problem() if INTERPRET else None


def check_float(name: str, t: torch.Tensor, dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES, why: str = "") -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{name} has dtype {t.dtype}; expected {names}{f' ({why})' if why else ''}")


def check_dtype(name: str, t: torch.Tensor, dtype: torch.dtype, why: str) -> None:
    if t.dtype != dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but must be {dtype} ({why}); convert it with .to({dtype})")


def check_shape(name: str, t: torch.Tensor, expected: tuple[Optional[int], ...], what: str) -> None:
    """`expected` lists each dim (None: any size); `what` names the dims for the message."""
    if t.dim() != len(expected) or any(e is not None and s != e for s, e in zip(t.shape, expected)):
        want = ", ".join("*" if e is None else str(e) for e in expected)
        raise ValueError(f"{name} has shape {tuple(t.shape)}; expected [{want}] = {what}")


def check_same_device(**tensors: Optional[torch.Tensor]) -> None:
    given = {k: v for k, v in tensors.items() if v is not None}
    devices = {v.device for v in given.values()}
    if len(devices) > 1:
        where = ", ".join(f"{k} on {v.device}" for k, v in given.items())
        raise ValueError(f"all tensors must be on one device, got {where}; move them with .to(device)")


def check_writable(name: str, t: torch.Tensor) -> None:
    """Buffers the kernels write (out=, in-place residuals) cannot be silently copied: refuse instead."""
    if not t.is_contiguous():
        raise ValueError(
            f"{name} is written in place and must be contiguous (strides {t.stride()} for shape {tuple(t.shape)}); "
            "pass a contiguous buffer, e.g. torch.empty(shape) or t.contiguous()"
        )


def check_unit_last_stride(name: str, t: torch.Tensor) -> None:
    """Weights and KV caches are read with their own strides; copying them on every call would be slow: refuse."""
    if t.stride(-1) != 1:
        raise ValueError(
            f"{name} must have stride 1 in its last dim (strides {t.stride()}); it is read on every call, so "
            "make it contiguous once (e.g. at load time) instead of paying a copy per call"
        )


def check_out(out: Optional[torch.Tensor], shape: torch.Size, dtype: torch.dtype, device: torch.device) -> None:
    if out is None:
        return
    if out.shape != shape or out.dtype != dtype or out.device != device:
        raise ValueError(
            f"out has shape {tuple(out.shape)}, dtype {out.dtype} on {out.device}; expected shape {tuple(shape)}, "
            f"dtype {dtype} on {device}"
        )
    check_writable("out", out)


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """View [..., n] as [rows, n] with unit stride along n (copying only when no such view exists)."""
    rows = t.reshape(-1, t.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def inner_contiguous(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """t with unit stride in its last dim (other strides are passed to the kernels as they are)."""
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def finish(result: torch.Tensor, out: Optional[torch.Tensor]) -> torch.Tensor:
    """Return a reference result, through `out` when the caller gave one."""
    if out is None:
        return result
    return out.copy_(result)


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


@functools.lru_cache(maxsize=None)
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (a small stand-in under the CPU interpreter)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: exact for float32 (tf32 would lose ~3 digits), tensor cores otherwise."""
    return "ieee" if dtype == torch.float32 else "tf32"
