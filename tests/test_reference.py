"""The reference executor: with nothing removed it is the Hugging Face model, for every family."""
import pytest
import torch

from subfit import models
from subfit.plan import Bypass, Plan
from subfit.reference import ReferenceModel


def _rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_empty_plan_reproduces_hf_logits(family, family_model_dir):
    model, _, source = models.load(family_model_dir(family))
    plan = Plan.empty(models.Decoder(model), source)
    ids = torch.randint(0, 512, (2, 37), generator=torch.Generator().manual_seed(1))
    assert _rel(ReferenceModel(model, plan)(ids), model(ids).logits) <= 1e-5


def test_empty_plan_reproduces_stories260k(stories):
    model, tokenizer, source = stories
    ids = tokenizer(["Once upon a time, there was a little dog"], return_tensors="pt").input_ids
    assert _rel(ReferenceModel(model, Plan.empty(models.Decoder(model), source))(ids), model(ids).logits) <= 1e-5


def test_bypass_and_delete_change_exactly_what_they_should(stories):
    """A zero bypass equals deletion; deleting a unit equals zeroing its output projection."""
    model, _, source = stories
    dec = models.Decoder(model)
    d = dec.hidden_size
    ids = torch.randint(0, 512, (1, 20), generator=torch.Generator().manual_seed(0))
    deleted = Plan.empty(dec, source)
    deleted.ffn[3] = "delete"
    zero = Plan.empty(dec, source)
    zero.ffn[3] = "bypass"
    zero.tensors = {"ffn.basis": torch.zeros(d, 8), "ffn.3.up": torch.zeros(8, d), "ffn.3.bias": torch.zeros(d)}
    out_deleted = ReferenceModel(model, deleted)(ids)
    assert torch.allclose(out_deleted, ReferenceModel(model, zero)(ids), atol=1e-6)
    saved = dec.layers[3].mlp.down_proj.weight.data.clone()
    try:
        dec.layers[3].mlp.down_proj.weight.data.zero_()
        assert torch.allclose(out_deleted, model(ids).logits, atol=1e-5)
    finally:
        dec.layers[3].mlp.down_proj.weight.data.copy_(saved)
    assert isinstance(zero.bypass("ffn", 3), Bypass)
