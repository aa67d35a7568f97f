"""The sweep on stories260K, small: every output is written, the cache makes a second run
recompute nothing, an interrupted sweep resumes, other SubFit settings remake only the SubFit rows,
and a cache made with other calibration settings is refused."""
import json
import sys
from pathlib import Path

import pytest

from subfit.cli import main
from subfit.files import OutputError
from subfit.plan import Plan

SWEEP = Path(__file__).resolve().parents[1] / "bench" / "sweep"
sys.path.insert(0, str(SWEEP))
from sweep import SweepConfig, _row_metrics, run_sweep  # noqa: E402
from sweep_report import markdown  # noqa: E402

METHODS = ["subfit", "subfit-layer", "subfit-delete", "shortgpt", "replaceme", "llm-drop"]
LEVELS = [0.125, 0.25]


CHOICE_TASK = """task: pets
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
output_type: multiple_choice
test_split: test
doc_to_text: "{{{{query}}}}"
doc_to_target: gold
doc_to_choice: choices
metric_list:
  - metric: acc
  - metric: acc_norm
"""
CLOZE_TASK = """task: cloze
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
output_type: loglikelihood
test_split: test
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{' ' + continuation}}}}"
metric_list:
  - metric: acc
"""


@pytest.fixture(scope="module")
def files(tinystories_file, tmp_path_factory):
    """Calibration and held-out text from two halves of the TinyStories file, and a folder of two
    lm-eval tasks over local files: multiple choice (acc, acc_norm) and a cloze (acc only)."""
    pytest.importorskip("lm_eval", reason="the sweep scores tasks with lm-evaluation-harness: pip install -e '.[eval]'")
    folder = tmp_path_factory.mktemp("sweep_data")
    text = tinystories_file.read_text()
    calib, heldout = folder / "calib.txt", folder / "heldout.txt"
    calib.write_text(text[:60_000])
    heldout.write_text(text[-12_000:])
    choice = folder / "pets.jsonl"
    choice.write_text("\n".join(json.dumps({"query": f"Question: Tim had a {a}. What did Tim have?\nAnswer:",
                                            "choices": [a, b], "gold": 0})
                                for a, b in [("dog", "car"), ("cat", "tree"), ("ball", "sun"), ("toy", "moon")]))
    cloze = folder / "cloze.jsonl"
    cloze.write_text("\n".join(json.dumps({"context": c, "continuation": w}) for c, w in [
        ("Once upon a time, there was a little girl named Lily. She liked to play with her", "toys"),
        ("The sun was shining and the birds were", "singing")]))
    tasks = folder / "tasks"
    tasks.mkdir()
    (tasks / "pets.yaml").write_text(CHOICE_TASK.format(path=choice))
    (tasks / "cloze.yaml").write_text(CLOZE_TASK.format(path=cloze))
    return calib, heldout, tasks


def config(stories_dir, files, tmp_path, **changes):
    calib, heldout, tasks = files
    base = dict(model=str(stories_dir), calib=str(calib), out=str(tmp_path / "results" / "sweep"),
                cache=str(tmp_path / "cache"), ppl=str(heldout), tasks=["pets", "cloze"], include_path=str(tasks),
                calib_samples=16, calib_len=64,
                levels=LEVELS, methods=METHODS, window=256, max_tokens=2048, limit=None, agreement=True,
                subfit={"step": 0.75, "score_samples": 8, "selection_draws": 1}, map_levels=[0.25, 0.125])
    return SweepConfig(**{**base, **changes})


