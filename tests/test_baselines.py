"""Baselines on planted cases of the real stories260K model: each selection rule removes what it
must, ReplaceMe's fit recovers a planted linear block, budgets round as documented, and every
baseline is one CLI flag away."""
import pytest
import torch

from subfit import models
from subfit.baselines import BUILDERS, compress_baseline, dense_scores, fit_blocks, layers_for
from subfit.methods import BASELINES, METHODS
from subfit.models import Decoder
from subfit.plan import Plan
from subfit.reference import ReferenceModel


@pytest.fixture(scope="module")
def calib_ids(stories, tinystories_file):
    from subfit.calibration import from_text_file

    return from_text_file(stories[1], tinystories_file, 16, 96, seed=0)


def fresh(stories_dir):
    """A private copy of stories260K to plant things in (the session fixture stays untouched)."""
    model, _, source = models.load(stories_dir)
    return model, Decoder(model), source


def make_identity(decoder, layer, scale=0.0):
    """Scale a layer's output projections: 0 makes it an exact identity on the residual stream."""
    block = decoder.layers[layer]
    with torch.no_grad():
        block.self_attn.o_proj.weight.mul_(scale)
        block.mlp.down_proj.weight.mul_(scale)


def test_shortgpt_removes_the_planted_identity_layer_first(stories_dir, calib_ids):
    model, decoder, source = fresh(stories_dir)
    make_identity(decoder, 3)
    scores = dense_scores(decoder, calib_ids, progress=False)
    bi = scores.block_influence()
    assert float(bi[3]) < 1e-9 < float(bi.clone().index_fill_(0, torch.tensor([3]), 1).min())
    plan = compress_baseline(model, "shortgpt", 0.125, calib_ids, scores=scores, source=source, progress=False)
    assert plan.removed_units() == ["attn.3", "ffn.3"]
    assert all(a == "delete" for a in plan.attn[3:4] + plan.ffn[3:4]) and not plan.tensors
    # The identity layer changes nothing: deleting it leaves the logits exactly as they were.
    ids = calib_ids[:2, :48]
    assert torch.allclose(ReferenceModel(model, plan)(ids), model(ids).logits.detach(), atol=1e-5)


def test_uidl_picks_the_planted_contiguous_block_where_shortgpt_does_not(stories_dir, calib_ids):
    """Layers 1-2 near-identity (contiguous), layer 4 exact identity (alone): for two layers
    UIDL takes the block 1-2, ShortGPT the two least influential layers wherever they are."""
    model, decoder, source = fresh(stories_dir)
    for layer in (1, 2):
        make_identity(decoder, layer, 0.02)
    make_identity(decoder, 4)
    scores = dense_scores(decoder, calib_ids, progress=False)
    uidl = compress_baseline(model, "uidl", 0.375, calib_ids, scores=scores, source=source)
    assert uidl.method["block"] == [1, 2]
    assert uidl.removed_units() == ["attn.1", "ffn.1", "attn.2", "ffn.2"]
    assert float(scores.angular_distance(2)[1]) < 0.5 * float(scores.angular_distance(2)[[0, 2, 3]].min())
    shortgpt = compress_baseline(model, "shortgpt", 0.375, calib_ids, scores=scores, source=source)
    assert 4 in shortgpt.method["layers"] and shortgpt.method["layers"] != [1, 2]
    # One layer: both take the exact identity.
    assert compress_baseline(model, "uidl", 0.125, calib_ids, scores=scores, source=source).method["block"] == [4, 1]


def test_llm_drop_removes_zeroed_units_first_and_mixes_kinds(stories_dir, calib_ids):
    model, decoder, source = fresh(stories_dir)
    with torch.no_grad():
        decoder.layers[2].mlp.down_proj.weight.zero_()  # ffn.2 adds nothing
        decoder.layers[1].self_attn.o_proj.weight.zero_()  # attn.1 adds nothing
    scores = dense_scores(decoder, calib_ids, progress=False)
    importance = scores.unit_importance()
    assert float(importance["ffn"][2]) < 1e-9 and float(importance["attn"][1]) < 1e-9
    plan = compress_baseline(model, "llm-drop", 0.25, calib_ids, scores=scores, source=source)
    assert plan.removed_units() == ["attn.1", "ffn.2"]  # not four attention units, though they fill more
    assert plan.accounting()["sparsity"] <= 0.25
    # At 12.5% no FeedForward fits: the zeroed attention goes first.
    assert "attn.1" in compress_baseline(model, "llm-drop", 0.125, calib_ids, scores=scores,
                                         source=source).removed_units()


class Ones(torch.nn.Module):
    def forward(self, gate):
        return torch.ones_like(gate)


