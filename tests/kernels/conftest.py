"""Kernel tests run on CUDA when present, else on CPU through Triton's interpreter.

TRITON_INTERPRET must be set before the kernels are decorated (when subfit_kernels is imported),
hence at the very top of this file. Tests pass backend="triton" explicitly, so a run where the
interpreter could not be switched on fails loudly instead of quietly testing the references.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

ON_CUDA = torch.cuda.is_available()
# the interpreter mishandles bfloat16 (numpy has none), so bf16 is only tested on CUDA
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_CUDA else [])
ATOL = 1e-5  # relative-error slack: the whole bound for float32, where the two references coincide


def pytest_generate_tests(metafunc):
    if "dtype" in metafunc.fixturenames:
        metafunc.parametrize("dtype", DTYPES, ids=[str(d).removeprefix("torch.") for d in DTYPES])


@pytest.fixture
def device() -> str:
    return "cuda" if ON_CUDA else "cpu"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.fixture
def assert_close():
    """check(out, ref32, ref_lowp): out is the kernel's result, ref32 the reference on float32 copies
    of the inputs, ref_lowp the reference on the kernel's own inputs. The three-way rule
    err(out, ref32) <= 2 * err(ref_lowp, ref32) + ATOL: a reduced-precision kernel may be at most
    twice as far from the float32 truth as PyTorch in that precision; a float32 one within ATOL.
    """

    def check(out: torch.Tensor, ref32: torch.Tensor, ref_lowp: torch.Tensor) -> None:
        assert not out.isnan().any(), "kernel left NaN in its output (an unwritten or poisoned element)"
        err, bound = rel_err(out, ref32), 2 * rel_err(ref_lowp, ref32) + ATOL
        assert err <= bound, f"relative error {err:.3g} > three-way bound {bound:.3g}"

    return check


@pytest.fixture
def poison():
    """An output buffer filled with NaN, so any element a kernel fails to write shows up."""

    def make(shape, dtype, device) -> torch.Tensor:
        return torch.full(tuple(shape), float("nan"), dtype=dtype, device=device)

    return make


def _f32(t):
    return t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t


@pytest.fixture
def references():
    """refs(fn, *args, **kwargs) -> (fn on float32 copies of the float inputs, fn on the inputs as given)."""

    def run(fn, *args, **kwargs):
        ref32 = fn(*map(_f32, args), **{k: _f32(v) for k, v in kwargs.items()})
        return ref32, fn(*args, **kwargs)

    return run
