import importlib

import pytest
import torch

from subfit_kernels import add_rms_norm_reference, fused_bypass, fused_bypass_reference

bypass_module = importlib.import_module("subfit_kernels.bypass")  # the package attribute is the function

# (leading shape, hidden, rank): 1-64 rows take the split-hidden decode path, 130 the prefill path
SHAPES = [((1,), 64, 8), ((3,), 67, 16), ((17,), 576, 64), ((2, 5), 96, 40), ((130,), 67, 24), ((1,), 576, 256)]
# decode shapes cut into many slices on an H100-sized GPU; the Llama-3.2-1B FeedForward bypass shape
# takes ~15 s in the interpreter, so it runs on CUDA only
MANY_SPLITS = [((1,), 576, 256), ((5,), 1000, 320)] + ([((2,), 2048, 1024)] if torch.cuda.is_available() else [])
EPS = 1e-5


def make(lead, hidden, rank, dtype, device, residual_dtype=None, with_x=True, with_bias=True):
    residual = torch.randn(*lead, hidden, dtype=residual_dtype or dtype, device=device)
    x = torch.randn(*lead, hidden, dtype=dtype, device=device) if with_x else None
    norm_weight = (1 + 0.1 * torch.randn(hidden, device=device)).to(dtype)
    down = (torch.randn(hidden, rank, device=device) / hidden**0.5).to(dtype)
    up = (torch.randn(rank, hidden, device=device) / rank**0.5).to(dtype)
    bias = (0.1 * torch.randn(hidden, device=device)).to(dtype) if with_bias else None
    return x, residual, norm_weight, down, up, bias


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("variant", ["x+residual", "residual_only", "fp32_stream", "no_bias"])
def test_matches_reference(shape, variant, dtype, device, poison, references, assert_close):
    lead, hidden, rank = shape
    residual_dtype = torch.float32 if variant == "fp32_stream" else None
    args = make(lead, hidden, rank, dtype, device, residual_dtype, variant != "residual_only", variant != "no_bias")
    ref32, ref_lowp = references(fused_bypass_reference, *args[:3], EPS, *args[3:])
    residual = args[1]
    out = poison(residual.shape, residual.dtype, device)
    assert fused_bypass(*args[:3], EPS, *args[3:], out=out, backend="triton") is out
    assert_close(out, ref32, ref_lowp)


def test_in_place_residual_update(device):
    """out=residual updates the residual stream in place."""
    x, residual, norm_weight, down, up, bias = make((5,), 67, 16, torch.float32, device)
    expected = fused_bypass_reference(x, residual, norm_weight, EPS, down, up, bias)
    assert fused_bypass(x, residual, norm_weight, EPS, down, up, bias, out=residual, backend="triton") is residual
    torch.testing.assert_close(residual, expected, rtol=1e-5, atol=1e-5)


def test_decode_and_prefill_paths_agree(device):
    """The first rows of a prefill-sized call equal the same rows run alone on the decode path."""
    x, residual, norm_weight, down, up, bias = make((130,), 200, 160, torch.float32, device)
    decode = bypass_module._config(3, 200, 160, torch.device(device))
    assert decode.down.splits > 1 and decode.up.splits > 1
    prefill = bypass_module._config(130, 200, 160, torch.device(device))
    assert prefill.down.splits == prefill.up.splits == 1
    whole = fused_bypass(x, residual, norm_weight, EPS, down, up, bias, backend="triton")
    rows = fused_bypass(x[:3], residual[:3], norm_weight, EPS, down, up, bias, backend="triton")
    torch.testing.assert_close(rows, whole[:3], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", MANY_SPLITS, ids=str)
def test_many_splits_at_decode(shape, dtype, device, poison, references, assert_close, monkeypatch):
    """An H100-sized SM count cuts both products into many slices: the ticketed reduction of their
    partials gives the reference, and leaves every ticket at zero for the next launch."""
    monkeypatch.setattr(bypass_module, "num_sms", lambda device: 132)
    lead, hidden, rank = shape
    cfg = bypass_module._config(lead[0], hidden, rank, torch.device(device))
    assert cfg.down.splits >= 4 and cfg.up.splits >= 4
    args = make(lead, hidden, rank, dtype, device)
    ref32, ref_lowp = references(fused_bypass_reference, *args[:3], EPS, *args[3:])
    for _ in range(2):  # a second launch finds the tickets reset
        out = poison(args[1].shape, dtype, device)
        fused_bypass(*args[:3], EPS, *args[3:], out=out, backend="triton")
        assert_close(out, ref32, ref_lowp)
    assert not bypass_module._tickets[args[3].device].any(), "a ticket counter was left non-zero"


def test_float16_operand_cannot_overflow(device):
    """h * norm_weight beyond float16's range (massive activations) is scaled before rounding."""
    x, residual, norm_weight, down, up, bias = make((3,), 96, 16, torch.float16, device)
    residual[:, 5] = 3000.0
    norm_weight[5] = 40.0  # 120000 > 65504, the float16 maximum
    out = fused_bypass(x, residual, norm_weight, EPS, down, up, bias, backend="triton")
    ref = fused_bypass_reference(x.float(), residual.float(), norm_weight.float(), EPS, down.float(), up.float(),
                                 bias.float())
    assert out.isfinite().all()
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)


