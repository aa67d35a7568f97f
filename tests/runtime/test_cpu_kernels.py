"""The CPU decode kernels (`subfit/runtime/cpu_kernels.cpp`, built here on first use) against float64
references: the GEMV on the same bfloat16-rounded inputs, with `Dense` routing batch-1 decode
through it, and the fused add + RMSNorm, with `TorchOps` routing the float32 stream through it."""
from __future__ import annotations

import pytest
import torch

from subfit.runtime import cpu_kernels
from subfit.runtime.model import Dense
from subfit.runtime.ops import TorchOps, rms_norm

pytestmark = pytest.mark.skipif(not cpu_kernels.supported(), reason="this CPU lacks AVX512-BF16")

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
        y = cpu_kernels.gemv(weight, x, bias, out=out)
    finally:
        torch.set_num_threads(saved)
    assert y.data_ptr() == out.data_ptr() and y.dtype == torch.bfloat16
    assert torch.isfinite(y).all()
    assert rel_err(y, cpu_kernels.gemv_reference(weight, x, bias)) < BF16_EPS
    if bias is None:  # and as close to torch.mv of the same rounded inputs as two roundings allow
        assert rel_err(y, torch.mv(weight, x.bfloat16())) < 2 * BF16_EPS


def test_gemv_rounds_x_like_a_cast():
    """A float32 x is rounded to bfloat16 (nearest even) before the product, exactly as `.to()` does:
    the two calls see the same bfloat16 vector, so they give identical outputs."""
    weight = torch.randn(64, 96).bfloat16()
    x = torch.randn(96)
    assert torch.equal(cpu_kernels.gemv(weight, x), cpu_kernels.gemv(weight, x.bfloat16()))


def test_gemv_reads_a_strided_row():
    """A row that is a strided view (every other element) is read as its values, not its memory."""
    weight = torch.randn(40, 50).bfloat16()
    wide = torch.randn(100)
    assert torch.equal(cpu_kernels.gemv(weight, wide[::2]), cpu_kernels.gemv(weight, wide[::2].contiguous()))


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
        cpu_kernels.gemv(*bad(weight, x))


def test_dense_uses_the_kernel_for_one_row_and_matmul_for_more():
    torch.manual_seed(0)
    weight, bias = torch.randn(48, 40).bfloat16(), torch.randn(48).bfloat16()
    dense = Dense(weight, bias)
    assert dense.kernel is not None
    assert Dense(weight.float()).kernel is None  # float32 stays on torch.mv
    row = torch.randn(1, 1, 40)
    y = dense(row)
    assert y.shape == (1, 1, 48) and y.dtype == torch.bfloat16
    assert rel_err(y, cpu_kernels.gemv_reference(weight, row.view(-1), bias)) < BF16_EPS
    rows = torch.randn(3, 5, 40)
    ys = dense(rows)
    assert ys.shape == (3, 5, 48)
    assert rel_err(ys, rows.bfloat16().double() @ weight.double().T + bias.double()) < BF16_EPS


F32_EPS = 2.0 ** -20  # float32 sums in another order than float64's


# rows x hidden: one row (decode), odd and non-power-of-two widths on both sides of the 16-lane
# registers, a width of one, and a wide row
NORM_SHAPES = [(1, 1, 576), (3, 5, 577), (7, 1), (2, 15), (4, 16), (1, 17), (2, 4100)]


@pytest.mark.parametrize("shape", NORM_SHAPES, ids=str)
@pytest.mark.parametrize("x_kind", ["x_f32", "x_bf16", "residual_only"])
def test_add_rms_norm_matches_float64(shape, x_kind):
    torch.manual_seed(sum(shape))
    residual = torch.randn(shape) * 3
    x = None if x_kind == "residual_only" else torch.randn(shape, dtype=torch.bfloat16 if x_kind == "x_bf16" else None)
    weight = torch.randn(shape[-1])
    normed, h = cpu_kernels.add_rms_norm(x, residual, weight, 1e-5)
    ref_normed, ref_h = cpu_kernels.add_rms_norm_reference(x, residual, weight, 1e-5)
    assert normed.shape == h.shape == residual.shape and normed.dtype == h.dtype == torch.float32
    assert rel_err(normed, ref_normed) < F32_EPS
    assert rel_err(h, ref_h) < F32_EPS
    if x is None:  # the stream is the residual itself, not a copy
        assert h.data_ptr() == residual.data_ptr()


def test_add_rms_norm_splits_a_prompt_over_threads():
    """A prompt's rows go to both threads; every row comes out as it does alone."""
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        residual, x, weight = torch.randn(67, 333), torch.randn(67, 333), torch.randn(333)
        normed, h = cpu_kernels.add_rms_norm(x, residual, weight, 1e-5)
    finally:
        torch.set_num_threads(saved)
    ref_normed, ref_h = cpu_kernels.add_rms_norm_reference(x, residual, weight, 1e-5)
    assert rel_err(normed, ref_normed) < F32_EPS and rel_err(h, ref_h) < F32_EPS
    assert torch.equal(normed[40], cpu_kernels.add_rms_norm(x[40:41], residual[40:41], weight, 1e-5)[0][0])


