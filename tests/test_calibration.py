"""Calibration windows are seeded, distinct, of the asked size, or refused."""
import pytest
import torch

from subfit.calibration import CalibrationError, from_model, from_text_file, load_calibration, sample_windows


def test_text_windows_are_seeded_and_distinct(stories, tinystories_file):
    tok = stories[1]
    a = from_text_file(tok, tinystories_file, 20, 64, seed=3)
    assert a.shape == (20, 64)
    assert torch.equal(a, from_text_file(tok, tinystories_file, 20, 64, seed=3))
    assert not torch.equal(a, from_text_file(tok, tinystories_file, 20, 64, seed=4))
    assert len({tuple(r.tolist()) for r in a}) == 20


def test_too_little_text_says_how_much_there_is(stories, tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("One short story.\n\nAnother one.")
    with pytest.raises(CalibrationError, match=r"holds \d+ tokens = 0 sequences of 64 tokens, but 2 were asked"):
        from_text_file(stories[1], path, 2, 64)


def test_missing_file_and_bad_sizes(stories, tmp_path):
    model, tok, _ = stories
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_calibration(str(tmp_path / "nope.txt"), model, tok, 2, 16)
    with pytest.raises(CalibrationError, match="at least"):
        load_calibration(None, model, tok, 0, 16)


def test_self_generated_calibration_is_seeded(stories):
    """Same seed, same text; and the caller's random state is left as it was."""
    model, tok, _ = stories
    torch.manual_seed(7)
    state = torch.random.get_rng_state()
    a = from_model(model, tok, 3, 24, seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert a.shape == (3, 24) and a[:, 0].eq(tok.bos_token_id).all()
    assert torch.equal(a, from_model(model, tok, 3, 24, seed=1))
    assert not torch.equal(a, from_model(model, tok, 3, 24, seed=2))


def test_self_generated_calibration_needs_a_start_token(stories_dir):
    from transformers import AutoTokenizer

    from subfit import models

    model, _, _ = models.load(stories_dir)
    tok = AutoTokenizer.from_pretrained(stories_dir)
    tok.bos_token, tok.eos_token = None, None
    with pytest.raises(CalibrationError, match="has neither. Pass calibration text"):
        from_model(model, tok, 2, 8)


def test_skipped_windows_are_disjoint_from_the_drawn_ones():
    """skip=N continues the same seeded order: held-out windows never overlap calibration's N."""
    stream = torch.arange(40 * 7)
    drawn = sample_windows(stream, 10, 7, seed=3, what="stream")
    held = sample_windows(stream, 5, 7, seed=3, what="stream", skip=10)
    assert torch.equal(drawn, sample_windows(stream, 10, 7, seed=3, what="stream", skip=0))
    assert not set(drawn[:, 0].tolist()) & set(held[:, 0].tolist())
    assert held.shape == (5, 7) and bool((held[:, 1:] - held[:, :-1] == 1).all())
    with pytest.raises(CalibrationError, match="but 45 were asked for"):
        sample_windows(stream, 5, 7, seed=3, what="stream", skip=40)
