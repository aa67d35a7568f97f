"""The CLI end to end on stories260K: compress, eval (table + JSON), help and bad input."""
import json
import re

import pytest

from subfit.cli import main


@pytest.fixture
def small_text(tinystories_file, tmp_path):
    path = tmp_path / "stories.txt"
    path.write_text(tinystories_file.read_text()[:40_000])
    return path


def test_compress_then_eval(stories_dir, small_text, tmp_path, capsys):
    out = tmp_path / "plan"
    assert main(["compress", str(stories_dir), "--sparsity", "0.25", "--calib", str(small_text),
                 "--calib-samples", "8", "--calib-len", "64", "--selection-draws", "1", "--out", str(out)]) == 0
    assert (out / "plan.json").exists() and (out / "bypass.safetensors").exists()
    recorded = json.loads((out / "plan.json").read_text())["method"]["config"]
    assert recorded["calib_samples"] == 8 and recorded["selection_draws"] == 1
    assert "sparsity" in capsys.readouterr().err
    report_path = tmp_path / "report.json"
    assert main(["eval", str(out), "--ppl", str(small_text), "--max-tokens", "1500", "--window", "256",
                 "--json", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    dense, compressed = report["columns"]["dense"], report["columns"]["compressed"]
    assert compressed["perplexity"]["ppl"] > 1 and dense["perplexity"]["ppl"] > 1
    assert 0 <= compressed["perplexity"]["top1_agreement"] <= 1 and compressed["perplexity"]["kl"] >= 0
    assert report["accounting"]["sparsity"] <= 0.25
    # An existing plan is never overwritten silently.
    capsys.readouterr()
    assert main(["compress", str(stories_dir), "--sparsity", "0.25", "--calib", str(small_text), "--out", str(out)]) == 2
    assert "already holds a subfit plan" in " ".join(capsys.readouterr().err.split())


def test_default_draws_need_calibration_to_hold_out(stories_dir, small_text, tmp_path, capsys):
    """The default three selection draws hold out 16 sequences: too few are refused, with both fixes."""
    out = tmp_path / "plan"
    argv = ["compress", str(stories_dir), "--sparsity", "0.25", "--calib", str(small_text), "--calib-samples", "8",
            "--calib-len", "64", "--out", str(out)]
    assert main(argv) == 2
    assert re.search(r"selection_draws=3 holds out 16 .* but calib_samples=8\..*--calib-samples.*--selection-draws 1",
                     " ".join(capsys.readouterr().err.split()))
    assert not out.exists()


@pytest.mark.parametrize("argv,message", [
    (["compress", "--sparsity", "0.9", "--out", "p"], "between 0 and 0.75, e.g. 0.25, got 0.9"),
    (["compress", "--sparsity", "0.25", "--calib", "x.txt", "--out", "p"], "x.txt does not exist"),
    (["compress", "--sparsity", "0.25", "--attn-rank", "0", "--out", "p"], "expected a positive integer, got 0"),
    (["compress", "--sparsity", "0.25", "--method", "magic", "--out", "p"], "invalid choice: 'magic'"),
    (["compress", "--method", "shortgpt", "--sparsity", "0.25", "--selection-draws", "3", "--out", "p"],
     "do not apply to --method shortgpt"),
    (["eval", "somewhere", "--ppl", "missing.txt"], "missing.txt does not exist"),
    (["eval", "somewhere"], "nothing to evaluate"),
])
def test_bad_input_is_explained(argv, message, stories_dir, tmp_path, capsys):
    places = {"somewhere": str(stories_dir), "p": str(tmp_path / "p")}  # a refused run must not write a plan here
    argv = [places.get(a, a) for a in argv]
    try:
        code = main(argv)
    except SystemExit as e:  # argparse and early checks exit before any model is loaded
        code, text = e.code, str(e.code)
    else:
        text = capsys.readouterr().err
    assert code not in (0, None)
    assert re.search(message, text + capsys.readouterr().err)


@pytest.mark.parametrize("command", ["compress", "eval"])
def test_help_has_examples(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0 and "examples:" in capsys.readouterr().out