def test_add_rms_norm_writes_every_element_and_keeps_its_inputs():
    residual, x, weight = torch.randn(5, 33), torch.randn(5, 33), torch.randn(33)
    saved = residual.clone(), x.clone(), weight.clone()
    h, normed = torch.full_like(residual, float("nan")), torch.full_like(residual, float("nan"))  # poisoned
    cpu_kernels.decode_kernels().add_rms_norm_out(x, residual, weight, 1e-6, h, normed)
    assert torch.isfinite(h).all() and torch.isfinite(normed).all()
    ref_normed, ref_h = cpu_kernels.add_rms_norm_reference(x, residual, weight, 1e-6)
    assert rel_err(normed, ref_normed) < F32_EPS and rel_err(h, ref_h) < F32_EPS
    assert all(torch.equal(a, b) for a, b in zip((residual, x, weight), saved))


def test_add_rms_norm_eps_dominates_a_zero_row():
    """A zero stream normalises to zero (eps keeps the scale finite), as Hugging Face's RMSNorm does."""
    normed, _ = cpu_kernels.add_rms_norm(None, torch.zeros(2, 40), torch.randn(40), 1e-5)
    assert torch.equal(normed, torch.zeros(2, 40))


@pytest.mark.parametrize("bad, message", [
    (lambda x, r, w: (x, r.double(), w), "residual must be"),
    (lambda x, r, w: (x, r.T, w), "residual must be"),
    (lambda x, r, w: (x[:, :-1], r, w), "x must be"),
    (lambda x, r, w: (x.double(), r, w), "x must be"),
    (lambda x, r, w: (x, r, w[:-1]), "weight must be"),
    (lambda x, r, w: (x, r, w.double()), "weight must be"),
])
def test_add_rms_norm_refuses_bad_arguments(bad, message):
    x, residual, weight = torch.randn(6, 6), torch.randn(6, 6), torch.randn(6)
    with pytest.raises(ValueError, match=message):
        cpu_kernels.add_rms_norm(*bad(x, residual, weight), 1e-5)


def test_torch_ops_use_the_kernel_for_float32_and_plain_ops_otherwise():
    """The runtime's PyTorch path sends the float32 stream (with a float32 or bf16 unit output)
    through the kernel and gives what `rms_norm` gives; other dtypes and broadcast shapes take the
    plain ops."""
    ops = TorchOps("cpu")
    assert ops.norm_kernel is not None
    torch.manual_seed(1)
    residual, x, weight = torch.randn(1, 1, 576), torch.randn(1, 1, 576), torch.randn(576)
    normed, h = ops.add_rms_norm(x, residual, weight, 1e-5)
    assert rel_err(normed, rms_norm(x + residual, weight, 1e-5)) < F32_EPS
    assert rel_err(h, x + residual) == 0.0
    wide = torch.randn(1, 4, 576)  # x broadcast over residual's rows: the plain ops
    normed, h = ops.add_rms_norm(x, wide, weight, 1e-5)
    assert torch.equal(h, x + wide) and torch.allclose(normed, rms_norm(x + wide, weight, 1e-5))
    matmul_out = x.bfloat16()  # a bf16 decode: the unit's output in bf16, the stream in float32
    normed, h = ops.add_rms_norm(matmul_out, residual, weight, 1e-5)
    assert h.dtype == torch.float32 and torch.equal(h, matmul_out + residual)
    assert rel_err(normed, rms_norm(matmul_out + residual, weight, 1e-5)) < F32_EPS
    half = residual.bfloat16()
    normed, _ = ops.add_rms_norm(None, half, weight.bfloat16(), 1e-5)
    assert normed.dtype == torch.bfloat16 and torch.equal(normed, rms_norm(half, weight.bfloat16(), 1e-5))


BUILD_RACE = """
import threading, time
import torch.utils.cpp_extension as cpp_extension
from subfit.runtime import cpu_kernels

real_load, calls = cpp_extension.load, []
def slow_load(*args, **kwargs):  # a build that takes a while, so the callers below overlap it
    calls.append(1)
    time.sleep(0.5)
    return real_load(*args, **kwargs)
cpp_extension.load = slow_load
cpu_kernels.build_in_background()
cpu_kernels.build_in_background()
module = cpu_kernels.decode_kernels()
for thread in threading.enumerate():
    if thread.name == "subfit-cpu-kernels-build":
        thread.join()
print(len(calls), module is not None and module is cpu_kernels.decode_kernels())
"""


def test_a_background_build_is_shared_by_every_caller():
    """Commands start the build before loading a model; whoever needs the kernels meanwhile waits
    for that build instead of starting another."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", BUILD_RACE], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1", "True"]
