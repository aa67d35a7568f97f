"""Which device work runs on: one check, made before any work, for compress, eval, generate and
bench alike. A device that torch cannot parse or this machine does not have is refused in one
line, instead of torch's assertion deep inside the first `.to(device)`."""
from __future__ import annotations

import torch

from subfit.errors import cause


def default_device() -> torch.device:
    """CUDA when a GPU is present, else the CPU: the runtime's default."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_device(device: str | torch.device) -> torch.device:
    """`device` as a `torch.device`, after checking that this machine has it."""
    if not isinstance(device, (str, torch.device)):
        raise ValueError(f"device={device!r} must be a device name such as 'cpu', 'cuda' or 'cuda:1'.")
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device={str(device)!r} is not a device name; use cpu, cuda or cuda:N.") from None
    if parsed.type == "meta":
        raise ValueError("device='meta' holds no data and cannot run a model; use cpu or cuda.")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            why = "was built without CUDA" if torch.version.cuda is None else "finds no CUDA GPU"
            raise ValueError(f"device={str(device)!r} needs a CUDA GPU, and torch {torch.__version__} here {why}; "
                             "use cpu.")
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            names = "cuda:0" if count == 1 else f"cuda:0 to cuda:{count - 1}"
            raise ValueError(f"device={str(device)!r} does not exist: this machine has {count} CUDA "
                             f"device{'s' if count > 1 else ''}; use {names}, or cpu.")
        return parsed
    try:
        torch.empty(0, device=parsed)
    except Exception as e:  # each backend fails its own way (AssertionError, NotImplementedError, ...)
        raise ValueError(f"device={str(device)!r} is not available here: {cause(e)} Use cpu.") from None
    return parsed
