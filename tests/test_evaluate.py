"""Evaluation: perplexity equals the model's own loss, windows score every token once, and the
paired statistics compare two models on the same windows and examples."""
import math
import statistics
import sys
from pathlib import Path

import pytest

from subfit.evaluation import _windows, paired_difference, perplexity, perplexity_ratio
from subfit.reference import ReferenceModel

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("n,window,stride", [(100, 32, 32), (100, 32, 8), (33, 32, 32), (5, 32, 16), (64, 64, 64)])
def test_windows_score_every_token_once(n, window, stride):
    """Each token is scored at most once, in order; only a window's first token (which has no
    context inside its window) may go unscored, as in the Hugging Face recipe."""
    scored, starts = [], set()
    for begin, end, first in _windows(n, window, stride):
        assert end - begin <= window
        starts.add(begin)
        scored += list(range(begin + first + 1, end))
    assert scored == sorted(set(scored)) and scored[-1] == n - 1
    assert set(range(1, n)) - set(scored) <= starts
    if stride < window:
        assert scored == list(range(1, n))


def test_perplexity_matches_the_hf_loss_on_one_window(stories):
    model, tokenizer, _ = stories
    ids = tokenizer("Once upon a time, there was a little girl named Lily. She loved to play.",
                    return_tensors="pt").input_ids
    loss = model(ids, labels=ids).loss.detach()
    result = perplexity(ReferenceModel(model), ids[0], window=64, progress=False)
    assert math.isclose(result["ppl"], math.exp(float(loss)), rel_tol=1e-5)
    same = perplexity(ReferenceModel(model), ids[0], window=64, dense_fn=ReferenceModel(model), progress=False)
    assert same["kl"] == pytest.approx(0.0, abs=1e-6) and same["top1_agreement"] == 1.0


def test_paired_difference_uses_the_per_example_differences():
    """Two models that mostly agree: the paired error is that of the per-example differences, far
    below the error of either accuracy alone."""
    a = {"correct": [1, 1, 0, 1, 0, 1, 1, 0], "correct_norm": [1] * 8}
    b = {"correct": [1, 0, 0, 1, 0, 1, 0, 0], "correct_norm": [1] * 7 + [0]}
    diff, se = paired_difference(a, b)
    d = [x - y for x, y in zip(a["correct"], b["correct"])]
    assert diff == pytest.approx(0.25) and se == pytest.approx(statistics.stdev(d) / math.sqrt(8))
    assert paired_difference(a, b, "acc_norm")[0] == pytest.approx(1 / 8)
    assert paired_difference(a, a) == (0.0, 0.0)
    with pytest.raises(ValueError, match="same examples"):
        paired_difference(a, {"correct": [1, 0]})
    with pytest.raises(ValueError, match="choose 'acc' or 'acc_norm'"):
        paired_difference(a, b, "f1")
    with pytest.raises(ValueError, match="evaluate it again"):
        paired_difference(a, {"acc": 0.5, "n": 8})


def test_perplexity_ratio_pairs_the_windows(stories):
    """The ratio is exactly the ratio of the two perplexities; a per-token loss shift that is the
    same in every window has no error; other windows are refused."""
    model, tokenizer, _ = stories
    ids = tokenizer("Once upon a time, there was a little girl named Lily. She loved to play outside. " * 6,
                    return_tensors="pt").input_ids[0]
    ref = ReferenceModel(model)
    hot = perplexity(lambda x: ref(x) * 1.3, ids, window=48, progress=False)
    cold = perplexity(ref, ids, window=48, progress=False)
    assert len(hot["window_nll"]) > 2
    ratio, log_se = perplexity_ratio(hot, cold)
    assert ratio == pytest.approx(hot["ppl"] / cold["ppl"], rel=1e-12) and log_se > 0
    shifted = {**cold, "window_nll": [v + 0.1 * n for v, n in zip(cold["window_nll"], cold["window_tokens"])]}
    ratio, log_se = perplexity_ratio(shifted, cold)
    assert ratio == pytest.approx(math.exp(0.1)) and log_se == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="evaluate it again"):
        perplexity_ratio(hot, {"ppl": cold["ppl"], "tokens": cold["tokens"]})
    with pytest.raises(ValueError, match="same text and windows"):
        perplexity_ratio(perplexity(ref, ids, window=32, progress=False), cold)


