"""The calibration walk's bypass fit targets, on the real stories260K model."""
import pytest
import torch

from subfit.compress import _as_bypass
from subfit.fitting import reduced_rank_fit
from subfit.models import Decoder
from subfit.stats import token_weights, walk


@pytest.fixture(scope="module")
def calib_ids(stories, tinystories_file):
    from subfit.calibration import from_text_file

    return from_text_file(stories[1], tinystories_file, 8, 64, seed=0)


def _walk_streams(decoder, calib_ids, removed, target):
    """The residual stream after every unit (batches concatenated) and the bypassed units' stats."""
    after: dict = {}

    def hook(kind, layer, h_before, h_after):
        after.setdefault((kind, layer), []).append(h_after)

    full_rank = decoder.hidden_size
    stats = walk(decoder, calib_ids, actions={u: "bypass" for u in removed}, hooks=[hook], target=target,
                 fit=lambda kind, layer, s: _as_bypass(reduced_rank_fit(s.moments(), full_rank, 1e-6)),
                 batch_size=4, progress=False)
    return {u: torch.cat(hs) for u, hs in after.items()}, stats


def test_dense_target_equals_unit_target_before_any_drift(stories, calib_ids):
    """The first bypassed unit sees the dense stream, so both targets are its own output."""
    decoder = Decoder(stories[0])
    removed = [("ffn", 1), ("attn", 3)]
    _, unit = _walk_streams(decoder, calib_ids, removed, "unit")
    _, dense = _walk_streams(decoder, calib_ids, removed, "dense")
    def gap(unit_):  # relative; (h + y) - h differs from y by float32 rounding only
        return float((dense[unit_].xy - unit[unit_].xy).norm() / unit[unit_].xy.norm())

    assert gap(("ffn", 1)) < 1e-4
    assert gap(("attn", 3)) > 1e-2


def test_dense_target_pulls_the_stream_back_to_the_dense_model(stories, calib_ids):
    """A full-rank dense-target bypass is the affine map that brings the stream right after it
    closest to the dense stream (in the per-token metric), so it must beat the unit target there."""
    decoder = Decoder(stories[0])
    removed = [("attn", 1), ("ffn", 1), ("ffn", 2)]
    reference, _ = _walk_streams(decoder, calib_ids, [], "unit")
    errors = {}
    for target in ("unit", "dense"):
        streams, _ = _walk_streams(decoder, calib_ids, removed, target)
        h, dense_h = streams[("ffn", 2)], reference[("ffn", 2)]
        weights = token_weights(streams[("attn", 2)], "per_token")  # the fit's: of the stream it adds to
        errors[target] = float((weights * (h - dense_h).double().pow(2).sum(-1)).sum())
    assert errors["dense"] < 0.99 * errors["unit"], errors


def test_unknown_target_is_refused(stories, calib_ids):
    with pytest.raises(ValueError, match="Unknown target 'teacher'"):
        walk(Decoder(stories[0]), calib_ids, target="teacher", progress=False)
