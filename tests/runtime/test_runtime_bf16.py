"""CPU bf16 decode: the default where the CPU has bf16 units and refused where it has none; weights
stored once in bf16 with the residual stream and norms in float32; greedy tokens that follow the
float32 runtime, differing only at near ties."""
import pytest
import torch

from subfit import hardware, models
from subfit.runtime import Runtime, load
from subfit.runtime.bench import greedy_agreement
from subfit.hardware import cpu_bf16_units
from subfit.runtime.model import Dense

# The committed prompts ("" = BOS alone) and the greedy length they are checked over.
PROMPTS = ["Once upon a time", "Lily and Ben", "The cat sat on the", "One day, a little boy named Tim", ""]
NEW = 32
NEAR_TIE = 0.1  # float32 logit margin under which bf16 rounding may pick the other token

needs_bf16 = pytest.mark.skipif(not cpu_bf16_units(), reason="this CPU has no bf16 units (AMX-BF16 / AVX512-BF16)")


@needs_bf16
@pytest.mark.parametrize("shape", ["empty", "p25", "p375"])
def test_greedy_tokens_follow_float32(stories, plan_of, shape):
    model, tokenizer, source = stories
    plan = plan_of(model, source, shape)
    reference = Runtime.from_hf(model, plan, tokenizer, dtype=torch.float32)
    bf16 = Runtime.from_hf(model, plan, tokenizer, dtype="bfloat16")
    equal = 0
    for prompt in PROMPTS:
        got = greedy_agreement(reference, bf16, tokenizer(prompt).input_ids, NEW)
        assert got["relative_error"] < 3e-2, (prompt, got)  # ~5e-3 dense, up to ~2e-2 with the random bypasses
        assert got["top1"] >= (NEW - 1) / NEW, (prompt, got)
        if got["same_prefix"] < NEW:  # a difference only where float32 itself nearly tied
            assert got["margin_at_difference"] < NEAR_TIE, (prompt, got)
        equal += got["same_prefix"] == NEW
    assert equal >= len(PROMPTS) - 1


@needs_bf16
def test_weights_once_in_bf16_stream_in_float32(stories, plan_of):
    model, tokenizer, source = stories
    bf16 = Runtime.from_hf(model, plan_of(model, source, "p25"), tokenizer, dtype=torch.bfloat16)
    fp32 = Runtime.from_hf(model, plan_of(model, source, "p25"), tokenizer, dtype=torch.float32)
    m = bf16.model
    assert bf16.dtype == torch.bfloat16 and m.stream_dtype == torch.float32
    assert all(d.weight.dtype == torch.bfloat16 for d in m.modules() if isinstance(d, Dense))
    assert m.lm_head.weight is m.embed_weight  # stories260K ties them: one bf16 copy serves both
    assert m.norm_weight.dtype == torch.float32 and m.cache.k.dtype == torch.bfloat16
    units = [unit for block in m.layers for unit in (block.attn, block.ffn) if unit is not None]
    assert all(unit.norm_weight.dtype == torch.float32 for unit in units)
    assert 0.45 < m.decode_weight_bytes() / fp32.model.decode_weight_bytes() < 0.6  # norms, bypasses stay float32
    assert model.model.embed_tokens.weight.dtype == torch.float32  # the Hugging Face model is left as it was
    step = m.step(torch.zeros(1, 3, dtype=torch.long) + torch.arange(3), torch.tensor([3], dtype=torch.int32),
                  prefill=True)
    assert m(torch.tensor([[1, 9, 33]]), step).dtype == torch.float32  # the stream leaves the last norm in float32


def test_default_dtype_follows_the_cpu(stories_dir, monkeypatch):
    expected = torch.bfloat16 if cpu_bf16_units() else torch.float32
    assert load(stories_dir, device="cpu").dtype == expected
    monkeypatch.setattr(hardware, "cpu_bf16_units", lambda: [])  # a CPU without bf16 units
    assert load(stories_dir, device="cpu").dtype == torch.float32
    with pytest.raises(ValueError, match="needs AVX512-BF16 or AMX-BF16.*--dtype float32"):
        load(stories_dir, device="cpu", dtype="bfloat16")
    hf_bf16, _, _ = models.load(stories_dir, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="needs AVX512-BF16 or AMX-BF16"):
        Runtime.from_hf(hf_bf16)  # a bf16 model handed over directly is refused too
