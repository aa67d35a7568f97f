"""What the machine's matrix units do fast: one answer for the runtime and for compression."""
from __future__ import annotations

import contextlib

import torch


def cpu_has(*features: str) -> bool:
    """Whether this CPU has every named instruction set (keys of `torch.cpu.get_capabilities()`,
    e.g. "avx512_bf16"); False where torch cannot tell."""
    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    return all(caps.get(feature) for feature in features)


def cpu_bf16_units() -> list[str]:
    """This CPU's native bf16 matmul units ("AMX-BF16", "AVX512-BF16"), which oneDNN's bf16 kernels
    need to beat float32; empty where there are none (bf16 would then be emulated, and slower)."""
    return [name for key, name in (("amx_bf16", "AMX-BF16"), ("avx512_bf16", "AVX512-BF16")) if cpu_has(key)]


def fast_bf16(device: torch.device | str) -> bool:
    """Whether bf16 matmuls beat float32 on `device` (a GPU with bf16 support, or a CPU with bf16 units)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and bool(cpu_bf16_units())


def bf16_matmuls(device: torch.device | str) -> contextlib.AbstractContextManager:
    """Matmuls (and attention) in bf16 where that is fast, everything else as it is: residual
    streams, norms and statistics keep their precision. A no-op elsewhere."""
    device = torch.device(device)
    if not fast_bf16(device):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
