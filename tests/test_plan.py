"""Plans round-trip through plan.json + bypass.safetensors, and every malformed plan is refused
with a message that names the problem."""
import json

import pytest
import torch
from compress_settings import settings
from safetensors.torch import load_file, save_file

from subfit import models
from subfit.compression import compress
from subfit.plan import Plan, PlanError


@pytest.fixture(scope="module")
def small_plan(stories, tinystories_file):
    model, tokenizer, _ = stories
    return compress(model, 0.25, tinystories_file, tokenizer=tokenizer,
                    **settings(calib_samples=16, calib_len=128, selection_draws=1))


def test_plan_round_trips(small_plan, tmp_path):
    small_plan.save(tmp_path / "p")
    loaded = Plan.load(tmp_path / "p")
    assert loaded.attn == small_plan.attn and loaded.ffn == small_plan.ffn
    assert loaded.base == small_plan.base and loaded.method["sparsity"] == small_plan.method["sparsity"]
    assert set(loaded.tensors) == set(small_plan.tensors)
    for name, tensor in small_plan.tensors.items():
        assert torch.equal(loaded.tensors[name], tensor)
    assert loaded.accounting() == small_plan.accounting()
    assert json.loads((tmp_path / "p" / "plan.json").read_text())["format_version"] == 1


def _saved(plan, tmp_path):
    return plan.save(tmp_path / "plan")


def _edit_json(path, edit):
    meta = json.loads((path / "plan.json").read_text())
    edit(meta)
    (path / "plan.json").write_text(json.dumps(meta))


def _edit_tensors(path, edit):
    tensors = load_file(str(path / "bypass.safetensors"))
    edit(tensors)
    save_file(tensors, str(path / "bypass.safetensors"))


def _first_bypassed(plan):
    return next((k, i) for i in range(plan.num_layers) for k in ("attn", "ffn") if plan.actions(k)[i] == "bypass")


def test_missing_directory_and_files_are_refused(tmp_path, small_plan):
    with pytest.raises(PlanError, match="plan.json is missing"):
        Plan.load(tmp_path / "nowhere")
    path = _saved(small_plan, tmp_path)
    (path / "bypass.safetensors").unlink()
    with pytest.raises(PlanError, match="is missing"):
        Plan.load(path)


@pytest.mark.parametrize("case", ["version", "field", "json", "action", "layers"])
def test_malformed_plan_json_is_refused(case, small_plan, tmp_path):
    path = _saved(small_plan, tmp_path)
    if case == "json":
        (path / "plan.json").write_text("{not json")
        message = "not valid JSON"
    elif case == "version":
        _edit_json(path, lambda m: m.update(format_version=99))
        message = "format_version 99"
    elif case == "field":
        _edit_json(path, lambda m: m.pop("unit_params"))
        message = "lacks the field 'unit_params'"
    elif case == "action":
        _edit_json(path, lambda m: m["layers"][1].update(attn="remove"))
        message = "action is 'remove'"
    else:
        _edit_json(path, lambda m: m["layers"].pop())
        message = "layers but the plan lists"
    with pytest.raises(PlanError, match=message):
        Plan.load(path)


@pytest.mark.parametrize("case", ["missing", "shape", "nan", "extra", "corrupt"])
def test_malformed_bypass_weights_are_refused(case, small_plan, tmp_path):
    path = _saved(small_plan, tmp_path)
    kind, layer = _first_bypassed(small_plan)
    name = f"{kind}.{layer}.up"
    if case == "missing":
        _edit_tensors(path, lambda t: t.pop(name))
        message = f"'{name}' is missing"
    elif case == "shape":
        _edit_tensors(path, lambda t: t.update({name: t[name][:, :-1].contiguous()}))
        message = f"'{name}' has shape"
    elif case == "nan":
        _edit_tensors(path, lambda t: t[name].view(-1).__setitem__(0, float("nan")))
        message = "NaN or Inf"
    elif case == "extra":
        _edit_tensors(path, lambda t: t.update({"attn.99.up": torch.zeros(2, 2)}))
        message = "belong to no bypassed unit"
    else:
        (path / "bypass.safetensors").write_bytes(b"\x00garbage" * 10)
        message = "cannot be read as safetensors"
    with pytest.raises(PlanError, match=message):
        Plan.load(path)


def test_plan_refuses_another_base_model(small_plan, family_model_dir, stories_dir, tmp_path):
    from subfit.reference import ReferenceModel

    other, _, _ = models.load(family_model_dir("llama"))
    with pytest.raises(PlanError, match="fingerprint"):
        ReferenceModel(other, small_plan)
    # Same architecture and shapes, different weights: caught by the weight signature.
    same_shape, _, _ = models.load(stories_dir)
    with torch.no_grad():
        for p in same_shape.parameters():
            p.mul_(1.05).add_(0.02 * torch.randn_like(p))
    with pytest.raises(PlanError, match="different weights"):
        ReferenceModel(same_shape, small_plan)


def test_weight_signature_is_stable_across_dtypes(stories_dir):
    a = models.Decoder(models.load(stories_dir)[0]).weight_signature()
    b = models.Decoder(models.load(stories_dir, dtype=torch.bfloat16)[0]).weight_signature()
    assert models.same_weights(a, b)