def test_committed_plans_compare_on_the_same_examples_with_a_paired_error(capsys):
    """`bench/compress/compare_evals.py` on committed reports of two 37.5% plans: a report against
    itself differs by nothing, the retention difference is the difference of the retentions, and
    its paired standard error is below what the two plans' own errors would give unpaired; task by
    task (`--per-task`) each difference is that of the task's accuracies, in points of dense."""
    sys.path.insert(0, str(ROOT / "bench" / "compress"))
    from compare_evals import DENSE, against_first, load_dense, load_report, main, retention

    dense = load_dense(DENSE)
    paths = [ROOT / "bench" / "results" / f"eval_375_seed{s}.json" for s in (0, 1)]
    first, other = (load_report(path) for path in paths)
    itself = against_first(first, first, dense)
    assert (itself["mean_retention_diff"], itself["mean_retention_diff_stderr"]) == (0.0, 0.0)
    (a, a_err), (b, b_err) = retention(first, dense), retention(other, dense)
    paired = against_first(other, first, dense)
    diff, diff_err = paired["mean_retention_diff"], paired["mean_retention_diff_stderr"]
    assert diff == pytest.approx(b - a, abs=1e-9)
    assert 0 < diff_err < math.hypot(a_err, b_err)
    assert paired["ppl_ratio"] == pytest.approx(other["perplexity"]["ppl"] / first["perplexity"]["ppl"], rel=1e-6)
    assert main([str(path) for path in paths] + ["--per-task"]) == 0
    row = capsys.readouterr().out.splitlines()[-1]
    assert row.startswith(f"| {paths[1]} | ")
    printed = [float(cell.split(" ± ")[0]) for cell in row.strip("| ").split(" | ")[1:]]
    expected = [100 * (other["tasks"][t]["acc"] - first["tasks"][t]["acc"]) / dense["tasks"][t]["acc"] for t in first["tasks"]]
    assert len(printed) == 5 and printed == pytest.approx(expected, abs=0.051)


def test_compare_evals_pairs_give_each_difference_and_two_errors_of_their_mean(capsys):
    """`--pairs` on committed reports of two codes' 37.5% plans at three seeds: the mean is that of
    the pairs' paired differences, its error from the examples combines theirs, its error between
    pairs is their standard deviation over the square root of three; an odd count, or --per-task
    beside --pairs, is refused."""
    sys.path.insert(0, str(ROOT / "bench" / "compress"))
    from compare_evals import DENSE, against_first, load_dense, load_report, main, over_pairs

    dense = load_dense(DENSE)
    paths = [str(ROOT / "bench" / "results" / f"eval_375_seed{s}{code}.json") for s in (0, 1, 3) for code in ("_earlier", "")]
    reports = [load_report(path) for path in paths]
    pairs = [against_first(reports[i + 1], reports[i], dense) for i in (0, 2, 4)]
    diffs = [p["mean_retention_diff"] for p in pairs]
    lines, summary = over_pairs(paths, reports, dense)
    assert summary["mean_retention_diff"] == pytest.approx(statistics.mean(diffs))
    assert summary["stderr_between_pairs"] == pytest.approx(statistics.stdev(diffs) / math.sqrt(3))
    assert summary["stderr_from_examples"] == pytest.approx(
        math.sqrt(sum(p["mean_retention_diff_stderr"] ** 2 for p in pairs)) / 3)
    assert len(set(diffs)) == 3 and len(lines) == 2 + 3 + 1
    assert main(paths + ["--pairs"]) == 0 and "mean of 3 pairs" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(paths[:3] + ["--pairs"])
    assert "two or more pairs" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(paths + ["--pairs", "--per-task"])
    assert "give one" in capsys.readouterr().err


def test_compare_evals_refuses_a_file_that_is_not_an_eval_report(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "bench" / "compress"))
    from compare_evals import main

    bad = tmp_path / "plan.json"
    bad.write_text('{"layers": []}')
    with pytest.raises(SystemExit):
        main([str(ROOT / "bench" / "results" / "eval_375_seed0.json"), str(bad)])
    assert "not a readable `subfit eval" in capsys.readouterr().err