def test_sweep_outputs_cache_and_resume(stories_dir, files, tmp_path):
    results = run_sweep(config(stories_dir, files, tmp_path))
    rows = {(r["method"], r["level"]): r for r in results["rows"]}
    assert set(rows) == {(m, l) for m in METHODS for l in LEVELS}
    # Whole layers do not fit in 12.5% of stories260K's block parameters: said, not hidden.
    assert "Raise the sparsity" in rows[("subfit-layer", 0.125)]["error"]
    for key, row in rows.items():
        if "error" in row:
            continue
        assert row["sparsity"] == row["removed_params"] / results["model"]["block_params"]
        assert row["ppl"] > results["dense"]["ppl"] * 0.5 and row["ppl_ratio"] == row["ppl"] / results["dense"]["ppl"]
        assert 0 <= row["top1_agreement"] <= 1 and row["kl"] >= 0
        assert set(row["tasks"]) == {"pets", "cloze"} and row["mean_retention"] >= 0
        assert len(row["layer_map"].split()) == 5 and row["removed_units"]
    assert rows[("replaceme", 0.25)]["bypass_params"] > 0 and rows[("shortgpt", 0.25)]["bypass_params"] == 0
    # 12.5% and 25% both round to one layer here: the same plan is evaluated once.
    assert rows[("shortgpt", 0.125)]["removed_units"] == rows[("shortgpt", 0.25)]["removed_units"]
    assert "shortgpt@0.25" in results["computed_this_run"]["reused_evals"]
    assert "shortgpt@0.25" not in results["computed_this_run"]["evals"]
    assert rows[("shortgpt", 0.125)]["ppl"] == rows[("shortgpt", 0.25)]["ppl"]
    assert rows[("subfit", 0.25)]["kv_reduction"] == rows[("subfit", 0.25)]["removed_attn"] / 5
    # The deletion ablation is SubFit's own selection, bypasses dropped.
    assert rows[("subfit-delete", 0.25)]["removed_units"] == rows[("subfit", 0.25)]["removed_units"]
    assert rows[("subfit-delete", 0.25)]["bypass_params"] == 0
    md = (tmp_path / "results" / "sweep.md").read_text()
    assert "| subfit |" in md and "Perplexity ratio" in md and "n/a" in md
    # Paired against SubFit on the same windows and examples: the per-example path agrees with
    # the aggregate figures.
    for (method, level), row in rows.items():
        if method == "subfit" or "error" in row:
            assert "subfit_paired" not in row
            continue
        paired, ours = row["subfit_paired"], rows[("subfit", level)]
        assert paired["ppl_ratio"] == pytest.approx(ours["ppl"] / row["ppl"], rel=1e-9)
        assert paired["mean_retention_diff"] == pytest.approx(ours["mean_retention"] - row["mean_retention"])
        assert paired["mean_retention_diff_stderr"] >= 0 and paired["subfit_sparsity"] == ours["sparsity"]
    assert "SubFit against each method, paired" in md
    for suffix in ("_quality.png", "_layers.png", "_layers_0.125.png"):
        png = (tmp_path / "results" / f"sweep{suffix}").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert json.loads((tmp_path / "results" / "sweep.json").read_text())["rows"] == json.loads(json.dumps(results["rows"]))

    # A second run recomputes nothing: no walk, no plan, no evaluation is redone; it replaces the
    # results only when asked to, and is refused before any work otherwise.
    cache = tmp_path / "cache"
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(OutputError, match=r"sweep.json already exists; choose another path or pass --overwrite"):
        run_sweep(config(stories_dir, files, tmp_path))
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()} == stamps
    stamps = {p: t for p, t in stamps.items() if cache in p.parents}
    again = run_sweep(config(stories_dir, files, tmp_path), overwrite=True)
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file()} == stamps
    assert again["computed_this_run"] == {"walks": [], "plans": [], "evals": [], "reused_evals": []}
    assert again["rows"] == results["rows"]

    # Interrupted after all but one plan: only that one is made (and evaluated) again, identically.
    lost = cache / "plans" / "replaceme@0.25"
    before = Plan.load(lost)
    for p in lost.iterdir():
        p.unlink()
    lost.rmdir()
    (cache / "evals" / "replaceme@0.25.json").unlink()
    resumed = run_sweep(config(stories_dir, files, tmp_path), overwrite=True)
    # The dense scores come from the cache; ReplaceMe's fit walk is redone for the lost level only.
    done = resumed["computed_this_run"]
    assert done["walks"] == ["replaceme_fit"] and done["plans"] == ["replaceme@0.25"]
    assert done["evals"] + done["reused_evals"] == ["replaceme@0.25"]  # (its twin at 12.5% may supply the scores)
    after = Plan.load(lost)
    assert after.attn == before.attn and all((after.tensors[k] - before.tensors[k]).abs().max() < 1e-6
                                             for k in before.tensors)
    redone = {lost / "plan.json", lost / "bypass.safetensors", cache / "evals" / "replaceme@0.25.json",
              cache / "timings.json"}
    assert [p for p, t in stamps.items() if p not in redone and p.stat().st_mtime_ns != t] == []

    # Other SubFit settings make the SubFit rows again and reuse every baseline.
    restep = {"step": 0.375, "score_samples": 8, "selection_draws": 1}
    changed = run_sweep(config(stories_dir, files, tmp_path, subfit=restep), overwrite=True)
    assert changed["computed_this_run"]["walks"] == []
    assert set(changed["computed_this_run"]["plans"]) == {
        f"{m}@{lv:g}" for m in ("subfit", "subfit-delete") for lv in LEVELS} | {"subfit-layer@0.25"}
    assert Plan.load(cache / "plans" / "subfit@0.25").method["sweep_settings"]["options"]["step"] == 0.375
    same = run_sweep(config(stories_dir, files, tmp_path, subfit=restep), overwrite=True)
    assert same["computed_this_run"]["plans"] == []

    # Other calibration settings never mix with this cache.
    with pytest.raises(ValueError, match="other settings"):
        run_sweep(config(stories_dir, files, tmp_path, calib_samples=12), overwrite=True)


