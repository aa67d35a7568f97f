"""`subfit generate` / `subfit bench` as registered by `add_commands`, on the tiny real model."""
import argparse

import pytest
import torch
import transformers

from subfit.reference import ReferenceModel
from subfit.runtime.bench import HFContender
from subfit.runtime.cli import add_commands
from subfit.hardware import cpu_bf16_units


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="subfit")
    add_commands(p.add_subparsers(dest="command", required=True))
    return p


def test_generate_streams_text(stories_dir, capsys):
    args = parser().parse_args(["generate", str(stories_dir), "--prompt", "Once upon a time", "--max-new-tokens", "12",
                                "--device", "cpu", "--dtype", "float32"])
    assert args.run(args) == 0
    out, err = capsys.readouterr()
    assert out.startswith("Once upon a time, there was a little girl")
    assert "12 tokens" in err and "tokens/s" in err


def test_generate_plan_with_sampling(stories, plan_of, tmp_path, capsys):
    model, _, source = stories
    plan_of(model, source, "p25").save(tmp_path / "plan")
    args = parser().parse_args(["generate", str(tmp_path / "plan"), "--prompt", "Once", "--max-new-tokens", "5",
                                "--temperature", "0.8", "--top-p", "0.9", "--top-k", "20", "--seed", "1"])
    assert args.run(args) == 0
    assert capsys.readouterr().out.startswith("Once")


@pytest.mark.parametrize("argv, message", [
    (["generate", "x", "--prompt", "a", "--max-new-tokens", "0"], "positive integer"),
    (["generate", "x", "--prompt", "a", "--temperature", "-1"], "a temperature >= 0"),
    (["generate", "x", "--prompt", "a", "--top-p", "1.5"], "a top-p in (0, 1]"),
    (["generate", "x", "--prompt", "a", "--dtype", "int8"], "invalid choice"),
    (["generate", "x"], "--prompt"),
    (["bench", "--synthetic", "1.5"], "a sparsity (fraction of transformer-block parameters) between 0 and 0.75"),
])
def test_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit):
        parser().parse_args(argv)
    assert message in capsys.readouterr().err


def test_top_p_without_temperature_is_refused(stories_dir):
    args = parser().parse_args(["generate", str(stories_dir), "--prompt", "a", "--top-p", "0.9"])
    with pytest.raises(ValueError, match="--temperature"):
        args.run(args)


@pytest.mark.parametrize("command", ["generate", "bench"])
def test_help_has_examples(command, capsys):
    with pytest.raises(SystemExit):
        parser().parse_args([command, "--help"])
    assert "examples:" in capsys.readouterr().out


def test_bench_prints_a_table(stories_dir, stories, plan_of, tmp_path, capsys):
    model, _, source = stories
    plan_of(model, source, "p375").save(tmp_path / "plan")
    args = parser().parse_args(["bench", str(tmp_path / "plan"), "--base", str(stories_dir), "--prompt-len", "8",
                                "--new-tokens", "4", "--rounds", "1", "--synthetic", "0.25", "--device", "cpu"])
    assert args.run(args) == 0
    out = capsys.readouterr().out
    default = "bfloat16" if cpu_bf16_units() else "float32"
    rows = ["transformers eager (dense, float32)", "runtime dense (float32)", f"runtime dense ({default})",
            f"runtime plan 39.9% ({default})", f"runtime synthetic 25.0% ({default})"]
    assert [line.split(" | ")[0].lstrip("| ") for line in out.splitlines()[3:]] == list(dict.fromkeys(rows))
    header = out.splitlines()[0]  # what the figures depend on, beside them
    assert f"torch {torch.__version__}, transformers {transformers.__version__}" in header and "bf16 units" in header


def test_transformers_row_decodes_with_its_cache(stories):
    """The baseline row must time real cached decoding: a cache passed under a name the installed
    transformers ignores would decode each token without context and give other tokens."""
    model = stories[0]
    ids = torch.randint(3, model.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(0))
    contender = HFContender(model)
    tokens = [contender.prefill(ids)]
    for _ in range(5):
        tokens.append(contender.decode(tokens[-1]))
    assert torch.equal(torch.cat(tokens, 1), ReferenceModel(model).greedy(ids, 6))
