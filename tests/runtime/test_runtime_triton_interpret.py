"""The Triton path (KernelOps) under TRITON_INTERPRET=1 on CPU, on the tiny real model, against the
reference. The interpreter is slow and is chosen when triton is imported, so this runs in a fresh
process with few tokens."""
import os
import subprocess
import sys
import textwrap

import pytest

KERNELS = ("add_rms_norm", "fused_bypass", "apply_rope", "decode_attention", "swiglu")


def kernels_missing() -> list[str]:
    try:
        import subfit_kernels
    except ImportError:
        return list(KERNELS)
    return [name for name in KERNELS if not hasattr(subfit_kernels, name)]


@pytest.mark.skipif(bool(kernels_missing()), reason=f"subfit_kernels does not provide {kernels_missing()} yet")
def test_kernel_path_matches_reference(stories, plan_of, tmp_path):
    model, _, source = stories
    plan_of(model, source, "p25").save(tmp_path / "plan")
    code = textwrap.dedent(f"""
        import torch
        from subfit import models
        from subfit.plan import Plan
        from subfit.reference import ReferenceModel
        from subfit.runtime import Runtime
        from subfit.runtime.ops import KernelOps

        torch.set_num_threads(1)
        plan = Plan.load({str(tmp_path / 'plan')!r})
        model, _, _ = models.load({source.path!r})
        runtime = Runtime.from_hf(model, plan, max_seq_len=24, use_kernels=True)  # Triton, interpreted
        assert isinstance(runtime.model.ops, KernelOps)
        reference = ReferenceModel(model, plan)
        prompts = [[1, 403, 407, 261, 378], [1, 70]]
        for p in prompts:
            ids = torch.tensor([p])
            assert runtime.generate(p, 6, eos=[]).ids == reference.greedy(ids, 6)[0].tolist(), p
        assert runtime.generate(prompts, 6, eos=[]).ids == [runtime.generate(p, 6, eos=[]).ids for p in prompts]
        ids = torch.tensor([prompts[0]])
        logits = runtime.prefill(ids)
        assert torch.allclose(logits, reference(ids)[:, -1], atol=1e-4, rtol=1e-4)
        logits = runtime.decode_step([378])
        assert torch.allclose(logits, reference(torch.tensor([prompts[0] + [378]]))[:, -1], atol=1e-4, rtol=1e-4)
    """)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
