"""compress(): the budget holds, the same seed gives the same plan, a planted linear unit is
found and fitted exactly, several selection draws keep the one best on held-out sequences, and bad
requests are refused with a clear message."""
import subprocess
import sys

import pytest
import torch
from compress_settings import settings

from subfit import models
from subfit.calibration import CalibrationError
from subfit import compression as compress_module
from subfit import selection as selection_module
from subfit.compression import compress, compress_levels
from subfit.config import VALIDATION_SAMPLES, SubFitConfig
from subfit.selection import draw_order, scoring_and_probe_ids, validation_split
from subfit.evaluation import mean_token_loss
from subfit.hardware import bf16_matmuls
from subfit.reference import ReferenceModel


def test_package_names_the_functions_however_often_and_in_whatever_order_they_are_imported():
    """`subfit.compress` is the function on every access, also after its module was imported
    directly (a submodule of the same name would have replaced it on the package)."""
    code = (
        "import subfit, types\n"
        "first = subfit.compress_levels\n"
        "from subfit.compression import compress, compress_levels\n"
        "from subfit.evaluation import evaluate\n"
        "from subfit import compress as again\n"
        "assert subfit.compress is compress is again and subfit.compress_levels is compress_levels is first\n"
        "assert subfit.evaluate is evaluate and subfit.evaluate is subfit.evaluate\n"
        "assert not isinstance(subfit.compress, types.ModuleType)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.fixture(scope="module")
def calib_ids(stories, tinystories_file):
    from subfit.calibration import from_text_file

    return from_text_file(stories[1], tinystories_file, 24, 128, seed=0)


@pytest.mark.parametrize("sparsity", [0.125, 0.1875, 0.25, 0.3125, 0.375])
def test_budget_is_respected_at_every_level(stories, calib_ids, sparsity):
    model = stories[0]
    plan = compress(model, sparsity, calib_ids, **settings(step=0.1875, score_samples=8, selection_draws=1))
    acc = plan.accounting()
    attn_fraction = plan.unit_params["attn"] / plan.block_params
    assert acc["sparsity"] <= sparsity + 1e-12
    # The mix uses the budget to within one attention unit of the best fill possible.
    assert acc["sparsity"] > sparsity - 2 * attn_fraction
    assert acc["removed_params"] == sum(plan.unit_params[u.split(".")[0]] for u in plan.removed_units())
    assert 0 < acc["bypass_params"] < acc["removed_params"]


def test_same_seed_same_plan(stories, tinystories_file, tmp_path):
    model, tokenizer, _ = stories
    text = tmp_path / "stories.txt"
    text.write_text(tinystories_file.read_text()[:60_000])
    a, b = (compress(model, 0.25, text, tokenizer=tokenizer,
                     **settings(calib_samples=12, calib_len=96, seed=7, selection_draws=1)) for _ in range(2))
    assert a.attn == b.attn and a.ffn == b.ffn and set(a.tensors) == set(b.tensors)
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)


class Ones(torch.nn.Module):
    def forward(self, gate):
        return torch.ones_like(gate)


def test_planted_linear_feedforward_is_chosen_and_fitted_exactly(stories_dir, calib_ids):
    """Make layer 2's FeedForward an exact rank-16 linear map: it must be the unit removed, and
    its bypass must reproduce it (error near zero, logits unchanged)."""
    model, _, _ = models.load(stories_dir)
    mlp = models.Decoder(model).layers[2].mlp
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        mlp.up_proj.weight.copy_(torch.randn(mlp.up_proj.weight.shape[0], 16, generator=g)
                                 @ torch.randn(16, mlp.up_proj.weight.shape[1], generator=g) * 0.1)
    mlp.act_fn = Ones()  # y = down(up(x)): linear, rank 16
    plan = compress(model, 0.15, calib_ids, **settings(ridge=1e-9, selection_draws=1))
    assert plan.removed_units() == ["ffn.2"]
    # Zero to the rounding of the calibration walks, whose matmuls run in bf16 where that is fast
    # (float32 elsewhere: then to 1e-7).
    assert plan.method["bypass_errors"]["ffn.2"] < 1e-3
    ids = calib_ids[:2, :64]
    dense = model(ids).logits.detach()
    assert float((ReferenceModel(model, plan)(ids) - dense).norm() / dense.norm()) < 5e-3


def test_selection_is_submodule_level_and_non_contiguous(stories, calib_ids):
    plan = compress(stories[0], 0.375, calib_ids, **settings(step=0.1875, score_samples=8, selection_draws=1))
    removed = plan.removed_units()
    assert removed, "nothing removed"
    # Units are chosen one submodule at a time: never forced to take a whole layer.
    assert any((plan.attn[i] == "keep") != (plan.ffn[i] == "keep") for i in range(plan.num_layers))


