"""The CUDA decode path: the Triton kernels replayed from a CUDA graph give what the same kernels give
launched eagerly, and what Hugging Face gives (its modules, run by the plan's reference executor):
logits and greedy tokens, in float32 and bfloat16, on the real stories260K (dense and at ~25%)
and on a random Llama at ~25%. Skipped without a CUDA GPU (bench/gpu.sh runs it on one)."""
import dataclasses

import pytest
import torch

from subfit.models import load
from subfit.reference import ReferenceModel
from subfit.runtime import Runtime

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA decode path needs a CUDA GPU")

PROMPT, NEW = 8, 24
CASES = [("stories260K", "empty"), ("stories260K", "p25"), ("llama", "p25")]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def token_ids(batch: int, length: int, seed: int) -> torch.Tensor:
    ids = torch.randint(3, 512, (batch, length), generator=torch.Generator().manual_seed(seed))
    ids[:, 0] = 1  # BOS
    return ids


def forced_logits(runtime: Runtime, ids: torch.Tensor) -> torch.Tensor:
    """Logits after the prompt and after each later token of `ids`, fed one decode step at a time."""
    steps = [runtime.prefill(ids[:, :PROMPT])]
    steps += [runtime.decode_step(ids[:, t]) for t in range(PROMPT, ids.shape[1])]
    return torch.stack(steps, 1).cpu()


def reference(model, plan) -> ReferenceModel:
    """The plan's reference executor on the device of `model` (the runtime moves its own copies of
    the bypass weights; the reference uses the plan's)."""
    device = next(model.parameters()).device
    return ReferenceModel(model, dataclasses.replace(plan, tensors={k: v.to(device) for k, v in plan.tensors.items()}))


def reference_logits(model, plan, ids: torch.Tensor) -> torch.Tensor:
    """The positions `forced_logits` returns, from one full forward of the reference executor."""
    return reference(model, plan)(ids.to(next(model.parameters()).device))[:, PROMPT - 1:].float().cpu()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("model_name, shape", CASES, ids=[f"{m}-{s}" for m, s in CASES])
def test_cuda_graph_decode(model_name, shape, dtype, stories_dir, family_dir, plan_of):
    folder = stories_dir if model_name == "stories260K" else family_dir(model_name)
    model32, _, source = load(folder)  # the plan is made for the float32 checkpoint
    plan = plan_of(model32, source, shape)
    model = load(folder, dtype=dtype, device="cuda")[0]
    graphed = Runtime.from_hf(model, plan, max_seq_len=64)
    eager = Runtime.from_hf(model, plan, max_seq_len=64, cuda_graph=False)
    assert graphed.cuda_graph and not eager.cuda_graph

    ids = token_ids(2, PROMPT + NEW, seed=1)
    got, again = forced_logits(graphed, ids), forced_logits(eager, ids)
    assert got.isfinite().all()
    assert rel_err(got, again) <= (1e-5 if dtype == torch.float32 else 1e-2), "graph replay differs from eager"

    truth = reference_logits(model32.cuda(), plan, ids)  # Hugging Face modules, float32, on the GPU
    if dtype == torch.float32:
        assert rel_err(got, truth) <= 1e-4
    else:  # no farther from float32 than Hugging Face's own bfloat16 run, twice over
        hf_bf16 = reference_logits(model, plan, ids)
        assert rel_err(got, truth) <= 2 * rel_err(hf_bf16, truth) + 1e-3
        agree = (got.argmax(-1) == truth.argmax(-1)).float().mean()
        assert agree >= (hf_bf16.argmax(-1) == truth.argmax(-1)).float().mean() - 0.1

    prompts = [token_ids(1, n, seed)[0].tolist() for n, seed in ((PROMPT, 2), (3, 3))]  # ragged batch
    tokens = graphed.generate(prompts, NEW, eos=[]).ids
    assert tokens == eager.generate(prompts, NEW, eos=[]).ids
    assert tokens == [graphed.generate(p, NEW, eos=[]).ids for p in prompts]
    if dtype == torch.float32:
        executor = reference(model32, plan)
        for prompt, new in zip(prompts, tokens):
            assert new == executor.greedy(torch.tensor([prompt], device="cuda"), NEW)[0].tolist()
        if shape == "empty":  # and through Hugging Face's own generate (which stops at EOS)
            hf = model32.generate(torch.tensor([prompts[0]], device="cuda"), max_new_tokens=NEW, do_sample=False)
            hf_new = hf[0, PROMPT:].tolist()
            assert hf_new and hf_new == tokens[0][: len(hf_new)]
