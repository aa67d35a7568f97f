"""The CPU GEMV kernel (`subfit/runtime/cpu_gemv.cpp`, built here on first use) against a float64
product of the same bfloat16-rounded inputs, and `Dense` routing batch-1 decode through it."""
from __future__ import annotations

import pytest
import torch

from subfit.runtime import cpu_gemv
from subfit.runtime.model import Dense

pytestmark = pytest.mark.skipif(not cpu_gemv.supported(), reason="this CPU lacks AVX512-BF16")

BF16_EPS = 2.0 ** -8  # one bfloat16 rounding of the output; the float32 sums add far less


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


# rows x columns: below, at and above the kernel's 4-row groups and 32-lane registers, odd sizes,
# a tall matrix split across threads, and a wide one (a down projection)
SHAPES = [(1, 1), (3, 31), (4, 32), (5, 33), (961, 577), (3072, 576), (7, 4100), (12289, 64)]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("rows,cols", SHAPES)
@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16], ids=["x_f32", "x_bf16"])
def test_gemv_matches_float64(rows, cols, with_bias, x_dtype, threads):
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        weight = torch.randn(rows, cols).bfloat16()
        x = torch.randn(cols, dtype=x_dtype)
        bias = torch.randn(rows).bfloat16() if with_bias else None
        out = torch.full((rows,), float("nan"), dtype=torch.bfloat16)  # poisoned: every row must be written
        y = cpu_gemv.gemv(weight, x, bias, out=out)
    finally:
        torch.set_num_threads(saved)
    assert y.data_ptr() == out.data_ptr() and y.dtype == torch.bfloat16
    assert torch.isfinite(y).all()
    assert rel_err(y, cpu_gemv.gemv_reference(weight, x, bias)) < BF16_EPS
    if bias is None:  # and as close to torch.mv of the same rounded inputs as two roundings allow
        assert rel_err(y, torch.mv(weight, x.bfloat16())) < 2 * BF16_EPS


def test_gemv_rounds_x_like_a_cast():
    """A float32 x is rounded to bfloat16 (nearest even) before the product, exactly as `.to()` does:
    the two calls see the same bfloat16 vector, so they give identical outputs."""
    weight = torch.randn(64, 96).bfloat16()
    x = torch.randn(96)
    assert torch.equal(cpu_gemv.gemv(weight, x), cpu_gemv.gemv(weight, x.bfloat16()))


def test_gemv_reads_a_strided_row():
    """A row that is a strided view (every other element) is read as its values, not its memory."""
    weight = torch.randn(40, 50).bfloat16()
    wide = torch.randn(100)
    assert torch.equal(cpu_gemv.gemv(weight, wide[::2]), cpu_gemv.gemv(weight, wide[::2].contiguous()))


@pytest.mark.parametrize("bad, message", [
    (lambda w, x: (w.float(), x, None), "bfloat16 matrix"),
    (lambda w, x: (w[None], x, None), "2-D bfloat16 matrix"),
    (lambda w, x: (w, x[:-1], None), "x must be"),
    (lambda w, x: (w, x.double(), None), "x must be"),
    (lambda w, x: (w, x, torch.zeros(3)), "bias must be"),
])
def test_gemv_refuses_bad_arguments(bad, message):
    weight, x = torch.randn(8, 16).bfloat16(), torch.randn(16)
    with pytest.raises(ValueError, match=message):
        cpu_gemv.gemv(*bad(weight, x))


def test_dense_uses_the_kernel_for_one_row_and_matmul_for_more():
    torch.manual_seed(0)
    weight, bias = torch.randn(48, 40).bfloat16(), torch.randn(48).bfloat16()
    dense = Dense(weight, bias)
    assert dense.kernel is not None
    assert Dense(weight.float()).kernel is None  # float32 stays on torch.mv
    row = torch.randn(1, 1, 40)
    y = dense(row)
    assert y.shape == (1, 1, 48) and y.dtype == torch.bfloat16
    assert rel_err(y, cpu_gemv.gemv_reference(weight, row.view(-1), bias)) < BF16_EPS
    rows = torch.randn(3, 5, 40)
    ys = dense(rows)
    assert ys.shape == (3, 5, 48)
    assert rel_err(ys, rows.bfloat16().double() @ weight.double().T + bias.double()) < BF16_EPS
