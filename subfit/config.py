"""The settings of a compression, in two small objects, and the checks they must pass.

`SubFitConfig` holds what a user tunes (how much calibration, the seed, bypass ranks, the ridge,
selection draws, the device); every plan records it. `DevOptions` holds the method's ablations
and development settings, which only the quality sweep and experiments change. Both are checked
when they are made, before any model is loaded, so a bad value never costs a compress run.

Torch-free on purpose: the command line parses and checks arguments without importing torch
(only a named device is checked with torch, against the devices this machine has).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

MAX_SPARSITY = 0.75  # beyond this fraction of block parameters no method here yields a usable model
VALIDATION_SAMPLES = 16  # calibration sequences held out to choose between selection draws
# Default calibration, sequences x tokens: of text, 256 to fit on and 16 to choose between draws; text
# sampled from the model itself costs a decode per token, so less of it.
TEXT_CALIBRATION = (256 + VALIDATION_SAMPLES, 512)
SAMPLED_CALIBRATION = (64 + VALIDATION_SAMPLES, 256)
STEP = 1 / 32  # sparsity committed per scoring walk (4 walks at 12.5%, 8 at 25%, 12 at 37.5%)
MAX_SCORE_SAMPLES = 64  # sequences per scoring walk at most; by default half the fitting sequences
GRANULARITIES = ("unit", "layer")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_sparsity(value) -> float:
    """A target sparsity: the fraction of transformer-block parameters to remove, 0 to MAX_SPARSITY."""
    if not _is_real(value) or not 0.0 <= value <= MAX_SPARSITY:
        raise ValueError(f"sparsity={value!r} is out of range: give a fraction of transformer-block parameters "
                         f"between 0 and {MAX_SPARSITY} (e.g. 0.125, 0.25, 0.375).")
    return float(value)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass(frozen=True)
class SubFitConfig:
    """What a user tunes. Defaults: 272 x 512 calibration tokens of text (256 to fit on, 16 held out
    to choose between three selection draws) or 80 x 256 sampled from the model, attention bypass
    rank hidden/8, FeedForward basis rank hidden/2, ridge 1e-3 of the mean input variance."""

    calib_samples: int | None = None  # calibration sequences (None: TEXT_ or SAMPLED_CALIBRATION's)
    calib_len: int | None = None  # tokens per sequence (None: likewise)
    seed: int = 0  # calibration sampling, draws' orders
    attn_rank: int | None = None  # attention bypass rank (None: hidden/8)
    ffn_rank: int | None = None  # rank of the FeedForward bypasses' shared input basis (None: hidden/2)
    ridge: float = 1e-3  # relative to the mean input variance of each solve
    selection_draws: int = 3  # greedy selections on other scoring sequences; the best on held-out text is kept
    device: str | None = None  # where the layer-by-layer walk runs (None: the model's device)

    def __post_init__(self) -> None:
        _require(self.calib_samples is None or (_is_int(self.calib_samples) and self.calib_samples >= 1),
                 f"calib_samples={self.calib_samples!r} must be a whole number of sequences >= 1, or None.")
        _require(self.calib_len is None or (_is_int(self.calib_len) and self.calib_len >= 2),
                 f"calib_len={self.calib_len!r} must be a whole number of tokens >= 2, or None.")
        _require(_is_int(self.seed), f"seed={self.seed!r} must be a whole number.")
        for name in ("attn_rank", "ffn_rank"):
            rank = getattr(self, name)
            _require(rank is None or (_is_int(rank) and rank >= 1),
                     f"{name}={rank!r} must be a whole number >= 1, or None for the default.")
        _require(_is_real(self.ridge) and self.ridge > 0,
                 f"ridge={self.ridge!r} must be a positive number (e.g. 1e-3): it keeps every solve well conditioned.")
        _require(_is_int(self.selection_draws) and self.selection_draws >= 1,
                 f"selection_draws={self.selection_draws!r} must be a whole number >= 1 (1: one greedy selection).")
        _require(self.selection_draws == 1 or self.calib_samples is None or self.calib_samples >= VALIDATION_SAMPLES + 2,
                 f"selection_draws={self.selection_draws} holds out {VALIDATION_SAMPLES} calibration sequences to "
                 f"choose between draws and needs at least 2 more to fit on, but calib_samples={self.calib_samples}. "
                 f"Give more calibration (--calib-samples) or use one draw (--selection-draws 1).")
        _require(self.device is None or isinstance(self.device, str),
                 f"device={self.device!r} must be a device name such as 'cpu' or 'cuda', or None.")
        if self.device is not None:
            from subfit.devices import check_device  # torch: only when a device is named

            check_device(self.device)

    def calibration_size(self, sampled: bool, max_positions: int | None = None) -> tuple[int, int]:
        """(sequences, tokens per sequence) of calibration text from a file or dataset, or `sampled`
        from the model; a default length never exceeds the model's `max_positions`."""
        samples, length = SAMPLED_CALIBRATION if sampled else TEXT_CALIBRATION
        return self.calib_samples or samples, self.calib_len or min(length, max_positions or length)

    def ranks(self, hidden_size: int) -> dict[str, int]:
        """Bypass ranks for a model of `hidden_size`: attention hidden/8 and FeedForward hidden/2 by
        default (multiples of 8), so bypasses stay about a tenth of what they replace."""
        return {"attn": self.attn_rank or max(8, 8 * round(hidden_size / 64)),
                "ffn": self.ffn_rank or max(8, 8 * round(hidden_size / 16))}

    def record(self) -> dict:
        """What a plan stores: `SubFitConfig(**plan.method["config"])` makes the same config."""
        return asdict(self)


