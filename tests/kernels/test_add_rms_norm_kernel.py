import importlib

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from subfit_kernels import add_rms_norm, add_rms_norm_reference

SHAPES = [(1, 64), (3, 67), (17, 576), (2, 5, 96)]
EPS = 1e-5


def make(shape, dtype, device, residual_dtype=None):
    x = torch.randn(shape, dtype=dtype, device=device)
    residual = torch.randn(shape, dtype=residual_dtype or dtype, device=device)
    weight = (1 + 0.1 * torch.randn(shape[-1], device=device)).to(dtype)
    return x, residual, weight


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("variant", ["add", "no_residual", "fp32_residual", "in_place", "in_place_fp32"])
def test_matches_reference(shape, variant, dtype, device, poison, references, assert_close):
    fp32_stream = variant in ("fp32_residual", "in_place_fp32")
    x, residual, weight = make(shape, dtype, device, torch.float32 if fp32_stream else None)
    residual = None if variant == "no_residual" else residual
    in_place = variant.startswith("in_place")
    opts = dict(residual_in_fp32=fp32_stream)
    (y32, h32), (y_lowp, h_lowp) = references(add_rms_norm_reference, x, residual, weight, EPS, **opts)
    residual_before = None if residual is None else residual.clone()

    out = poison(shape, dtype, device)
    y, h = add_rms_norm(x, residual, weight, EPS, in_place=in_place, out=out, backend="triton", **opts)

    assert y is out
    assert h.dtype == (torch.float32 if fp32_stream else dtype)
    if in_place:
        assert h is residual
    else:
        assert residual is None or torch.equal(residual, residual_before), "residual changed without in_place"
    if variant == "no_residual":
        assert h is x
    assert_close(y, y32, y_lowp)
    assert_close(h, h32, h_lowp)


def test_residual_in_fp32_without_residual(device):
    x, _, weight = make((3, 67), torch.float16, device)
    y, h = add_rms_norm(x, None, weight, EPS, residual_in_fp32=True, backend="triton")
    assert h.dtype == torch.float32 and torch.equal(h, x.float())
    torch.testing.assert_close(y, add_rms_norm_reference(x, None, weight, EPS)[0], rtol=1e-3, atol=1e-3)


def test_strided_inputs_are_handled(device):
    """Transposed (non-contiguous) x and residual give the same result as their contiguous copies."""
    x, residual = torch.randn(2, 67, 5, device=device).transpose(1, 2), torch.randn(67, 2, 5, device=device).permute(1, 2, 0)
    weight = torch.randn(67, device=device)
    y, h = add_rms_norm(x, residual, weight, EPS, backend="triton")
    y_ref, h_ref = add_rms_norm_reference(x.contiguous(), residual.contiguous(), weight, EPS)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h, h_ref, rtol=0, atol=0)


@pytest.mark.parametrize("dtype_", [torch.float32, torch.float16], ids=["float32", "float16"])
def test_reference_is_llama_rmsnorm(dtype_):
    """The reference equals Hugging Face's LlamaRMSNorm(x + residual) bit for bit."""
    x, residual, weight = make((4, 96), dtype_, "cpu")
    norm = LlamaRMSNorm(96, eps=EPS).to(dtype_)
    norm.weight.data.copy_(weight)
    y, h = add_rms_norm_reference(x, residual, weight, EPS)
    assert torch.equal(h, x + residual)
    assert torch.equal(y, norm(x + residual))


def test_reference_backend_is_pure_torch(monkeypatch):
    """backend="reference" never launches a kernel."""
    mod = importlib.import_module("subfit_kernels.add_rms_norm")  # the package attribute is the function
    monkeypatch.setattr(mod, "add_rms_norm_rows", lambda *a: pytest.fail("kernel launched"))
    x, residual, weight = make((3, 67), torch.float32, "cpu")
    y, h = add_rms_norm(x, residual, weight, EPS, backend="reference")
    torch.testing.assert_close(y, add_rms_norm_reference(x, residual, weight, EPS)[0])


@pytest.mark.parametrize(
    "case, error, match",
    [
        ("weight_shape", ValueError, r"weight has shape \(66,\); expected \[67\]"),
        ("residual_shape", ValueError, r"residual has shape \(3, 66\); expected \[3, 67\]"),
        ("residual_dtype", TypeError, r"residual has dtype torch.bfloat16; expected float16, float32"),
        ("int_x", TypeError, r"x has dtype torch.int64"),
        ("device", ValueError, r"one device.*weight on meta"),
        ("in_place_none", ValueError, r"in_place=True .* residual is None"),
        ("in_place_dtype", TypeError, r"residual has dtype torch.float32 but must be torch.float16"),
        ("in_place_strided", ValueError, r"residual is written in place and must be contiguous"),
        ("out_shape", ValueError, r"out has shape \(3, 66\)"),
        ("weight_strided", ValueError, r"weight must have stride 1"),
        ("backend", ValueError, r"backend must be 'triton', 'reference' or None"),
    ],
)
def test_launcher_errors(case, error, match):
    x, residual, weight = make((3, 67), torch.float16, "cpu")
    args, kwargs = [x, residual, weight, EPS], {"backend": "triton"}
    if case == "weight_shape":
        args[2] = weight[:66]
    elif case == "residual_shape":
        args[1] = residual[:, :66]
    elif case == "residual_dtype":
        args[1] = residual.bfloat16()
    elif case == "int_x":
        args[0] = torch.ones(3, 67, dtype=torch.long)
    elif case == "device":
        args[2] = weight.to("meta")
    elif case == "in_place_none":
        args[1], kwargs["in_place"] = None, True
    elif case == "in_place_dtype":
        args[1], kwargs["in_place"] = residual.float(), True
    elif case == "in_place_strided":
        args[1], kwargs["in_place"] = torch.randn(67, 3, dtype=torch.float16).t(), True
    elif case == "out_shape":
        kwargs["out"] = torch.empty(3, 66, dtype=torch.float16)
    elif case == "weight_strided":
        args[2] = torch.randn(134, dtype=torch.float16)[::2]
    elif case == "backend":
        kwargs["backend"] = "cuda"
    with pytest.raises(error, match=match):
        add_rms_norm(*args, **kwargs)


def test_opcheck(device):
    x, residual, weight = make((3, 67), torch.float32, device)
    y, h = torch.empty_like(x), torch.empty_like(x)
    torch.library.opcheck(torch.ops.subfit.add_rms_norm.default, (x, residual, weight, EPS, y, h))
    torch.library.opcheck(torch.ops.subfit.add_rms_norm.default, (x, None, weight, EPS, y, None))
    torch.library.opcheck(torch.ops.subfit.add_rms_norm_inplace.default, (x, residual, weight, EPS, y))


def test_compiles_fullgraph(device):
    x, residual, weight = make((3, 67), torch.float32, device)
    fn = torch.compile(lambda x, r, w: add_rms_norm(x, r, w, EPS), backend="aot_eager", fullgraph=True)
    y, h = fn(x, residual, weight)
    y_ref, h_ref = add_rms_norm_reference(x, residual, weight, EPS)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(h, h_ref)