def test_reference_composes_the_unfused_ops():
    """Reference = RMSNorm of the sum (HF casting), then the two matmuls, bias and residual add."""
    x, residual, norm_weight, down, up, bias = make((4,), 96, 16, torch.float16, "cpu")
    n, h = add_rms_norm_reference(x, residual, norm_weight, EPS)
    unfused = h + (n @ down) @ up + bias  # PyTorch fp16 ops, one rounding per op
    ref = fused_bypass_reference(x, residual, norm_weight, EPS, down, up, bias)
    torch.testing.assert_close(ref, unfused, rtol=4e-3, atol=4e-3)


def test_strided_weights_and_activations(device):
    """Row-strided weight views are read in place; a transposed activation is copied."""
    x, residual, norm_weight, down, up, bias = make((3,), 67, 16, torch.float32, device)
    down_view = torch.cat([down, torch.randn_like(down)], dim=1)[:, :16]  # row stride 32
    up_view = torch.cat([up, torch.randn_like(up)], dim=1)[:, :67]
    residual_t = residual.t().contiguous().t()
    out = fused_bypass(x, residual_t, norm_weight, EPS, down_view, up_view, bias, backend="triton")
    ref = fused_bypass_reference(x, residual, norm_weight, EPS, down, up, bias)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "case, error, match",
    [
        ("down_shape", ValueError, r"down has shape \(66, 8\); expected \[67, \*\]"),
        ("up_shape", ValueError, r"up has shape \(8, 66\); expected \[8, 67\]"),
        ("bias_shape", ValueError, r"bias has shape \(66,\); expected \[67\]"),
        ("x_shape", ValueError, r"x has shape \(2, 67\); expected \[3, 67\]"),
        ("x_dtype", TypeError, r"x has dtype torch.float32; expected float16"),
        ("up_dtype", TypeError, r"up has dtype torch.float32; expected float16 \(down's dtype\)"),
        ("residual_dtype", TypeError, r"residual has dtype torch.bfloat16; expected float16, float32"),
        ("down_strided", ValueError, r"down must have stride 1 in its last dim"),
        ("device", ValueError, r"one device.*up on meta"),
        ("out_dtype", ValueError, r"out has shape \(3, 67\), dtype torch.float16 .* expected shape \(3, 67\), dtype torch.float32"),
    ],
)
def test_launcher_errors(case, error, match):
    x, residual, norm_weight, down, up, bias = make((3,), 67, 8, torch.float16, "cpu")
    kwargs = {"backend": "triton"}
    if case == "down_shape":
        down = down[:66]
    elif case == "up_shape":
        up = up[:, :66]
    elif case == "bias_shape":
        bias = bias[:66]
    elif case == "x_shape":
        x = x[:2]
    elif case == "x_dtype":
        x = x.float()
    elif case == "up_dtype":
        up = up.float()
    elif case == "residual_dtype":
        residual = residual.bfloat16()
    elif case == "down_strided":
        down = torch.randn(8, 67, dtype=torch.float16).t()
    elif case == "device":
        up = up.to("meta")
    elif case == "out_dtype":
        residual, kwargs["out"] = residual.float(), torch.empty(3, 67, dtype=torch.float16)
    with pytest.raises(error, match=match):
        fused_bypass(x, residual, norm_weight, EPS, down, up, bias, **kwargs)


@pytest.mark.parametrize("rows", [3, 70])
def test_opcheck(rows, device):
    x, residual, norm_weight, down, up, bias = make((rows,), 67, 16, torch.float32, device)
    op = torch.ops.subfit.fused_bypass.default
    torch.library.opcheck(op, (x, residual, norm_weight, EPS, down, up, bias, torch.empty_like(residual)))
    torch.library.opcheck(op, (None, residual, norm_weight, EPS, down, up, None, torch.empty_like(residual)))


def test_compiles_fullgraph(device):
    x, residual, norm_weight, down, up, bias = make((3,), 67, 16, torch.float32, device)
    fn = torch.compile(lambda x, r: fused_bypass(x, r, norm_weight, EPS, down, up, bias), backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(fn(x, residual), fused_bypass_reference(x, residual, norm_weight, EPS, down, up, bias))