@dataclass(frozen=True)
class DevOptions:
    """Ablations and development settings of the method (the quality sweep's variants).

    granularity="layer" removes whole layers, contiguous=True one contiguous run of units,
    bypass=False deletes the chosen units instead of fitting bypasses. The rest set the greedy:
    `step` of sparsity committed per scoring walk, `score_samples` sequences per scoring walk (None:
    half the fitting sequences, at most MAX_SCORE_SAMPLES, so that the draws score on other halves),
    `shortlist` units per walk re-ranked by their output KL on `probe_samples` held-out sequences,
    and `batch_size` sequences per forward of a walk (memory, not results). `draw` runs only that
    one of the selection draws (None: all), to study one draw alone; it is what that draw is in a
    full compress."""

    granularity: str = "unit"
    contiguous: bool = False
    bypass: bool = True
    step: float = STEP
    score_samples: int | None = None
    probe_samples: int = 2
    shortlist: int = 24
    batch_size: int = 8
    draw: int | None = None

    def __post_init__(self) -> None:
        _require(self.granularity in GRANULARITIES,
                 f"granularity={self.granularity!r}: choose one of {', '.join(GRANULARITIES)}.")
        for name in ("contiguous", "bypass"):
            _require(isinstance(getattr(self, name), bool), f"{name}={getattr(self, name)!r} must be True or False.")
        _require(_is_real(self.step) and 0 < self.step <= MAX_SPARSITY,
                 f"step={self.step!r} must be in (0, {MAX_SPARSITY}]: the sparsity committed per scoring walk.")
        for name in ("score_samples", "probe_samples", "shortlist", "batch_size"):
            value = getattr(self, name)
            _require((value is None and name == "score_samples") or (_is_int(value) and value >= 1),
                     f"{name}={value!r} must be a whole number >= 1.")
        _require(self.draw is None or (_is_int(self.draw) and self.draw >= 0),
                 f"draw={self.draw!r} must be a draw's number (0 for the first), or None for every draw.")

    def scoring_sequences(self, fit_sequences: int) -> int:
        """Sequences per scoring walk when `fit_sequences` are there to fit on."""
        return self.score_samples or max(1, min(MAX_SCORE_SAMPLES, fit_sequences // 2))

    def record(self) -> dict:
        return asdict(self)
