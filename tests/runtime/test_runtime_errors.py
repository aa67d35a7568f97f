"""Bad plans, over-long prompts and bad arguments are refused up front, with messages that say why."""
import pytest
import torch

from subfit.models import Decoder
from subfit.plan import Plan, PlanError
from subfit.runtime import CacheOverflowError, Runtime
from subfit.runtime.model import check_supported


def test_plan_for_another_model(stories, family, plan_of):
    model, _, source = stories
    other, _, _ = family("llama")
    with pytest.raises(PlanError, match="fingerprint"):
        Runtime.from_hf(other, plan_of(model, source, "p25"))


def test_plan_for_same_shapes_other_weights(stories, plan_of):
    model, _, source = stories
    plan = plan_of(model, source, "empty")
    plan.base["weight_signature"] = [x + 1 for x in plan.base["weight_signature"]]
    with pytest.raises(PlanError, match="different weights"):
        Runtime.from_hf(model, plan)


def test_plan_missing_a_tensor(stories, plan_of):
    model, _, source = stories
    plan = plan_of(model, source, "p25")
    del plan.tensors["attn.1.up"]
    with pytest.raises(PlanError, match="attn.1.up"):
        Runtime.from_hf(model, plan)


def test_plan_with_unknown_action(stories):
    model, _, source = stories
    plan = Plan.empty(Decoder(model), source)
    plan.ffn[0] = "prune"
    with pytest.raises(PlanError, match="prune"):
        Runtime.from_hf(model, plan)


def test_not_a_plan_directory(tmp_path):
    from subfit.runtime import load

    with pytest.raises(FileNotFoundError, match="neither a plan directory"):
        load(tmp_path)


def test_prompt_plus_generation_longer_than_cache(stories):
    model, tokenizer, _ = stories
    runtime = Runtime.from_hf(model, None, tokenizer, max_seq_len=32)
    with pytest.raises(CacheOverflowError, match=r"prompt \(30 tokens\) plus max_new_tokens \(5\).*holds 32"):
        runtime.stream(list(range(1, 31)), 5)  # refused when called, before any work
    assert runtime._lengths == []
    with pytest.raises(CacheOverflowError):
        runtime.generate([[1, 2], list(range(1, 31))], 3)
    with pytest.raises(CacheOverflowError):
        runtime.prefill(torch.ones(1, 33, dtype=torch.long))
    assert len(runtime.generate(list(range(1, 30)), 3, eos=[]).ids) == 3  # exactly full is fine


def test_decode_past_the_cache(stories):
    model, _, _ = stories
    runtime = Runtime.from_hf(model, None, max_seq_len=8)
    token = runtime.prefill([[1, 2, 3, 4, 5, 6, 7]]).argmax(-1)
    token = runtime.decode_step(token).argmax(-1)  # position 7: the last slot
    with pytest.raises(CacheOverflowError, match="full"):
        runtime.decode_step(token)


def test_bad_prompts_and_arguments(stories):
    model, tokenizer, _ = stories
    runtime = Runtime.from_hf(model, None, tokenizer, max_seq_len=32)
    with pytest.raises(ValueError, match="at least one token"):
        runtime.generate([[1, 2], []], 3)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        runtime.generate([1, 600], 3)
    with pytest.raises(ValueError, match="max_new_tokens"):
        runtime.generate([1], 0)
    with pytest.raises(RuntimeError, match="prefill"):
        Runtime.from_hf(model, None).decode_step([1])
    with pytest.raises(ValueError, match="tokenizer"):
        Runtime.from_hf(model, None).generate("Once", 3)
    with pytest.raises(TypeError, match="num_beams"):
        runtime.as_hf().generate(torch.ones(1, 3, dtype=torch.long), num_beams=4)
    with pytest.raises(ValueError, match="cuda_graph"):
        Runtime.from_hf(model, None, cuda_graph=True)


def test_sliding_window_beyond_cache_refused(family):
    model, _, _ = family("mistral")
    config = model.config
    config.sliding_window = 16
    try:
        with pytest.raises(ValueError, match="sliding-window"):
            check_supported(config, 64)
        check_supported(config, 16)
    finally:
        config.sliding_window = None
