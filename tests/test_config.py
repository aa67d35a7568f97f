"""SubFitConfig and DevOptions: bad values are refused when the object is made (before any
model loads), defaults resolve by calibration source, and a plan's record rebuilds its config."""
import math

import pytest

from subfit.config import (MAX_SCORE_SAMPLES, SAMPLED_CALIBRATION, TEXT_CALIBRATION, VALIDATION_SAMPLES, DevOptions, SubFitConfig,
                           check_sparsity)


@pytest.mark.parametrize("fields, message", [
    ({"attn_rank": 0}, "attn_rank=0 must be a whole number >= 1"),
    ({"attn_rank": -3}, "attn_rank=-3"),
    ({"ffn_rank": 2.5}, "ffn_rank=2.5"),
    ({"ridge": 0.0}, "ridge=0.0 must be a positive number"),
    ({"ridge": math.nan}, "ridge=nan"),
    ({"calib_samples": 0}, "calib_samples=0"),
    ({"calib_len": 1}, "calib_len=1"),
    ({"seed": 1.5}, "seed=1.5"),
    ({"selection_draws": True}, "selection_draws=True"),
    ({"calib_samples": VALIDATION_SAMPLES + 1}, "holds out 16 calibration sequences"),
    ({"device": 3}, "device=3"),
])
def test_bad_config_is_refused_with_what_to_do(fields, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        SubFitConfig(**fields)


@pytest.mark.parametrize("fields", [{"granularity": "block"}, {"step": 0}, {"step": 0.9}, {"contiguous": 1},
                                    {"score_samples": 0}, {"shortlist": -1}, {"batch_size": 2.0},
                                    {"draw": -1}, {"draw": 1.0}])
def test_bad_options_are_refused(fields):
    with pytest.raises(ValueError, match=next(iter(fields))):
        DevOptions(**fields)


def test_scoring_walks_see_half_the_fitting_sequences_at_most_64():
    """By default each scoring walk sees half the fitting sequences (so the draws score on other
    halves of them), at most MAX_SCORE_SAMPLES; a set value wins."""
    dev = DevOptions()
    fit = {"sampled": SAMPLED_CALIBRATION[0] - VALIDATION_SAMPLES, "text": TEXT_CALIBRATION[0] - VALIDATION_SAMPLES}
    assert dev.scoring_sequences(fit["sampled"]) == 32
    assert dev.scoring_sequences(fit["text"]) == MAX_SCORE_SAMPLES == 64
    assert dev.scoring_sequences(1) == 1
    assert DevOptions(score_samples=48).scoring_sequences(fit["text"]) == 48


def test_calibration_size_by_source():
    assert SubFitConfig().calibration_size(sampled=False) == TEXT_CALIBRATION
    assert SubFitConfig().calibration_size(sampled=True) == SAMPLED_CALIBRATION
    assert SubFitConfig(calib_samples=40).calibration_size(sampled=True) == (40, SAMPLED_CALIBRATION[1])
    assert SubFitConfig(selection_draws=1, calib_samples=4, calib_len=8).calibration_size(False) == (4, 8)


def test_recorded_config_rebuilds_the_config():
    config = SubFitConfig(calib_samples=64, seed=5, attn_rank=16, selection_draws=1, device="cpu")
    assert SubFitConfig(**config.record()) == config
    assert config.ranks(576) == {"attn": 16, "ffn": 288} and SubFitConfig().ranks(2048) == {"attn": 256, "ffn": 1024}


@pytest.mark.parametrize("value", [-0.1, 0.76, math.nan, math.inf, True, "0.25"])
def test_sparsity_is_checked_in_one_place(value):
    with pytest.raises(ValueError, match="between 0 and 0.75"):
        check_sparsity(value)