def test_compare_evals_takes_perplexity_only_reports_against_a_dense_report_of_their_text(capsys):
    """Reports without tasks compare on perplexity alone, against the dense model's report on the
    same text; reports of two texts (raw and detokenized WikiText-2) are refused, not divided."""
    sys.path.insert(0, str(ROOT / "bench" / "compress"))
    from compare_evals import load_dense, load_report, main

    results = ROOT / "bench" / "results"
    first, other = results / "eval_375_seed1_previous_detok.json", results / "eval_375_seed1_detok.json"
    dense = results / "eval_dense_detok.json"
    assert main([str(first), str(other), "--dense", str(dense)]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith(f"| {results}")]
    ratio_to_dense = load_report(other)["perplexity"]["ppl"] / load_dense(dense)["ppl"]
    assert f"| {ratio_to_dense:.3f}x | – |" in rows[1] and rows[1].endswith("| – |")
    with pytest.raises(SystemExit):
        main([str(results / "eval_375_seed1.json"), str(other)])
    assert "scored different texts" in capsys.readouterr().err


def test_detokenize_wikitext_undoes_the_raw_format_and_keeps_an_existing_file(tmp_path, capsys):
    """`bench/tasks/detokenize_wikitext.py` with lm-eval's own detokenizer: the raw format's number
    separators and split punctuation are joined, and an existing output is refused, not replaced."""
    sys.path.insert(0, str(ROOT / "bench" / "tasks"))
    from detokenize_wikitext import main

    raw, out = tmp_path / "wiki.raw", tmp_path / "wiki.txt"
    raw.write_bytes(b" = Valkyria = \r\n The 2 @,@ 000 @-@ strong army , led by Kurt , won .\r\n")
    assert main([str(raw), str(out)]) == 0
    assert out.read_text() == " = Valkyria =\nThe 2,000-strong army, led by Kurt, won .\n"  # CRLF normalised
    out.write_text("kept")
    with pytest.raises(SystemExit):
        main([str(raw), str(out)])
    assert "already exists" in capsys.readouterr().err and out.read_text() == "kept"


def test_plan_divergence_is_nothing_for_a_keep_all_plan_and_the_loss_for_a_compressed_one(
        stories_dir, stories, small_plan, tmp_path, capsys, one_thread):
    """`bench/compress/plan_divergence.py` on text sampled from stories260K: a plan that keeps
    everything lies nowhere from the dense model; a compressed plan's KL is positive and its loss
    is the mean next-token loss its own logits give, computed here separately; a missing --calib
    and a folder that holds no plan are refused with what to give."""
    import json

    import torch

    sys.path.insert(0, str(ROOT / "bench" / "compress"))
    from plan_divergence import main, scoring_text

    from subfit.models import Decoder
    from subfit.plan import Plan

    model, tokenizer, source = stories
    keep_all, compressed = tmp_path / "keep_all", tmp_path / "compressed"
    Plan.empty(Decoder(model), source).save(keep_all)
    small_plan.save(compressed)
    args = [str(keep_all), str(compressed), "--model", str(stories_dir), "--text", "self", "--seed", "5",
            "--samples", "3", "--length", "40"]
    assert main(args + ["--json", str(tmp_path / "d.json")]) == 0
    plans = json.loads((tmp_path / "d.json").read_text())["plans"]
    assert plans[str(keep_all)]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert plans[str(compressed)]["kl"] > 1e-3
    ids = scoring_text(model, tokenizer, "self", None, 5, 3, 40)
    with torch.no_grad():
        logits = ReferenceModel(model, small_plan)(ids)[:, :-1].float()
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
    assert plans[str(compressed)]["nll"] == pytest.approx(float(loss), rel=2e-2)  # bf16 matmuls in the tool
    assert f"| {compressed} | " in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main([str(compressed), "--text", "held-out"])
    assert "give --calib FILE" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--model", str(stories_dir), "--text", "self"])
    assert str(tmp_path) in capsys.readouterr().err  # not a plan folder: named, no traceback
