"""The calibration walk's bypass fit targets, on the real stories260K model."""
import pytest
import torch

from subfit.fitting import reduced_rank_fit
from subfit.models import Decoder
from subfit.selection import as_bypass, token_weights
from subfit.stats import walk


@pytest.fixture(scope="module")
def calib_ids(stories, tinystories_file):
    from subfit.calibration import from_text_file

    return from_text_file(stories[1], tinystories_file, 8, 64, seed=0)


def _walk_streams(decoder, calib_ids, removed, target, bypasses=None):
    """The residual stream after every unit (batches concatenated) and the bypassed units' stats.
    Bypasses are full-rank fits, or the given ones (so that two walks see the same streams)."""
    after: dict = {}

    def hook(kind, layer, h_before, h_after):
        after.setdefault((kind, layer), []).append(h_after)

    def fit(kind, layer, s):
        if bypasses is not None:
            return bypasses[(kind, layer)]
        return as_bypass(reduced_rank_fit(s.moments(), decoder.hidden_size, 1e-6))

    stats = walk(decoder, calib_ids, actions={u: "bypass" for u in removed}, hooks=[hook], target=target,
                 fit=fit, weights=token_weights, batch_size=4, progress=False)
    return {u: torch.cat(hs) for u, hs in after.items()}, stats


def _target_gap(stats_a, stats_b, unit) -> float:
    """Relative difference of two walks' X^T Y for `unit`: zero when both fitted the same target
    on the same inputs ((h + y) - h differs from y by float32 rounding only)."""
    return float((stats_a[unit].xy - stats_b[unit].xy).norm() / stats_b[unit].xy.norm())


def test_run_target_is_the_unit_target_for_a_lone_unit(stories, calib_ids):
    """Only adjacent bypassed units form a run: a lone one after earlier removals (drift) is still
    fitted to its own output, while the second unit of a run is not."""
    decoder = Decoder(stories[0])
    removed = [("attn", 1), ("ffn", 1), ("ffn", 3)]
    _, unit = _walk_streams(decoder, calib_ids, removed, "unit")
    fixed = {u: as_bypass(reduced_rank_fit(unit[u].moments(), 16, 1e-3)) for u in removed}
    _, unit = _walk_streams(decoder, calib_ids, removed, "unit", fixed)
    _, run = _walk_streams(decoder, calib_ids, removed, "run", fixed)
    assert _target_gap(run, unit, ("attn", 1)) < 1e-4 and _target_gap(run, unit, ("ffn", 3)) < 1e-4
    assert _target_gap(run, unit, ("ffn", 1)) > 1e-2


def test_run_target_fits_the_block_from_the_runs_start(stories, calib_ids):
    """After a run of full-rank run-target bypasses the stream is closer to what the real units
    would make from the run's start (earlier removals kept as they are) than with unit targets."""
    decoder = Decoder(stories[0])
    before, run = [("ffn", 0)], [("attn", 2), ("ffn", 2), ("attn", 3)]
    reference, _ = _walk_streams(decoder, calib_ids, before, "unit")  # same ffn.0 bypass, real run
    errors = {}
    for target in ("unit", "run"):
        streams, _ = _walk_streams(decoder, calib_ids, before + run, target)
        h, real_h = streams[("attn", 3)], reference[("attn", 3)]
        weights = token_weights(streams[("ffn", 2)])  # the fit's: of the stream it adds to
        errors[target] = float((weights * (h - real_h).double().pow(2).sum(-1)).sum())
    assert errors["run"] < 0.99 * errors["unit"], errors


def test_unknown_target_is_refused(stories, calib_ids):
    with pytest.raises(ValueError, match="Unknown target 'teacher'"):
        walk(Decoder(stories[0]), calib_ids, target="teacher", progress=False)


def test_a_walk_resumed_from_a_checkpoint_equals_the_whole_walk(stories, calib_ids):
    """The greedy's next walk starts at the checkpoint in front of its first newly removed unit:
    its statistics are exactly those of a walk from the embeddings."""
    from subfit.models import UNIT_KINDS
    from subfit.stats import Checkpoints

    decoder = Decoder(stories[0])
    units = [(k, i) for i in range(decoder.num_layers) for k in UNIT_KINDS]
    first = Checkpoints(every=2)
    walk(decoder, calib_ids, collect=units, record=first, batch_size=4, progress=False)
    assert sorted(first.streams) == [0, 2, 4]
    removed = {("ffn", 2): "bypass", ("attn", 3): "bypass"}
    fit = lambda kind, layer, s: as_bypass(reduced_rank_fit(s.moments(), 16, 1e-3))  # noqa: E731
    start = first.resume_layer(2)
    resumed = walk(decoder, calib_ids, actions=removed, fit=fit, collect=units, resume=first, start_layer=start,
                   batch_size=4, progress=False)
    whole = walk(decoder, calib_ids, actions=removed, fit=fit, collect=units, batch_size=4, progress=False)
    assert start == 2 and set(resumed) == {u for u in whole if u[1] >= 2}
    for unit, stats in resumed.items():
        assert torch.equal(stats.xx, whole[unit].xx) and torch.equal(stats.xy, whole[unit].xy), unit
    with pytest.raises(ValueError, match="needs a checkpoint there"):
        walk(decoder, calib_ids, resume=first, start_layer=3, progress=False)
