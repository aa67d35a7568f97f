"""The compact cache holds retained attention only, and its byte count is exactly the plan's."""
import pytest
import torch

from subfit.models import load
from subfit.runtime import Runtime
from subfit.runtime.kv_cache import slot_map


def test_slot_map_skips_removed_attention():
    assert slot_map(["keep", "bypass", "keep", "delete", "keep"]) == [0, None, 1, None, 2]
    assert slot_map(["delete", "bypass"]) == [None, None]


@pytest.mark.parametrize("shape", ["empty", "p25", "p375"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kv_bytes_exact(shape, dtype, stories_dir, plan_of):
    model, _, source = load(stories_dir, dtype=dtype)
    plan = plan_of(model, source, shape)
    acc = plan.accounting()
    runtime = Runtime.from_hf(model, plan, max_seq_len=100, batch_size=3)
    per_token = acc["kv_elements_per_token"] * dtype.itemsize
    assert runtime.kv_cache_bytes() == per_token * 3 * 100
    dense = acc["dense_kv_elements_per_token"] * dtype.itemsize * 3 * 100
    assert runtime.kv_cache_bytes() / dense == pytest.approx(1 - acc["kv_reduction"])
    cache = runtime.model.cache
    assert cache.k.shape == (acc["kv_slots"], 3, 4, 100, 8)
    assert [cache.layer(i) is None for i in range(5)] == [a != "keep" for a in plan.attn]


def test_cache_is_static_across_steps(stories, plan_of):
    """No reallocation while generating: the buffers the attention layers write are the same objects."""
    model, _, source = stories
    runtime = Runtime.from_hf(model, plan_of(model, source, "p25"), max_seq_len=64)
    k = runtime.model.cache.k
    pointer = k.data_ptr()
    runtime.generate([1, 5, 6], 10, eos=[])
    assert runtime.model.cache.k is k and k.data_ptr() == pointer
    assert k.abs().sum() > 0  # it was written
