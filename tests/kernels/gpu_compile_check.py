"""Compile every kernel launch of the public ops for a real CUDA target, on a machine without a GPU.

The interpreter runs kernels as Python, so it cannot catch what only the compiler sees (types,
tl.dot shape limits, shared memory). Here the ops run with TRITON_INTERPRET unset and each launch
is intercepted: its real arguments and constexprs (and the 16-byte alignments triton's launcher would
specialise on) are compiled to a cubin for sm_80 and sm_90 (with the ptxas bundled in triton) instead
of being launched. Run as a script; prints one line per kernel with its sm_90 registers, stack
(spill) bytes and shared memory.
"""
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

import subfit_kernels as K  # noqa: E402
from subfit_kernels import _common  # noqa: E402

POINTER_TYPES = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.int32: "*i32",
                 torch.int64: "*i64"}
TARGETS = [GPUTarget("cuda", 80, 32), GPUTarget("cuda", 90, 32)]
compiled: set[str] = set()


def resources(cubin: bytes) -> str:
    """Registers and stack (spill) bytes per thread, read from the cubin with triton's cuobjdump."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        report = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", report)
    return f"{found[1]} registers, {found[2]} B stack" if found else "resource usage unreadable"


def compile_instead_of_launch(self, *args, grid, warmup, **kwargs):
    bound = dict(zip(self.arg_names, args))
    bound.update({k: v for k, v in kwargs.items() if k in self.arg_names})
    options = {k: v for k, v in kwargs.items() if k not in self.arg_names}
    signature, constexprs, attrs = {}, {}, {}
    for index, param in enumerate(self.params):
        value = bound[param.name]
        if param.is_constexpr or value is None:
            signature[param.name], constexprs[param.name] = "constexpr", value
            continue
        if isinstance(value, torch.Tensor):
            signature[param.name] = POINTER_TYPES[value.dtype]
            aligned = value.data_ptr() % 16 == 0
        elif isinstance(value, bool):
            signature[param.name], aligned = "i1", False
        elif isinstance(value, int):
            signature[param.name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            aligned = value % 16 == 0
        else:
            signature[param.name], aligned = "fp32", False
        if aligned:  # what triton's launcher specialises on: it decides vector widths
            attrs[(index,)] = [["tt.divisibility", 16]]
    for target in TARGETS:
        kernel = triton.compile(ASTSource(self, signature, constexprs, attrs), target=target, options=options)
        if kernel.metadata.shared > 99 * 1024:
            raise RuntimeError(f"{self.__name__} needs {kernel.metadata.shared} B of shared memory on {target}")
    key = f"{self.__name__} {sorted((k, str(v)) for k, v in constexprs.items())} {sorted(signature.items())}"
    if key not in compiled:
        compiled.add(key)
        used = f"sm_90: {resources(kernel.asm['cubin'])}, {kernel.metadata.shared} B shared"
        print("compiled", self.__name__, {k: v for k, v in constexprs.items() if v is not None}, used, flush=True)


def run_ops(dtype: torch.dtype) -> None:
    def randn(*shape):
        return torch.randn(*shape).to(dtype)

    for rows in (1, 130):  # decode and prefill configurations
        x, r, w = randn(rows, 576), randn(rows, 576), randn(576)
        K.add_rms_norm(x, r, w, 1e-5)
        K.add_rms_norm(x, r.float(), w, 1e-5, residual_in_fp32=True, in_place=True)
        K.add_rms_norm(x, None, w, 1e-5)
        K.add_rms_norm(randn(rows, 4096), randn(rows, 4096), randn(4096), 1e-5)  # 16 warps, Llama-8B rows
        K.swiglu(randn(rows, 1536), randn(rows, 1536))
        K.fused_bypass(x, r, w, 1e-5, randn(576, 64), randn(64, 576), randn(576))
        K.fused_bypass(None, r.float(), w, 1e-5, randn(576, 256), randn(256, 576), None)
        q, k, v = randn(1, rows, 32, 128), randn(1, rows, 8, 128), randn(1, rows, 8, 128)
        cos, sin = torch.rand(256, 64), torch.rand(256, 64)
        positions = torch.arange(rows)[None]
        K.apply_rope(q, k, cos, sin, positions)
        K.apply_rope(q, k, cos, sin, positions, k_cache=randn(1, 8, 256, 128), v_cache=randn(1, 8, 256, 128), v=v)
    for head_dim in (64, 128):
        q, cache = randn(2, 9, head_dim), randn(2, 3, 512, head_dim)
        for splits in (None, 64):
            K.decode_attention(q, cache, cache, torch.tensor([512, 7], dtype=torch.int32), num_splits=splits)


def main() -> int:
    JITFunction.run = compile_instead_of_launch
    _common.INTERPRET = True  # let the launchers take CPU tensors: nothing is launched
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        run_ops(dtype)
    print(f"{len(compiled)} kernel configurations compiled for sm_80 and sm_90")
    return 0


if __name__ == "__main__":
    sys.exit(main())