def test_replaceme_fit_recovers_a_planted_linear_block(stories_dir, calib_ids):
    """Block 1-2: layer 1's attention silent and its FeedForward linear, layer 2 an identity; so
    (block output - input) is a linear function of layer 1's normed input. The least-squares map
    must reproduce it exactly, and it is the block ReplaceMe (UIDL's rule) chooses."""
    model, decoder, source = fresh(stories_dir)
    layer1 = decoder.layers[1]
    with torch.no_grad():
        layer1.self_attn.o_proj.weight.zero_()
        layer1.mlp.down_proj.weight.mul_(0.05)  # small enough that UIDL sees a near-identity block
    layer1.mlp.act_fn = Ones()  # ffn(x) = down(up(x)): linear
    make_identity(decoder, 2)
    fits = fit_blocks(decoder, calib_ids, [(1, 2), (0, 1)], ridge=1e-10)
    assert fits[(1, 2)].error < 1e-10 < fits[(0, 1)].error  # a real layer is not linear
    plan = compress_baseline(model, "replaceme", 0.375, calib_ids, source=source, ridge=1e-10, progress=False)
    assert plan.method["block"] == [1, 2]
    assert plan.attn == ["keep", "bypass", "delete", "keep", "keep"]
    assert plan.ffn == ["keep", "delete", "delete", "keep", "keep"]
    d = decoder.hidden_size
    assert plan.tensors["attn.1.down"].shape == (d, d) and torch.equal(plan.tensors["attn.1.up"], torch.eye(d))
    assert plan.accounting()["bypass_params"] == 2 * d * d + d
    ids = calib_ids[:2, :48]
    dense = model(ids).logits.detach()
    assert float((ReferenceModel(model, plan)(ids) - dense).norm() / dense.norm()) < 1e-4
    # UIDL deletes the same block and is visibly worse: the map is what ReplaceMe adds.
    uidl = compress_baseline(model, "uidl", 0.375, calib_ids, source=source)
    assert uidl.method["block"] == [1, 2]
    assert float((ReferenceModel(model, uidl)(ids) - dense).norm() / dense.norm()) > 1e-2


def test_replaceme_plan_survives_save_and_load(stories, calib_ids, tmp_path):
    model, _, source = stories
    plan = compress_baseline(model, "replaceme", 0.25, calib_ids, source=source, progress=False)
    loaded = Plan.load(plan.save(tmp_path / "rm"))
    ids = calib_ids[:1, :32]
    assert torch.allclose(ReferenceModel(model, loaded)(ids), ReferenceModel(model, plan)(ids), atol=1e-5)


@pytest.mark.parametrize("sparsity", [0.125, 0.1875, 0.25, 0.3125, 0.375])
def test_budgets(stories, calib_ids, sparsity):
    """Layer methods: the nearest whole number of layers (exact sparsity reported); LLM-Drop:
    never over the budget, and filling it to within two attention units."""
    model, _, source = stories
    decoder = Decoder(model)
    scores = dense_scores(decoder, calib_ids, progress=False)
    empty = Plan.empty(decoder, source)
    layer = empty.unit_params["attn"] + empty.unit_params["ffn"]
    n = layers_for(sparsity, empty)
    assert abs(n * layer / empty.block_params - sparsity) <= 0.5 * layer / empty.block_params
    for method in BASELINES:
        plan = compress_baseline(model, method, sparsity, calib_ids, scores=scores, source=source)
        acc = plan.accounting()
        assert acc["sparsity"] == acc["removed_params"] / empty.block_params
        if METHODS[method].removes == "layer":
            assert acc["removed_attn"] == acc["removed_ffn"] == n
        else:
            assert sparsity - 2 * empty.unit_params["attn"] / empty.block_params < acc["sparsity"] <= sparsity


def test_bad_requests_are_refused(stories, calib_ids):
    model = stories[0]
    with pytest.raises(ValueError, match="Unknown baseline 'magic'"):
        compress_baseline(model, "magic", 0.25, calib_ids)
    with pytest.raises(ValueError, match="SubFit itself is subfit.compress"):
        compress_baseline(model, "subfit", 0.25, calib_ids)
    with pytest.raises(ValueError, match="sparsity"):
        compress_baseline(model, "shortgpt", 0.9, calib_ids)
    with pytest.raises(ValueError, match="less than half a layer"):
        compress_baseline(model, "uidl", 0.05, calib_ids)
    assert compress_baseline(model, "shortgpt", 0.0, calib_ids).removed_units() == []


def test_every_baseline_of_the_registry_is_built():
    assert set(BUILDERS) == set(BASELINES)


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_every_baseline_runs_on_other_families(family, family_model_dir):
    model, _, source = models.load(family_model_dir(family))
    ids = torch.randint(0, 512, (6, 32), generator=torch.Generator().manual_seed(0))
    scores = dense_scores(Decoder(model), ids, progress=False)
    for method in BASELINES:
        plan = compress_baseline(model, method, 0.25, ids, scores=scores, source=source)
        assert plan.removed_units()
        assert torch.isfinite(ReferenceModel(model, plan)(ids[:1])).all()


def test_cli_method_flag(stories_dir, tinystories_file, tmp_path, capsys):
    from subfit.cli import main

    text = tmp_path / "stories.txt"
    text.write_text(tinystories_file.read_text()[:40_000])
    common = [str(stories_dir), "--sparsity", "0.25", "--calib", str(text), "--calib-samples", "8", "--calib-len", "64"]
    for method in ("shortgpt", "replaceme"):
        out = tmp_path / method
        assert main(["compress", *common, "--method", method, "--out", str(out)]) == 0
        plan = Plan.load(out)
        assert plan.method["name"] == method and plan.method["calibration"]["samples"] == 8
        assert plan.accounting()["removed_attn"] == 1
    capsys.readouterr()
    assert main(["compress", *common, "--method", "uidl", "--selection-draws", "1", "--out", str(tmp_path / "x")]) == 2
    assert "are SubFit options; they do not apply to --method uidl" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