def test_levels_are_each_what_compress_makes(stories, calib_ids):
    """compress_levels shares the first scoring walk only: each plan is exactly compress()'s."""
    model = stories[0]
    levels = [0.3125, 0.125]
    options = settings(step=0.125, score_samples=8, selection_draws=1)
    for level, plan in zip(levels, compress_levels(model, levels, calib_ids, **options)):
        alone = compress(model, level, calib_ids, **options)
        assert plan.method["sparsity"] == level and plan.accounting()["sparsity"] <= level + 1e-12
        assert plan.removed_units() == alone.removed_units() and set(plan.tensors) == set(alone.tensors)
        assert all(torch.equal(alone.tensors[k], plan.tensors[k]) for k in alone.tensors)


def test_deletion_ablation_is_the_same_selection_without_bypasses(stories, calib_ids):
    plan = compress(stories[0], 0.25, calib_ids, **settings(step=0.25, score_samples=8, selection_draws=1))
    deleted = plan.without_bypasses()
    assert deleted.removed_units() == plan.removed_units() and not deleted.tensors
    assert set(deleted.attn + deleted.ffn) <= {"keep", "delete"} and deleted.method["bypass"] is False
    assert plan.tensors and "bypass" in plan.attn + plan.ffn  # the original is untouched
    assert deleted.accounting()["sparsity"] == plan.accounting()["sparsity"]


@pytest.mark.parametrize("n, held_out_scoring", [(24, 8), (6, 4), (3, 1)])
def test_probe_sequences_are_held_out_from_the_scoring_walk(n, held_out_scoring):
    ids = torch.arange(n)[:, None].expand(n, 5)
    scoring, probe = scoring_and_probe_ids(ids, score_samples=8, probe_samples=2)
    assert scoring[:, 0].tolist() == list(range(held_out_scoring))
    assert probe[:, 0].tolist() == list(range(held_out_scoring, min(n, held_out_scoring + 2)))


def test_validation_split_holds_out_a_seeded_subset():
    ids = torch.arange(40)[:, None].expand(40, 3)
    fit, held = validation_split(ids, 3, seed=5)
    assert held.shape[0] == VALIDATION_SAMPLES and fit.shape[0] == 40 - VALIDATION_SAMPLES
    rows = fit[:, 0].tolist() + held[:, 0].tolist()
    assert sorted(rows) == list(range(40))  # disjoint, nothing lost
    assert fit[:, 0].tolist() == sorted(fit[:, 0].tolist())  # the fit keeps file order: draw 0 is compress's own
    assert held[:, 0].tolist() != list(range(40 - VALIDATION_SAMPLES, 40))  # not just the end of the file
    assert torch.equal(validation_split(ids, 3, seed=5)[1], held) and not torch.equal(validation_split(ids, 3, 6)[1], held)
    one, none = validation_split(ids, 1, seed=5)
    assert one is ids and none.shape[0] == 0  # one draw: no choice to make, every sequence fits
    assert torch.equal(draw_order(fit, 0, 5), fit) and not torch.equal(draw_order(fit, 1, 5), fit)
    assert sorted(draw_order(fit, 2, 5)[:, 0].tolist()) == sorted(fit[:, 0].tolist())
    with pytest.raises(ValueError, match=f"holds out {VALIDATION_SAMPLES} calibration sequences .* there are 17"):
        validation_split(ids[:17], 2, seed=0)


@pytest.fixture(scope="module")
def draw_ids(stories, tinystories_file):
    from subfit.calibration import from_text_file

    return from_text_file(stories[1], tinystories_file, VALIDATION_SAMPLES + 12, 96, seed=0)


