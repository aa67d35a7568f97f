"""Bad input through the Python API (and the CLI options wired to the same checks): output
locations that would lose someone's files, offline task files with bad lines, evaluation and sampling
arguments out of range. Each is refused with an error that names the problem, before any work,
and leaves every file as it was."""
import json
import os
import re
import sys
from pathlib import Path

import pytest
import torch

from subfit.cli import main
from subfit.evaluation import evaluate, perplexity
from subfit.files import OutputError, staged_folder, write_json
from subfit.plan import PLAN_FOLDER, Plan
from subfit.reference import ReferenceModel


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every entry under `root` (and `root` itself): a file's bytes, None for a folder."""
    entries = [root, *root.rglob("*")] if root.exists() else []
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes() for p in entries}


def no_temporaries(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


# output locations ---------------------------------------------------------------------------
def _stray_weights(path):
    path.mkdir()
    (path / "bypass.safetensors").write_text("mine")


def _model_folder(path):
    path.mkdir()
    (path / "config.json").write_text('{"model_type": "llama"}')
    (path / "model.safetensors").write_bytes(b"weights")


def _other_files(path):
    path.mkdir()
    (path / "notes.txt").write_text("mine")


def _foreign_plan_json(path):
    path.mkdir()
    (path / "plan.json").write_text('{"steps": ["mine"]}')


def _file(path):
    path.write_text("mine")


def _under_a_file(path):
    path.parent.mkdir(exist_ok=True)
    (path.parent / "file").write_text("mine")
    return path.parent / "file" / "plan"


@pytest.mark.parametrize("make, message", [
    (_stray_weights, "is not a subfit plan folder (it holds bypass.safetensors)"),
    (_model_folder, "is a model folder (it holds config.json, model.safetensors)"),
    (_other_files, "is not a subfit plan folder (it holds notes.txt)"),
    (_foreign_plan_json, "is not a subfit plan folder (it holds plan.json)"),
    (_file, "is a file; give the path of a new folder"),
    (_under_a_file, "is a file, not a folder"),
])
@pytest.mark.parametrize("overwrite", [False, True])
def test_plan_save_never_replaces_what_is_not_a_plan(make, message, overwrite, small_plan, tmp_path):
    target = tmp_path / "out" / "plan"
    target.parent.mkdir()
    target = make(target) or target
    before = snapshot(tmp_path)
    with pytest.raises(OutputError) as error:
        small_plan.save(target, overwrite=overwrite)
    assert message in str(error.value) and "\n" not in str(error.value)
    assert snapshot(tmp_path) == before


def test_plan_save_replaces_a_plan_only_when_allowed(small_plan, tmp_path):
    target = small_plan.save(tmp_path / "plan")
    before = snapshot(tmp_path)
    other = small_plan.without_bypasses()
    with pytest.raises(OutputError, match=r"already holds a subfit plan; .*pass --overwrite \(overwrite=True"):
        other.save(target)
    assert snapshot(tmp_path) == before
    other.save(target, overwrite=True)
    assert Plan.load(target).tensors == {} and Plan.load(target).attn == other.attn
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan"]  # no temporary folder left behind
    assert sorted(p.name for p in target.iterdir()) == ["bypass.safetensors", "plan.json"]


def test_a_plan_folder_with_other_files_is_not_replaced(small_plan, tmp_path):
    target = small_plan.save(tmp_path / "plan")
    (target / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    with pytest.raises(OutputError, match=r"holds a subfit plan and other files \(notes.txt\)"):
        small_plan.save(target, overwrite=True)
    assert snapshot(tmp_path) == before


def test_plan_save_into_an_empty_folder_and_through_a_link(small_plan, tmp_path):
    (tmp_path / "empty").mkdir()
    Plan.load(small_plan.save(tmp_path / "empty"))
    (tmp_path / "link").symlink_to(tmp_path / "empty")
    small_plan.without_bypasses().save(tmp_path / "link", overwrite=True)
    assert (tmp_path / "link").is_symlink() and Plan.load(tmp_path / "empty").tensors == {}


def test_an_interrupted_save_leaves_the_old_plan(small_plan, tmp_path):
    target = small_plan.save(tmp_path / "plan")
    before = snapshot(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        with staged_folder(target, PLAN_FOLDER, overwrite=True) as staging:
            (staging / "plan.json").write_text("{half a pl")
            raise KeyboardInterrupt
    assert snapshot(tmp_path) == before
    with pytest.raises(KeyboardInterrupt):
        with staged_folder(tmp_path / "new", PLAN_FOLDER) as staging:
            (staging / "plan.json").write_text("{half a pl")
            raise KeyboardInterrupt
    assert snapshot(tmp_path) == before  # no half-written plan, no temporary folder


def test_a_plan_that_cannot_be_serialised_writes_nothing(small_plan, tmp_path):
    plan = small_plan.without_bypasses()
    plan.method["callback"] = print
    with pytest.raises(TypeError, match="not JSON serializable"):
        plan.save(tmp_path / "plan")
    assert list(tmp_path.iterdir()) == []


def _unwritable_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    if os.access(folder, os.W_OK):  # root ignores permissions; a read-only file system does not
        folder = Path("/proc/sys")
        if not folder.is_dir() or os.access(folder, os.W_OK):
            pytest.skip("no unwritable folder to write into on this machine")
    return folder


def test_an_unwritable_location_is_refused_before_any_work(small_plan, tmp_path):
    folder = _unwritable_folder(tmp_path)
    with pytest.raises(OutputError, match=rf"cannot write .*: {folder} is not writable"):
        small_plan.save(folder / "sub" / "plan")
    with pytest.raises(OutputError, match="is not writable"):
        write_json(folder / "report.json", {})


def test_json_reports_follow_the_same_rule(tmp_path):
    report = tmp_path / "reports" / "report.json"
    write_json(report, {"a": 1})  # a new path, folders made as needed
    before = snapshot(tmp_path)
    with pytest.raises(OutputError, match="already exists; choose another path or pass --overwrite"):
        write_json(report, {"a": 2})
    with pytest.raises(OutputError, match="is a folder; give a file path for the report"):
        write_json(tmp_path / "reports", {"a": 2}, overwrite=True)
    with pytest.raises(TypeError):
        write_json(report, {"a": object()}, overwrite=True)  # serialised before the file is touched
    assert snapshot(tmp_path) == before
    write_json(report, {"a": 2}, overwrite=True)
    assert json.loads(report.read_text()) == {"a": 2} and no_temporaries(report.parent)


@pytest.mark.parametrize("argv, message", [
    (["compress", "nowhere-model", "--sparsity", "0.25", "--out", "{stray}"], "is not a subfit plan folder"),
    (["compress", "nowhere-model", "--sparsity", "0.25", "--out", "{model}"], "is a model folder"),
    (["compress", "nowhere-model", "--sparsity", "0.25", "--out", "{file}"], "is a file"),
    (["compress", "nowhere-model", "--sparsity", "0.25", "--out", "{plan}"], "already holds a subfit plan"),
    (["eval", "nowhere-model", "--ppl", "{file}", "--json", "{stray}"], "is a folder"),
    (["eval", "nowhere-model", "--ppl", "{file}", "--json", "{file}"], "already exists"),
    (["eval", "nowhere-model", "--ppl", "{file}", "--window", "1"], "window=1: expected an integer >= 2"),
])
def test_cli_refuses_an_output_before_loading_the_model(argv, message, small_plan, tmp_path, capsys):
    """The model named does not exist: a refusal about the output proves it came first."""
    _stray_weights(tmp_path / "stray")
    _model_folder(tmp_path / "model")
    _file(tmp_path / "file")
    places = {"{stray}": tmp_path / "stray", "{model}": tmp_path / "model", "{file}": tmp_path / "file",
              "{plan}": small_plan.save(tmp_path / "plan")}
    before = snapshot(tmp_path)
    assert main([str(places.get(a, a)) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in " ".join(err.split()) and "Traceback" not in err
    assert snapshot(tmp_path) == before


# offline task files (bench/tasks/local_data.py, which lm-eval calls) --------------------------
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench" / "tasks"))
from local_data import read_examples  # noqa: E402

GOOD = {"query": "Lily liked", "choices": ["cats", "dogs"], "gold": 1}


@pytest.mark.parametrize("line, message", [
    ('{"query": "q", "choices": [], "gold": 0}', "choices is []; expected a non-empty list of strings"),
    ('{"query": "q", "choices": ["a", "b"]}', "lacks 'gold'"),
    ('{"query": "q", "choices": ["a", "b"], "gold": 1.7}', "gold is 1.7; expected the index"),
    ('{"query": "q", "choices": ["a", "b"], "gold": true}', "gold is True"),
    ('{"query": "q", "choices": ["a", "b"], "gold": "1"}', "gold is '1'"),
    ('{"query": "q", "choices": ["a", "b"], "gold": 2}', "an integer from 0 to 1"),
    ('{"query": "q", "choices": ["a", "b"], "gold": -1}', "gold is -1"),
    ('{"query": "q", "choices": "ab", "gold": 0}', "choices is 'ab'"),
    ('{"query": "q", "choices": [1, 2], "gold": 0}', "choices is [1, 2]"),
    ('{"query": null, "choices": ["a"], "gold": 0}', "query is None; expected a non-empty string"),
    ('{"choices": ["a"], "gold": 0}', "lacks 'query'"),
    ('{"context_options": [], "continuation": "x", "gold": 0}', "context_options is []"),
    ('{"context_options": ["a", "b"], "gold": 0}', "lacks 'continuation'"),
    ('{"context_options": ["a", "b"], "continuation": "x", "gold": 5}', "from 0 to 1"),
    ('{"context": "a", "continuation": " "}', "continuation is ' '; expected a non-empty string"),
    ('{"context": 1, "continuation": "x"}', "context is 1"),
    ('{"question": "q"}', "unknown format with keys ['question']"),
    ("[1, 2]", "expected a JSON object"),
    ('{"query": "q", "choices": ["a"], ', "is not valid JSON"),
])
def test_bad_task_lines_are_refused_naming_file_and_line(line, message, tmp_path):
    path = tmp_path / "task.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + line + "\n" + json.dumps(GOOD) + "\n")
    before = snapshot(tmp_path)
    with pytest.raises(ValueError) as error:
        read_examples(path)
    assert str(error.value).startswith(f"{path}:3") and message in str(error.value)
    assert snapshot(tmp_path) == before


def test_task_file_that_is_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "task.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b'\n{"query": "\xff"}\n')
    with pytest.raises(ValueError, match=rf"{path}:2 is not UTF-8 text"):
        read_examples(path)


class CountingModel:
    """The real reference executor, counting its forward calls: a refused evaluation makes none."""

    def __init__(self, model):
        self.ref, self.calls = ReferenceModel(model), 0
        self.max_positions = self.ref.max_positions

    def __call__(self, ids):
        self.calls += 1
        return self.ref(ids)


@pytest.mark.parametrize("settings, message", [
    ({"window": 1}, "window=1: expected an integer >= 2"),
    ({"window": 64.0}, "window=64.0"),
    ({"stride": 0}, "stride=0: expected an integer >= 1 or None"),
    ({"window": 32, "stride": 64}, "stride=64 is larger than window=32"),
    ({"max_tokens": 1}, "max_tokens=1: expected an integer >= 2"),
    ({"ppl": "missing.txt"}, "missing.txt does not exist"),
    ({"ppl": "{folder}"}, "is a folder; give a text file"),
])
def test_evaluation_settings_are_checked_before_any_work(settings, message, stories, tinystories_file, tmp_path):
    settings = {"ppl": tinystories_file, "max_tokens": 200, "window": 64, **settings}
    if settings["ppl"] == "{folder}":
        settings["ppl"] = tmp_path
    model = CountingModel(stories[0])
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        evaluate(model, stories[1], progress=False, **settings)
    assert model.calls == 0


def test_perplexity_window_of_one_is_refused(stories):
    with pytest.raises(ValueError, match="window=1: expected an integer >= 2"):
        perplexity(ReferenceModel(stories[0]), torch.arange(1, 20), window=1, progress=False)


# sampling arguments -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runtime(stories):
    from subfit.runtime import Runtime

    model, tokenizer, _ = stories
    return Runtime.from_hf(model, None, tokenizer, max_seq_len=32)


@pytest.mark.parametrize("kwargs, message", [
    ({"top_p": 0}, "top_p=0: expected a top-p in (0, 1]"),
    ({"top_p": 1.5}, "top_p=1.5"),
    ({"top_p": float("nan")}, "top_p=nan"),
    ({"temperature": float("nan")}, "temperature=nan: expected a temperature >= 0"),
    ({"temperature": -1}, "temperature=-1"),
    ({"temperature": float("inf")}, "temperature=inf"),
    ({"temperature": "0.7"}, "temperature='0.7'"),
    ({"top_k": 0}, "top_k=0: expected a positive integer"),
    ({"top_k": -3}, "top_k=-3"),
    ({"top_k": 2.5}, "top_k=2.5"),
    ({"max_new_tokens": 2.5}, "max_new_tokens=2.5: expected a positive integer"),
    ({"max_new_tokens": True}, "max_new_tokens=True"),
    ({"max_new_tokens": 0}, "max_new_tokens=0"),
    ({"seed": 1.5}, "seed=1.5: expected an integer seed"),
    ({"seed": 2**64}, "seed=18446744073709551616"),
])
def test_sampling_arguments_are_refused_in_python(kwargs, message, runtime):
    args = {"max_new_tokens": 3, "temperature": 0.8, **kwargs}
    before = list(runtime._lengths)
    with pytest.raises(ValueError, match=re.escape(message)):
        runtime.generate([1, 9], **args)
    with pytest.raises(ValueError, match=re.escape(message)):
        runtime.stream([1, 9], **args)  # refused when called, not when iterated
    assert runtime._lengths == before  # no prefill happened


@pytest.mark.parametrize("option, value, argument", [
    ("--top-p", "0", "top_p"), ("--temperature", "inf", "temperature"), ("--temperature", "nan", "temperature"),
    ("--top-k", "0", "top_k"), ("--max-new-tokens", "0", "max_new_tokens"),
])
def test_cli_and_python_share_the_sampling_rules(option, value, argument, capsys):
    from subfit.runtime.generate import SAMPLING_RULES

    with pytest.raises(SystemExit) as error:
        main(["generate", "x", "--prompt", "a", option, value])
    assert error.value.code == 2 and f"expected {SAMPLING_RULES[argument][1]}, got {value}" in capsys.readouterr().err


# texts --------------------------------------------------------------------------------------
@pytest.mark.parametrize("content, message", [
    (b"", "holds no text; give a file with text in it"),
    (b" \n\n\t\n", "holds no text (only whitespace)"),
    (b"Once upon a time\nthere was a caf\xe9.\n", "is not UTF-8 text (line 2, byte 32); convert it to UTF-8"),
])
def test_texts_that_are_empty_or_not_utf8_are_refused_naming_the_file(content, message, stories, tmp_path):
    from subfit.calibration import load_calibration
    from subfit.compression import compress

    model, tokenizer, _ = stories
    path = tmp_path / "text.txt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(f"Calibration file {path} {message}")):
        load_calibration(str(path), model, tokenizer, 2, 16)
    with pytest.raises(ValueError, match=re.escape(f"Calibration file {path} {message}")):
        compress(model, 0.25, path, tokenizer=tokenizer, progress=False)
    counting = CountingModel(model)
    with pytest.raises(ValueError, match=re.escape(f"Perplexity text {path} {message}")):
        evaluate(counting, tokenizer, ppl=path, window=64, progress=False)
    assert counting.calls == 0


# model limits -------------------------------------------------------------------------------
def test_lengths_beyond_the_models_positions_are_refused_with_the_number(stories, tinystories_file):
    from subfit.calibration import load_calibration
    from subfit.runtime import Runtime

    model, tokenizer, _ = stories
    limit = model.config.max_position_embeddings
    beyond = f"longer than the model's {limit} positions (max_position_embeddings); give at most {limit}"
    with pytest.raises(ValueError, match=re.escape(f"calib_len={limit + 1} (--calib-len) is {beyond}")):
        load_calibration(str(tinystories_file), model, tokenizer, 2, limit + 1)
    counting = CountingModel(model)
    with pytest.raises(ValueError, match=re.escape(f"window={2 * limit} (--window) is {beyond}")):
        evaluate(counting, tokenizer, ppl=tinystories_file, window=2 * limit, progress=False)
    assert counting.calls == 0
    with pytest.raises(ValueError, match=re.escape(f"max_seq_len={limit + 1} (--max-seq-len) is {beyond}")):
        Runtime.from_hf(model, None, tokenizer, max_seq_len=limit + 1)
    with pytest.raises(ValueError, match=re.escape(f"A sequence of {limit + 1} tokens is {beyond}")):
        ReferenceModel(model)(torch.ones(1, limit + 1, dtype=torch.long))
    # The defaults stay within: the runtime's cache and the perplexity window shrink to the model.
    assert Runtime.from_hf(model, None, tokenizer).max_seq_len == limit
    report = evaluate(ReferenceModel(model), tokenizer, ppl=tinystories_file, max_tokens=600, progress=False)
    assert report["perplexity"]["window"] == limit


@pytest.mark.parametrize("kwargs, message", [
    ({"max_seq_len": 0}, "max_seq_len=0: expected a positive integer"),
    ({"max_seq_len": 64.0}, "max_seq_len=64.0"),
    ({"batch_size": 0}, "batch_size=0: expected a positive integer"),
])
def test_runtime_sizes_are_checked(kwargs, message, stories):
    from subfit.runtime import Runtime

    with pytest.raises(ValueError, match=re.escape(message)):
        Runtime.from_hf(stories[0], None, stories[1], **kwargs)


# token ids ----------------------------------------------------------------------------------
@pytest.mark.parametrize("prompt, kwargs, message", [
    ([1.7, 9.2], {}, "prompt holds 1.7, which is not a token id"),
    ([[1, 9], [1, True]], {}, "prompt holds True"),
    (torch.tensor([1.0, 9.0]), {}, "ids holds 1.0"),
    ([1, 600], {}, "Token ids [600] are outside the vocabulary [0, 512)"),
    ([1, 9], {"eos": "a"}, "eos='a': expected token ids"),
    ([1, 9], {"eos": 2.0}, "eos=2.0: expected token ids"),
    ([1, 9], {"eos": [2, "</s>"]}, "eos holds '</s>', which is not a token id"),
])
def test_token_ids_are_integers_in_the_vocabulary(prompt, kwargs, message, runtime):
    with pytest.raises(ValueError, match=re.escape(message)):
        runtime.generate(prompt, max_new_tokens=2, **kwargs)
    assert runtime.generate([1, 9], max_new_tokens=2, eos=2).ids  # the same runtime still works


@pytest.mark.parametrize("ids, message", [
    (torch.tensor([[1, 600]]), "Token ids [600] are outside the model's vocabulary [0, 512)"),
    (torch.tensor([[-1, 5]]), "Token ids [-1]"),
    (torch.tensor([[1.0, 5.0]]), "input_ids must be integer token ids [batch, length], got torch.float32"),
    (torch.tensor([1, 5]), "got torch.int64 (2,)"),
])
def test_reference_model_refuses_bad_token_ids(ids, message, stories):
    with pytest.raises(ValueError, match=re.escape(message)):
        ReferenceModel(stories[0])(ids)


@pytest.mark.parametrize("calib, message", [
    (torch.full((20, 16), 600), "Token ids [600] are outside the model's vocabulary [0, 512)"),
    (torch.ones(20, 513, dtype=torch.long), "A sequence of 513 tokens is longer than the model's 512 positions"),
])
def test_calibration_token_tensors_are_checked_by_the_first_embedding(calib, message, stories):
    from subfit.compression import compress

    with pytest.raises(ValueError, match=re.escape(message)):
        compress(stories[0], 0.25, calib, progress=False)


# devices ------------------------------------------------------------------------------------
@pytest.mark.parametrize("device, message", [
    ("banana", "device='banana' is not a device name; use cpu, cuda or cuda:N"),
    ("cuda:99", "device='cuda:99'"),
    ("meta", "device='meta' holds no data"),
    (3.5, "device=3.5 must be a device name"),
])
def test_one_device_check_for_every_entry_point(device, message, stories_dir):
    from subfit import models
    from subfit.config import SubFitConfig
    from subfit.runtime import load

    for make in (lambda: SubFitConfig(device=device), lambda: models.load(stories_dir, device=device),
                 lambda: load(stories_dir, device=device)):
        with pytest.raises(ValueError, match=re.escape(message)):
            make()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_says_so(stories_dir):
    from subfit.runtime import load

    with pytest.raises(ValueError, match=r"device='cuda' needs a CUDA GPU, and torch .* here (was built without "
                                         r"CUDA|finds no CUDA GPU); use cpu"):
        load(stories_dir, device="cuda")
