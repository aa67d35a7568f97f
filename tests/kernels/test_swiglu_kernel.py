import pytest
import torch
import torch.nn.functional as F

from subfit_kernels import swiglu, swiglu_reference

SHAPES = [(1, 96), (3, 67), (17, 1536), (2, 5, 130)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(shape, dtype, device, poison, references, assert_close):
    gate = 3 * torch.randn(shape, dtype=dtype, device=device)
    up = torch.randn(shape, dtype=dtype, device=device)
    ref32, ref_lowp = references(swiglu_reference, gate, up)
    out = poison(shape, dtype, device)
    assert swiglu(gate, up, out=out, backend="triton") is out
    assert_close(out, ref32, ref_lowp)


def test_fused_gate_up_views_are_read_in_place(device):
    """gate and up as the halves of one fused projection: row-strided views, no copy needed."""
    gate_up = torch.randn(2, 3, 2 * 67, device=device)
    gate, up = gate_up.chunk(2, dim=-1)
    out = swiglu(gate, up, backend="triton")
    assert out.is_contiguous() and out.shape == (2, 3, 67)
    torch.testing.assert_close(out, swiglu_reference(gate, up), rtol=1e-5, atol=1e-6)
    transposed = swiglu(gate.transpose(0, 1), up.transpose(0, 1), backend="triton")  # needs a copy
    torch.testing.assert_close(transposed, swiglu_reference(gate, up).transpose(0, 1), rtol=1e-5, atol=1e-6)


def test_reference_is_hf_act_times_up():
    gate, up = torch.randn(4, 96, dtype=torch.float16), torch.randn(4, 96, dtype=torch.float16)
    assert torch.equal(swiglu_reference(gate, up), F.silu(gate) * up)


@pytest.mark.parametrize(
    "case, error, match",
    [
        ("shape", ValueError, r"up has shape \(3, 66\); expected \[3, 67\]"),
        ("dtype", TypeError, r"up has dtype torch.float32; expected float16 \(the dtype of gate\)"),
        ("device", ValueError, r"one device.*up on meta"),
        ("scalar", ValueError, r"at least one dim"),
        ("out_dtype", ValueError, r"out has shape \(3, 67\), dtype torch.float32"),
        ("out_strided", ValueError, r"out is written in place and must be contiguous"),
    ],
)
def test_launcher_errors(case, error, match):
    gate, up = torch.randn(3, 67, dtype=torch.float16), torch.randn(3, 67, dtype=torch.float16)
    kwargs = {"backend": "triton"}
    if case == "shape":
        up = up[:, :66]
    elif case == "dtype":
        up = up.float()
    elif case == "device":
        up = up.to("meta")
    elif case == "scalar":
        gate, up = gate[0, 0], up[0, 0]
    elif case == "out_dtype":
        kwargs["out"] = torch.empty(3, 67)
    elif case == "out_strided":
        kwargs["out"] = torch.empty(67, 3, dtype=torch.float16).t()
    with pytest.raises(error, match=match):
        swiglu(gate, up, **kwargs)


def test_opcheck(device):
    gate, up = torch.randn(3, 67, device=device), torch.randn(3, 67, device=device)
    torch.library.opcheck(torch.ops.subfit.swiglu.default, (gate, up, torch.empty_like(gate)))


def test_compiles_fullgraph(device):
    gate, up = torch.randn(3, 67, device=device), torch.randn(3, 67, device=device)
    out = torch.compile(swiglu, backend="aot_eager", fullgraph=True)(gate, up)
    torch.testing.assert_close(out, swiglu_reference(gate, up))
