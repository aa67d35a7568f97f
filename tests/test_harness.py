"""lm-evaluation-harness on subfit (real lm-eval, real stories260K plan): the `lm_eval` command
offline on the local task files, each request type against the reference executor's own numbers,
the runtime against the reference executor, `subfit eval --tasks`, and clear errors."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from compress_settings import settings
import torch
import torch.nn.functional as F

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is optional: pip install -e '.[eval]'")

from lm_eval.api.instance import Instance  # noqa: E402

from subfit.cli import main  # noqa: E402
from subfit.harness import SubfitLM  # noqa: E402
from subfit.plan import Plan  # noqa: E402
from subfit.reference import ReferenceModel  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TASKS = REPO / "bench" / "tasks"


pytestmark = pytest.mark.usefixtures("one_thread")  # stories260K is tiny


@pytest.fixture(scope="module")
def assets(stories_dir) -> Path:
    folder = stories_dir.parents[1]
    if not (folder / "data" / "mc_eval" / "piqa.jsonl").exists():
        pytest.skip(f"task files not found in {folder}/data/mc_eval: set SUBFIT_ASSETS to the shared assets folder")
    return folder


@pytest.fixture(scope="module")
def offline(assets) -> dict:
    """Environment of a machine without network, the task files found through SUBFIT_ASSETS (and
    one thread: the model is tiny)."""
    return {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "SUBFIT_ASSETS": str(assets), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def plan_dir(stories, tinystories_file, tmp_path_factory) -> Path:
    """A real 25% plan of stories260K (one quick selection draw), saved like `subfit compress` does."""
    from subfit.calibration import from_text_file
    from subfit.compression import compress

    calib_ids = from_text_file(stories[1], tinystories_file, 24, 128, seed=0)
    plan = compress(stories[0], 0.25, calib_ids, **settings(step=0.25, score_samples=8, selection_draws=1))
    folder = tmp_path_factory.mktemp("plan")
    plan.save(folder)
    return folder


@pytest.fixture(scope="module")
def reference(stories, plan_dir) -> ReferenceModel:
    return ReferenceModel(stories[0], Plan.load(plan_dir))


def requests(kind: str, *args: tuple) -> list[Instance]:
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def continuation_logprob(ref: ReferenceModel, context_ids: list[int], continuation_ids: list[int]) -> float:
    """Summed log p of continuation_ids after context_ids, from one full-sequence forward."""
    ids = torch.tensor([context_ids + continuation_ids])
    logp = F.log_softmax(ref(ids)[0, :-1].float(), dim=-1)
    targets = ids[0, 1:]
    return float(logp[torch.arange(len(targets)), targets][-len(continuation_ids):].sum())


def test_lm_eval_command_runs_offline_on_a_plan(plan_dir, stories, reference, assets, offline, tmp_path):
    """The documented command, in a fresh process with the hub unreachable: every logged choice's
    log-likelihood is the reference executor's for PIQA's prompt, so its accuracy is too. (Most of
    its ~15 s is lm-eval indexing its own thousands of task files, which its command line always does.)"""
    out = tmp_path / "results"
    done = subprocess.run(
        [sys.executable, "-m", "subfit.harness", "--model", "subfit", "--model_args", f"plan={plan_dir},batch_size=8",
         "--tasks", "piqa_local", "--include_path", "bench/tasks", "--limit", "50", "--output_path", str(out),
         "--log_samples"],
        cwd=REPO, env={**os.environ, **offline, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(next(out.rglob("results_*.json")).read_text())["results"]["piqa_local"]
    samples = [json.loads(line) for line in next(out.rglob("samples_piqa_local_*.jsonl")).read_text().splitlines()]
    assert len(samples) == 50
    tokenizer = stories[1]
    docs = [json.loads(line) for line in (assets / "data" / "mc_eval" / "piqa.jsonl").read_text().splitlines()[:50]]
    correct = []
    for sample in sorted(samples, key=lambda s: s["doc_id"]):
        doc = docs[sample["doc_id"]]
        context = doc["query"].rstrip() + "\nAnswer:"
        context_ids = tokenizer(context).input_ids
        expected = [continuation_logprob(reference, context_ids,
                                         tokenizer(context + " " + choice).input_ids[len(context_ids):])
                    for choice in doc["choices"]]
        assert [float(ll) for ll, _ in sample["filtered_resps"]] == pytest.approx(expected, rel=1e-4, abs=1e-4)
        correct.append(int(max(range(len(expected)), key=expected.__getitem__) == doc["gold"]))
        assert int(sample["acc"]) == correct[-1]
    assert results["acc,none"] == pytest.approx(sum(correct) / 50)


def test_dense_model_gives_lm_evals_own_hf_numbers(stories_dir):
    """Without a plan, every request type returns exactly what lm-eval's `hf` model returns, with a
    max_length short enough to truncate contexts, cut rolling windows and left-truncate prompts."""
    from lm_eval.models.huggingface import HFLM

    hf = HFLM(pretrained=str(stories_dir), device="cpu", dtype="float32", batch_size=3, max_length=16)
    ours = SubfitLM.load(base=str(stories_dir), batch_size=3, max_length=16)
    pairs = [("Once upon a time, there was a little girl named Lily who", " liked to play"), ("Lily liked", " cats"),
             ("", "Tom ran"), ("Tom", " ran to the park and played")]
    texts = [("Once upon a time, there was a little girl named Lily. She loved to play outside in the park.",),
             ("The cat sat.",)]
    prompts = [("Once upon a time", {"until": ["."], "max_gen_toks": 8}),
               ("Lily and Tom went to the", {"until": ["\n"], "max_gen_toks": 8}),
               ("The cat", {"until": ["."], "max_gen_toks": 8})]
    for kind, args in (("loglikelihood", pairs), ("loglikelihood_rolling", texts), ("generate_until", prompts)):
        expected = getattr(hf, kind)(requests(kind, *args), disable_tqdm=True)
        assert getattr(ours, kind)(requests(kind, *args), disable_tqdm=True) == expected, kind


def test_loglikelihood_is_the_reference_executors(plan_dir, stories, reference):
    tokenizer = stories[1]
    pairs = [("Once upon a time", " there was a girl"), ("Lily liked", " cats"), ("Lily liked", " dogs"),
             ("Tom", " ran to the park and played with his ball"), ("", "Once upon a time")]
    expected = []
    for context, continuation in pairs:
        if context:
            whole, ctx = tokenizer(context + continuation).input_ids, tokenizer(context).input_ids
            expected.append(continuation_logprob(reference, ctx, whole[len(ctx):]))
        else:  # an empty context is conditioned on BOS alone
            expected.append(continuation_logprob(reference, [tokenizer.bos_token_id],
                                                 tokenizer(continuation, add_special_tokens=False).input_ids))
    for batch_size in (1, 3):  # batching (with right padding) changes nothing
        lm = SubfitLM.load(plan=str(plan_dir), batch_size=batch_size, executor="reference")
        got = lm.loglikelihood(requests("loglikelihood", *pairs), disable_tqdm=True)
        assert [ll for ll, _ in got] == pytest.approx(expected, rel=1e-5, abs=1e-4)
    # Greedy match: the model's own greedy continuation is one.
    greedy = tokenizer.decode(reference.greedy(torch.tensor([tokenizer("Once upon a time").input_ids]), 3)[0])
    (_, is_greedy), = lm.loglikelihood(requests("loglikelihood", ("Once upon a time", greedy)), disable_tqdm=True)
    assert is_greedy and not got[3][1]


def test_loglikelihood_rolling_scores_disjoint_windows(plan_dir, stories, reference):
    tokenizer = stories[1]
    text = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park."
    tokens = tokenizer(text).input_ids  # lm-eval's hf model scores the tokenizer's BOS too
    bos = tokenizer.bos_token_id
    whole = continuation_logprob(reference, [bos], tokens)
    window = 8
    windowed = sum(continuation_logprob(reference, [bos] if start == 0 else [tokens[start - 1]],
                                        tokens[start:start + window]) for start in range(0, len(tokens), window))
    assert len(tokens) > 3 * window
    for max_length, expected in ((1024, whole), (window, windowed)):
        lm = SubfitLM.load(plan=str(plan_dir), batch_size=2, executor="reference", max_length=max_length)
        (got,) = lm.loglikelihood_rolling(requests("loglikelihood_rolling", (text,)), disable_tqdm=True)
        assert got == pytest.approx(expected, rel=1e-5)
    assert windowed < whole  # less context per token: a worse fit, so the windows really were cut


def test_generate_until_is_the_reference_greedy_continuation(plan_dir, stories, reference):
    tokenizer = stories[1]
    prompts = ["Once upon a time", "Lily and Tom went to the", "The cat"]
    lm = SubfitLM.load(plan=str(plan_dir), batch_size=2, executor="reference")
    got = lm.generate_until(requests("generate_until", *[(p, {"until": ["."], "max_gen_toks": 24}) for p in prompts]),
                            disable_tqdm=True)
    for prompt, text in zip(prompts, got):
        new = reference.greedy(torch.tensor([tokenizer(prompt).input_ids]), 24)[0].tolist()
        expected = tokenizer.decode(new, skip_special_tokens=True).split(".")[0]
        assert text == expected
    assert all("." not in text for text in got) and any(text.strip() for text in got)


def test_runtime_executor_agrees_with_the_reference_executor(plan_dir):
    pairs = [("Once upon a time", " there was a girl"), ("Lily liked", " cats"), ("Tom", " ran to the park")]
    prompts = [("Once upon a time", {"until": ["."], "max_gen_toks": 20}),
               ("Lily went", {"until": ["\n"], "max_gen_toks": 12})]
    runs = {}
    for executor in ("reference", "runtime"):
        lm = SubfitLM.load(plan=str(plan_dir), batch_size=2, executor=executor, device="cpu")
        runs[executor] = (lm.loglikelihood(requests("loglikelihood", *pairs), disable_tqdm=True),
                        lm.generate_until(requests("generate_until", *prompts), disable_tqdm=True))
    (ref_ll, ref_text), (rt_ll, rt_text) = runs["reference"], runs["runtime"]
    assert [ll for ll, _ in rt_ll] == pytest.approx([ll for ll, _ in ref_ll], rel=1e-4, abs=1e-4)
    assert [g for _, g in rt_ll] == [g for _, g in ref_ll]
    assert rt_text == ref_text


def test_subfit_eval_tasks_prints_dense_and_plan_with_paired_differences(plan_dir, offline, monkeypatch, tmp_path,
                                                                        capsys):
    for name, value in offline.items():
        monkeypatch.setenv(name, value)
    report_path = tmp_path / "report.json"
    assert main(["eval", str(plan_dir), "--tasks", "piqa_local", "winogrande_local", "--include-path", str(TASKS),
                 "--limit", "30", "--batch-size", "8", "--json", str(report_path)]) == 0
    table = capsys.readouterr().err
    assert "piqa_local acc - dense" in table and "piqa_local acc_norm - dense" in table
    assert "winogrande_local acc - dense" in table and "winogrande_local acc_norm" not in table
    report = json.loads(report_path.read_text())
    dense, plan = (report["columns"][c]["tasks"]["piqa_local"] for c in ("dense", "compressed"))
    assert dense["n"] == plan["n"] == len(plan["correct"]) == 30
    assert report["paired"]["piqa_local"]["acc"]["diff"] == pytest.approx(plan["acc"] - dense["acc"])
    assert plan["acc"] == pytest.approx(sum(plan["correct"]) / 30)


def test_without_lm_eval_the_command_says_how_to_install(plan_dir):
    code = ("import sys; sys.modules['lm_eval'] = None\n"  # what Python sees when the package is not installed
            "from subfit.cli import main\n"
            f"sys.exit(main(['eval', {str(plan_dir)!r}, '--tasks', 'piqa']))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1
    assert "lm-evaluation-harness is not installed" in done.stderr and 'pip install -e ".[eval]"' in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("args, message", [
    ("plan={plan},colour=blue", "Unknown subfit model_args"),
    ("plan={plan},batch_size=auto", "batch_size='auto'"),
    ("plan={plan},executor=vllm", "executor='vllm'"),
])
def test_bad_model_args_are_explained(plan_dir, args, message):
    with pytest.raises(ValueError, match=message):
        SubfitLM.create_from_arg_string(args.format(plan=plan_dir), {"batch_size": 1, "device": None})