def test_sweep_command(stories_dir, files, tmp_path, capsys):
    calib, heldout, tasks = files
    out = tmp_path / "cli"
    assert main(["sweep", str(stories_dir), "--calib", str(calib), "--calib-samples", "12", "--calib-len", "64",
                 "--ppl", str(heldout), "--window", "256", "--max-tokens", "1024", "--tasks", "pets", "--include-path", str(tasks),
                 "--methods", "uidl", "llm-drop", "--levels", "0.25", "--map-levels", "0.25",
                 "--cache", str(tmp_path / "c"), "--out", str(out)]) == 0
    assert "| uidl |" in capsys.readouterr().out or "| uidl |" in out.with_suffix(".md").read_text()
    report = json.loads(out.with_suffix(".json").read_text())
    assert [r["method"] for r in report["rows"]] == ["uidl", "llm-drop"]
    assert (tmp_path / "cli_layers.png").exists() and (tmp_path / "cli_quality.png").exists()


def test_retention_is_read_with_and_without_the_secondary_tasks(stories):
    """The core retention leaves out WinoGrande and LAMBADA (at chance / collapsing on small
    models); the mean keeps every task."""
    from subfit.models import Decoder, source_of

    model = stories[0]
    plan = Plan.empty(Decoder(model), source_of(model))
    task = lambda acc: {"acc": acc, "acc_norm": acc, "n": 100}  # noqa: E731
    dense = {"tasks": {"piqa": task(0.6), "arc_easy": task(0.5), "winogrande": task(0.5)}}
    report = {"tasks": {"piqa": task(0.3), "arc_easy": task(0.5), "winogrande": task(0.5)}}
    row = _row_metrics(plan, report, dense, "acc")
    assert row["core_retention"] == pytest.approx(75.0)
    assert row["mean_retention"] == pytest.approx(250.0 / 3)


@pytest.mark.parametrize("name", ["smollm2", "stories260k"])
def test_committed_sweep_tables_render_from_their_json(name):
    """The report is a pure function of the results: each committed sweep's JSON re-renders its
    committed markdown exactly, so the tables the README and docs cite come from the data."""
    results = SWEEP.parents[1] / "bench" / "results"
    data = json.loads((results / f"sweep_{name}.json").read_text())
    assert markdown(data, data["config"]["map_levels"]) == (results / f"sweep_{name}.md").read_text()
