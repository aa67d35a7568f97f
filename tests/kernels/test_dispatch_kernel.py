"""Backend choice: Triton on CUDA or under the interpreter, the PyTorch reference otherwise."""
import pytest
import torch

import subfit_kernels
from subfit_kernels import _common


def test_exports():
    ops = ["add_rms_norm", "apply_rope", "decode_attention", "fused_bypass", "swiglu"]
    assert sorted(subfit_kernels.__all__) == sorted(ops + [f"{op}_reference" for op in ops])


def test_use_triton(monkeypatch):
    cpu = torch.empty(1)
    monkeypatch.setattr(_common, "INTERPRET", True)
    assert _common.use_triton(cpu) and _common.use_triton(cpu, "triton")
    assert not _common.use_triton(cpu, "reference")
    monkeypatch.setattr(_common, "INTERPRET", False)
    assert not _common.use_triton(cpu)
    with pytest.raises(ValueError, match="backend='triton' cannot run on cpu tensors.*TRITON_INTERPRET=1"):
        _common.use_triton(cpu, "triton")
    with pytest.raises(ValueError, match="backend must be 'triton', 'reference' or None"):
        _common.use_triton(cpu, "cuda")


@pytest.mark.parametrize("triton_version, numpy_version, refused", [
    ("3.6.0", "2.4.0", True), ("3.6.0", "2.4.0rc1", True), ("3.5.1", "2.5.2", True),
    ("3.6.0", "2.3.5", False), ("3.7.0", "2.4.0", False), ("3.9.0+git1a2b", "2.4.6", False),
])
def test_interpreter_refuses_triton_and_numpy_that_cannot_run_together(triton_version, numpy_version, refused):
    problem = _common.interpreter_problem(triton_version, numpy_version)
    if refused:
        assert f"Triton {triton_version}'s interpreter" in problem and "numpy<2.4" in problem
    else:
        assert problem is None


def test_cpu_without_interpreter_runs_the_references(monkeypatch):
    """Every public op falls back to its reference; a kernel launch would fail the test."""
    class NoKernels:
        def __getattr__(self, name):
            pytest.fail(f"custom op subfit::{name} was called")

    monkeypatch.setattr(_common, "INTERPRET", False)
    monkeypatch.setattr(torch.ops, "subfit", NoKernels())

    x, r, w = torch.randn(3, 64), torch.randn(3, 64), torch.randn(64)
    r_before = r.clone()
    y, h = subfit_kernels.add_rms_norm(x, r, w, 1e-6, in_place=True)
    assert h is r and torch.equal(y, subfit_kernels.add_rms_norm_reference(x, r_before, w, 1e-6)[0])
    assert torch.equal(subfit_kernels.swiglu(x, r), subfit_kernels.swiglu_reference(x, r))
    down, up = torch.randn(64, 8), torch.randn(8, 64)
    out = subfit_kernels.fused_bypass(None, r, w, 1e-6, down, up, None)
    assert torch.equal(out, subfit_kernels.fused_bypass_reference(None, r, w, 1e-6, down, up, None))
    q, k = torch.randn(1, 2, 4, 16), torch.randn(1, 2, 2, 16)
    cos, sin, pos = torch.rand(8, 8), torch.rand(8, 8), torch.tensor([[3, 5]])
    q_rot, k_rot = subfit_kernels.apply_rope(q, k, cos, sin, pos)
    assert torch.equal(q_rot, subfit_kernels.apply_rope_reference(q, k, cos, sin, pos)[0])
    q, cache, lens = torch.randn(2, 4, 16), torch.randn(2, 2, 8, 16), torch.tensor([8, 3], dtype=torch.int32)
    out = subfit_kernels.decode_attention(q, cache, cache, lens)
    assert torch.equal(out, subfit_kernels.decode_attention_reference(q, cache, cache, lens))