def test_selection_draws_keep_the_plan_with_least_held_out_loss(stories, draw_ids, monkeypatch):
    """Each draw scores on other sequences; none of them, no fit and no probe ever sees the
    held-out ones; the plan kept per level is the draw whose scoring-walk plan has the least
    held-out loss, and draw 0 selects what compress's single selection on the fit sequences does."""
    model = stories[0]
    seen, probed, scored = [], [], []

    def walk_spy(decoder, ids, **kwargs):
        seen.append(ids)
        return real_walk(decoder, ids, **kwargs)

    def probe_spy(decoder, probe_ids, *args, **kwargs):
        probed.append(probe_ids)
        return real_effects(decoder, probe_ids, *args, **kwargs)

    def loss_spy(logits_fn, windows, batch_size=4):
        scored.append(logits_fn.plan)
        return mean_token_loss(logits_fn, windows, batch_size)

    real_walk, real_effects = compress_module.walk, selection_module.output_effects
    monkeypatch.setattr(compress_module, "walk", walk_spy)
    monkeypatch.setattr(selection_module, "walk", walk_spy)
    monkeypatch.setattr(selection_module, "output_effects", probe_spy)
    monkeypatch.setattr(compress_module, "mean_token_loss", loss_spy)
    levels = [0.25, 0.125]
    plans = compress_levels(model, levels, draw_ids, **settings(step=0.125, score_samples=6, seed=3, selection_draws=3))
    fit, held = validation_split(draw_ids, 3, seed=3)
    held_rows = {tuple(row) for row in held.tolist()}
    assert all(not held_rows & {tuple(row) for row in ids.tolist()} for ids in seen + probed)
    assert len({tuple(map(tuple, p.tolist())) for p in probed}) == 3  # one probe per draw, all different
    assert len(scored) == 3 * len(levels)
    for i, plan in enumerate(plans):
        losses = plan.method["selection"]["validation_loss"]
        best = plan.method["selection"]["draw"]
        assert len(losses) == 3 and losses[best] == min(losses) and plan.method["config"]["selection_draws"] == 3
        chosen = scored[best * len(levels) + i]  # the draw's plan as its scoring walk fitted it
        assert plan.removed_units() == chosen.removed_units()
        with bf16_matmuls("cpu"):  # as compress scores the draws
            assert mean_token_loss(ReferenceModel(model, chosen), held, 1) == pytest.approx(losses[best], rel=1e-6)
        assert plan.accounting()["sparsity"] <= levels[i] + 1e-12
    monkeypatch.undo()
    again = compress_levels(model, levels, draw_ids, **settings(step=0.125, score_samples=6, seed=3, selection_draws=3))
    assert [p.method["selection"] for p in again] == [p.method["selection"] for p in plans]
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for a, b in zip(again, plans) for k in a.tensors)
    first = compress_levels(model, levels, fit, **settings(step=0.125, score_samples=6, seed=3, selection_draws=1))
    for draw0, made in zip(first, scored[:len(levels)]):
        assert made.removed_units() == draw0.removed_units()


def test_one_draw_alone_is_that_draw_of_the_full_compress(stories, draw_ids):
    """`DevOptions.draw` runs one selection draw alone (`profile_compress.py --set draw=N`): its
    held-out loss is the one the full compress recorded for it, the chosen draw alone makes the
    plan compress keeps, and a draw that compress does not make is refused."""
    fields = dict(step=0.125, score_samples=6, seed=3, selection_draws=3)
    plan = compress(stories[0], 0.25, draw_ids, **settings(**fields))
    record = plan.method["selection"]
    for draw in range(3):
        alone = compress(stories[0], 0.25, draw_ids, **settings(**fields, draw=draw))
        assert alone.method["selection"]["validation_loss"] == [record["validation_loss"][draw]]
        assert alone.method["selection"]["draw"] == draw
        if draw == record["draw"]:
            assert alone.removed_units() == plan.removed_units()
    with pytest.raises(ValueError, match="the draws are 0 to 2"):
        compress(stories[0], 0.25, draw_ids, **settings(**fields, draw=3))


@pytest.mark.parametrize("draws", [0, -1, 1.5, True])
def test_selection_draws_must_be_a_count(draws):
    with pytest.raises(ValueError, match="selection_draws=.* must be a whole number"):
        SubFitConfig(selection_draws=draws)


def test_output_kl_is_probed_on_sequences_the_scoring_walk_did_not_fit(stories, calib_ids, monkeypatch):
    probed = []

    def recording(decoder, probe_ids, *args, **kwargs):
        probed.append(probe_ids)
        return real(decoder, probe_ids, *args, **kwargs)

    real = selection_module.output_effects
    monkeypatch.setattr(selection_module, "output_effects", recording)
    plan = compress(stories[0], 0.25, calib_ids, **settings(step=0.25, score_samples=8, selection_draws=1))
    assert probed and all(torch.equal(ids, calib_ids[8:10]) for ids in probed)
    assert plan.method["options"]["probe_samples"] == 2


@pytest.mark.parametrize("sparsity", [-0.1, 0.9, float("nan"), 0.01, True])
def test_sparsity_out_of_range_is_refused(stories, calib_ids, sparsity):
    with pytest.raises(ValueError, match="sparsity"):
        compress(stories[0], sparsity, calib_ids, progress=False)


def test_too_little_calibration_text_is_refused(stories, tmp_path):
    model, tokenizer, _ = stories
    short = tmp_path / "short.txt"
    short.write_text("Once upon a time there was a cat.\n\nThe end.")
    with pytest.raises(CalibrationError, match="Give more text"):
        compress(model, 0.25, short, tokenizer=tokenizer, **settings(calib_samples=4, calib_len=64, selection_draws=1))


def test_unsupported_architecture_is_refused(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(tmp_path)
    with pytest.raises(models.UnsupportedModelError, match="'gpt2'.*llama, mistral, qwen2, qwen3"):
        models.load(tmp_path)


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "mistral"])
def test_every_family_compresses(family, family_model_dir):
    model, _, _ = models.load(family_model_dir(family))
    ids = torch.randint(0, 512, (8, 48), generator=torch.Generator().manual_seed(0))
    plan = compress(model, 0.25, ids, **settings(step=0.1875, selection_draws=1))
    assert plan.removed_units()
    logits = ReferenceModel(model, plan)(ids[:1])
    assert torch.isfinite(logits).all()
