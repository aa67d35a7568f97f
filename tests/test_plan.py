"""Plans round-trip through plan.json + bypass.safetensors, and every malformed plan is refused
with a message that names the problem."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from subfit import models
from subfit.plan import Plan, PlanError


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


def _bypassed_layer(plan, kind):
    return next(i for i, action in enumerate(plan.actions(kind)) if action == "bypass")


def _kept_layer(plan, kind):
    return next(i for i, action in enumerate(plan.actions(kind)) if action == "keep")


def _set(path, value):
    """An edit of plan.json that sets the field at `path` (keys and list indices) to `value`."""
    def edit(meta):
        node = meta
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return edit


def _drop(path):
    def edit(meta):
        node = meta
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]
    return edit


# (name, edit of the parsed plan.json, text the PlanError must contain): each a field of the wrong type,
# a missing or unknown field, or a value that disagrees with the rest of the plan.
JSON_CASES = [
    ("version", _set(["format_version"], 99), "format_version 99"),
    ("version-bool", _set(["format_version"], True), "format_version True"),
    ("version-text", _set(["format_version"], "1"), "format_version '1'"),
    ("empty-object", lambda m: m.clear(), "lacks the field 'format_version'"),
    ("missing-unit-params", _drop(["unit_params"]), "lacks the field 'unit_params'"),
    ("missing-method", _drop(["method"]), "lacks the field 'method'"),
    ("unknown-field", _set(["extra"], 1), "unknown field 'extra'"),
    ("base-list", _set(["base"], []), "base is []; expected an object"),
    ("missing-fingerprint", _drop(["base", "fingerprint"]), "base lacks the field 'fingerprint'"),
    ("fingerprint-number", _set(["base", "fingerprint"], 7), "base.fingerprint is 7"),
    ("hidden-size-text", _set(["base", "hidden_size"], "64"), "base.hidden_size is '64'"),
    ("hidden-size-zero", _set(["base", "hidden_size"], 0), "base.hidden_size is 0"),
    ("num-layers-float", _set(["base", "num_layers"], 5.0), "base.num_layers is 5.0"),
    ("signature-empty", _set(["base", "weight_signature"], []), "base.weight_signature is []"),
    ("signature-text", _set(["base", "weight_signature", 0], "x"), "base.weight_signature"),
    ("base-unknown", _set(["base", "colour"], "red"), "base has the unknown field 'colour'"),
    ("layers-object", lambda m: m.update(layers={"0": m["layers"][0]}), "layers is {"),
    ("layers-short", lambda m: m["layers"].pop(), "layers but the plan lists"),
    ("layer-entry-text", _set(["layers", 0], "keep"), "layers[0] is 'keep'"),
    ("layer-missing-ffn", _drop(["layers", 1, "ffn"]), "layers[1] lacks the field 'ffn'"),
    ("layer-index", _set(["layers", 2, "layer"], 7), "layers[2].layer is 7"),
    ("action", _set(["layers", 1, "attn"], "remove"), "layers[1].attn is 'remove'"),
    ("action-null", _set(["layers", 1, "ffn"], None), "layers[1].ffn is None"),
    ("rank-text", _set(["layers", 0, "attn_rank"], "8"), "layers[0].attn_rank is '8'"),
    ("unit-params-list", _set(["unit_params"], [1, 2]), "unit_params is [1, 2]"),
    ("unit-params-negative", _set(["unit_params", "attn"], -5), "unit_params.attn is -5"),
    ("unit-params-missing", _drop(["unit_params", "ffn"]), "unit_params lacks the field 'ffn'"),
    ("block-params-zero", _set(["block_params"], 0), "block_params is 0"),
    ("block-params-float", _set(["block_params"], 1.5e9), "block_params is 1500000000.0"),
    ("method-text", _set(["method"], "subfit"), "method is 'subfit'; expected an object"),
    ("accounting-list", _set(["accounting"], []), "accounting is []"),
]


@pytest.mark.parametrize("case", [c[0] for c in JSON_CASES])
def test_malformed_plan_json_is_refused_naming_file_and_field(case, small_plan, tmp_path):
    _, edit, message = next(c for c in JSON_CASES if c[0] == case)
    path = _saved(small_plan, tmp_path)
    _edit_json(path, edit)
    with pytest.raises(PlanError) as error:
        Plan.load(path)
    assert str(error.value).startswith(f"{path / 'plan.json'}") and message in str(error.value)


def test_rank_fields_must_match_the_weights(small_plan, tmp_path):
    path = _saved(small_plan, tmp_path)
    bypassed, kept = _bypassed_layer(small_plan, "attn"), _kept_layer(small_plan, "attn")
    _edit_json(path, _set(["layers", bypassed, "attn_rank"], 3))
    with pytest.raises(PlanError, match=rf"layers\[{bypassed}\].attn_rank is 3; expected 8, the rank"):
        Plan.load(path)
    _edit_json(path, _set(["layers", bypassed, "attn_rank"], 8))
    _edit_json(path, _set(["layers", kept, "attn_rank"], 8))
    with pytest.raises(PlanError, match=rf"layers\[{kept}\].attn_rank is 8; expected null"):
        Plan.load(path)


@pytest.mark.parametrize("content, message", [
    (b"{not json", "not valid JSON"),
    (b'{"format_version": 1, "base": "\xff\xfe"}', r"not UTF-8 text \(byte 31\)"),
    ("\ufeff{}".encode(), "not valid JSON"),  # a byte-order mark
    ('{"format_version": 1}'.encode("utf-16"), "not UTF-8 text"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b"[1, 2]", "the top level is 'list'; expected a JSON object"),
    (b"", "not valid JSON"),
])
def test_unreadable_plan_json_is_refused(content, message, small_plan, tmp_path):
    path = _saved(small_plan, tmp_path)
    (path / "plan.json").write_bytes(content)
    with pytest.raises(PlanError, match=message) as error:
        Plan.load(path)
    assert str(path / "plan.json") in str(error.value)


def test_plan_json_that_is_a_folder_is_refused(small_plan, tmp_path):
    path = _saved(small_plan, tmp_path)
    (path / "plan.json").unlink()
    (path / "plan.json").mkdir()
    with pytest.raises(PlanError, match="plan.json is not a file"):
        Plan.load(path)


def _renamed(tensors, old, new):
    tensors[new] = tensors.pop(old)


# (name, edit of the loaded tensors given the name of a bypassed attention's `up`, text of the PlanError)
TENSOR_CASES = [
    ("missing", lambda t, n: t.pop(n), "is missing"),
    ("renamed", lambda t, n: _renamed(t, n, n.replace("up", "upp")), "is missing"),
    ("extra", lambda t, n: t.update({"attn.99.up": torch.zeros(2, 2)}), "belong to no bypassed unit"),
    ("shape", lambda t, n: t.update({n: t[n][:, :-1].contiguous()}), "has shape"),
    ("transposed", lambda t, n: t.update({n: t[n].T.contiguous()}), "has shape"),
    ("flat", lambda t, n: t.update({n: t[n].reshape(-1).contiguous()}), "has shape"),
    ("rank-zero", lambda t, n: t.update({n.replace("up", "down"): torch.zeros(64, 0),
                                        n: torch.zeros(0, 64)}), "rank >= 1"),
    ("bool", lambda t, n: t.update({n: t[n] > 0}), "has dtype torch.bool"),
    ("int32", lambda t, n: t.update({n: (t[n] * 100).to(torch.int32)}), "has dtype torch.int32"),
    ("uint8", lambda t, n: t.update({n: t[n].to(torch.uint8)}), "has dtype torch.uint8"),
    ("float8", lambda t, n: t.update({n: t[n].to(torch.float8_e4m3fn)}), "has dtype torch.float8_e4m3fn"),
    ("nan", lambda t, n: t[n].view(-1).__setitem__(0, float("nan")), "NaN or Inf"),
    ("inf", lambda t, n: t[n].view(-1).__setitem__(3, float("-inf")), "NaN or Inf"),
    ("huge", lambda t, n: t[n].view(-1).__setitem__(0, 1e30), "magnitude 1e+30"),
    ("past-float16", lambda t, n: t[n].view(-1).__setitem__(0, 70000.0), "magnitude 7e+04"),
]


@pytest.mark.parametrize("case", [c[0] for c in TENSOR_CASES])
def test_malformed_bypass_weights_are_refused(case, small_plan, tmp_path):
    _, edit, message = next(c for c in TENSOR_CASES if c[0] == case)
    path = _saved(small_plan, tmp_path)
    name = f"attn.{_bypassed_layer(small_plan, 'attn')}.up"
    _edit_tensors(path, lambda t: edit(t, name))
    with pytest.raises(PlanError) as error:
        Plan.load(path)
    assert str(error.value).startswith(f"{path / 'bypass.safetensors'}") and message in str(error.value)


@pytest.mark.parametrize("content", [b"\x00garbage" * 10, b"", b"\xff" * 8 + b"{}"])
def test_unreadable_bypass_weights_are_refused(content, small_plan, tmp_path):
    path = _saved(small_plan, tmp_path)
    (path / "bypass.safetensors").write_bytes(content)
    with pytest.raises(PlanError, match="bypass.safetensors cannot be read as safetensors"):
        Plan.load(path)


def test_half_precision_and_bounded_values_load_and_run(small_plan, stories, tmp_path):
    """Floating dtypes other than float32, and values up to the bound, are valid plans."""
    from subfit.reference import ReferenceModel

    path = _saved(small_plan, tmp_path)
    name = f"attn.{_bypassed_layer(small_plan, 'attn')}.up"

    def edit(tensors):
        tensors[name] = tensors[name].to(torch.bfloat16)
        tensors["ffn.basis"] = tensors["ffn.basis"].to(torch.float16)
        tensors["ffn.basis"].view(-1)[0] = 60000.0

    _edit_tensors(path, edit)
    plan = Plan.load(path)
    assert plan.tensors[name].dtype == torch.bfloat16
    assert torch.isfinite(ReferenceModel(stories[0], plan)(torch.tensor([[1, 9, 33, 7]]))).all()


def test_plan_without_bypasses_needs_no_weights_file(stories, tmp_path):
    model, _, source = stories
    plan = Plan.empty(models.Decoder(model), source)
    plan.attn[1] = "delete"
    plan.save(tmp_path / "plan")
    (tmp_path / "plan" / "bypass.safetensors").unlink()
    assert Plan.load(tmp_path / "plan").attn == plan.attn


def test_plan_edited_to_disagree_with_its_base_is_refused_when_applied(small_plan, stories, tmp_path):
    """Fields the fingerprint does not cover directly are checked against the model itself."""
    from subfit.reference import ReferenceModel

    path = _saved(small_plan, tmp_path)
    _edit_json(path, _set(["unit_params", "attn"], small_plan.unit_params["attn"] + 1))
    plan = Plan.load(path)
    with pytest.raises(PlanError, match=r"unit_params.attn is \d+ but its base model has \d+"):
        ReferenceModel(stories[0], plan)


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
