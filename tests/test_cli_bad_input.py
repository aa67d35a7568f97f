"""Bad invocations of every `subfit` command, as a user would type them: each exits with status 2
and one line, `subfit COMMAND: error: what is wrong; what to do`, without a traceback, and leaves
every file as it was. Refusals that need no model come before the model loads; the few that need
its limits (positions) load stories260K and refuse before any work."""
import json
import re
import shutil
import sys
from pathlib import Path

import pytest

from subfit.cli import main

SWEEP = Path(__file__).resolve().parents[1] / "bench" / "sweep"
sys.path.insert(0, str(SWEEP))
from sweep import main as sweep_main  # noqa: E402

GOOD_TASK = {"query": "Lily liked", "choices": ["cats", "dogs"], "gold": 1}
# Every message says what to do: give / use / pass ... a value, or what was expected.
FIX = re.compile(r"\b(give|use|pass|choose|see|convert|move|rename|leave|shorten|load|make|expected|must be)\b", re.I)

COMPRESS = ["compress", "{model}", "--sparsity", "0.25", "--out", "{new}"]
EVAL = ["eval", "{model}", "--ppl", "{text}"]
GENERATE = ["generate", "{model}", "--prompt", "Once upon a time"]
BENCH = ["bench", "{model}", "--rounds", "1"]
SWEEP_ARGS = ["sweep", "{model}", "--calib", "{text}", "--ppl", "{text}", "--cache", "{new}/cache", "--out",
              "{new}/results"]

CASES = [
    # compress: arguments
    (["compress", "{model}", "--sparsity", "0.9", "--out", "{new}"], "between 0 and 0.75, e.g. 0.25, got 0.9"),
    (["compress", "{model}", "--sparsity", "nan", "--out", "{new}"], "got nan"),
    (["compress", "{model}", "--out", "{new}"], "the following arguments are required: --sparsity"),
    ([*COMPRESS, "--calib-samples", "0"], "argument --calib-samples: expected a positive integer, got 0"),
    ([*COMPRESS, "--calib-len", "1"], "calib_len=1 must be a whole number of tokens >= 2"),
    ([*COMPRESS, "--attn-rank", "-3"], "argument --attn-rank: expected a positive integer, got -3"),
    ([*COMPRESS, "--ffn-rank", "wide"], "argument --ffn-rank: expected a positive integer, got 'wide'"),
    ([*COMPRESS, "--selection-draws", "0"], "argument --selection-draws: expected a positive integer, got 0"),
    ([*COMPRESS, "--calib-samples", "8"], "selection_draws=3 holds out 16 calibration sequences"),
    ([*COMPRESS, "--seed", "1.5"], "argument --seed: invalid int value: '1.5'"),
    ([*COMPRESS, "--method", "magic"], "argument --method: invalid choice: 'magic'"),
    ([*COMPRESS, "--method", "shortgpt", "--attn-rank", "8"], "--attn-rank are SubFit options"),
    ([*COMPRESS, "--device", "banana"], "device='banana' is not a device name; use cpu, cuda or cuda:N"),
    ([*COMPRESS, "--device", "cuda:99"], "device='cuda:99'"),
    # compress: calibration text
    ([*COMPRESS, "--calib", "{new}/wiki.txt"], "Calibration file {new}/wiki.txt does not exist; give a text file"),
    ([*COMPRESS, "--calib", "{folder}"], "Calibration file {folder} is a folder"),
    ([*COMPRESS, "--calib", "{empty}"], "Calibration file {empty} holds no text; give a file with text"),
    ([*COMPRESS, "--calib", "{blank}"], "holds no text (only whitespace)"),
    ([*COMPRESS, "--calib", "{latin1}"], "Calibration file {latin1} is not UTF-8 text (line 2, byte 32)"),
    ([*COMPRESS, "--calib", "{text}", "--calib-len", "4096"],
     "calib_len=4096 (--calib-len) is longer than the model's 512 positions (max_position_embeddings); give at most 512"),
    # compress: output and model locations
    (["compress", "{model}", "--sparsity", "0.25", "--out", "{report}"], "{report} is a file; give the path of a new folder"),
    (["compress", "{model}", "--sparsity", "0.25", "--out", "{stray}"], "is not a subfit plan folder (it holds bypass.safetensors)"),
    (["compress", "{model}", "--sparsity", "0.25", "--out", "{model}"], "{model} exists and is a model folder"),
    (["compress", "{model}", "--sparsity", "0.25", "--out", "{plan}"], "already holds a subfit plan; choose another path or pass --overwrite"),
    (["compress", "{model}", "--sparsity", "0.25", "--out", "{annotated}", "--overwrite"],
     "holds a subfit plan and other files (notes.txt)"),
    (["compress", "{model}", "--sparsity", "0.25", "--out", "{report}/plan"], "is a file, not a folder"),
    (["compress", "{new}/model", "--sparsity", "0.25", "--out", "{new}/plan"], "is not a model folder or .gguf file here"),
    (["compress", "{folder}", "--sparsity", "0.25", "--out", "{new}"], "has no config.json"),
    (["compress", "{gpt2}", "--sparsity", "0.25", "--out", "{new}"], "Model type 'gpt2' (architecture GPT2LMHeadModel) is not supported"),
    (["eval", "{weightless}", "--ppl", "{text}"], "Cannot load the model {weightless}: Error no file named model.safetensors"),
    (["eval", "{badconfig}", "--ppl", "{text}"], "config.json' is not a valid JSON file"),
    (["compress", "{new}/model.gguf", "--sparsity", "0.25", "--out", "{new}/plan"], "GGUF file {new}/model.gguf does not exist"),
    # eval
    (["eval", "{model}"], "nothing to evaluate: give --ppl FILE and/or --tasks TASK"),
    (["eval", "{model}", "--ppl", "{new}/wiki.txt"], "Perplexity text {new}/wiki.txt does not exist; give a text file"),
    (["eval", "{model}", "--ppl", "{folder}"], "Perplexity text {folder} is a folder"),
    (["eval", "{model}", "--ppl", "{blank}"], "Perplexity text {blank} holds no text"),
    (["eval", "{model}", "--ppl", "{latin1}"], "Perplexity text {latin1} is not UTF-8 text"),
    (["eval", "{model}", "--tasks", "no_such_task", "--include-path", "{tasks}"],
     "Unknown lm-eval task(s) no_such_task; see `python -m subfit.harness --tasks list`"),
    (["eval", "{model}", "--tasks", "piqa_local", "--include-path", "{new}/tasks"], "--include-path {new}/tasks is not a folder"),
    (["eval", "{model}", "--tasks", "piqa_local", "--include-path", "{tasks}", "--num-fewshot", "-1"],
     "--num-fewshot -1: give 0 or more examples"),
    ([*EVAL, "--window", "1"], "window=1: expected an integer >= 2"),
    ([*EVAL, "--window", "4096"], "window=4096 (--window) is longer than the model's 512 positions"),
    ([*EVAL, "--window", "64", "--stride", "128"], "stride=128 is larger than window=64"),
    ([*EVAL, "--max-tokens", "1"], "max_tokens=1: expected an integer >= 2"),
    ([*EVAL, "--limit", "0"], "argument --limit: expected a positive integer, got 0"),
    ([*EVAL, "--json", "{report}"], "{report} already exists; choose another path or pass --overwrite"),
    ([*EVAL, "--json", "{folder}"], "{folder} is a folder; give a file path for the report"),
    (["eval", "{badplan}", "--ppl", "{text}"], "{badplan}/plan.json: layers[1].attn is 'remove'"),
    (["eval", "{plan}", "--ppl", "{text}", "--base", "{llama}"], "fingerprint"),
    # generate
    ([*GENERATE, "--temperature", "-1"], "expected a temperature >= 0 (0 = greedy), not inf or nan, got -1"),
    ([*GENERATE, "--temperature", "0.7", "--top-p", "0"], "expected a top-p in (0, 1], got 0"),
    ([*GENERATE, "--top-k", "5"], "--top-k/--top-p only apply when sampling: give --temperature > 0"),
    ([*GENERATE, "--max-new-tokens", "0"], "argument --max-new-tokens: expected a positive integer, got 0"),
    ([*GENERATE, "--device", "banana"], "device='banana' is not a device name"),
    ([*GENERATE, "--dtype", "float8"], "argument --dtype: invalid choice: 'float8'"),
    ([*GENERATE, "--max-seq-len", "4096"], "max_seq_len=4096 (--max-seq-len) is longer than the model's 512 positions"),
    ([*GENERATE, "--max-seq-len", "16", "--max-new-tokens", "64"], "but the KV cache holds 16"),
    (["generate", "{badplan}", "--prompt", "Hi"], "{badplan}/plan.json: layers[1].attn is 'remove'"),
    (["generate", "{new}/plan", "--prompt", "Hi"], "{new}/plan does not exist: give a plan directory"),
    (["generate", "{folder}", "--prompt", "Hi"], "is neither a plan directory"),
    (["generate", "{model}"], "the following arguments are required: --prompt"),
    # bench
    ([*BENCH, "--prompt-len", "500", "--new-tokens", "100"],
     "--prompt-len + --new-tokens = 600 is longer than the model's 512 positions"),
    ([*BENCH, "--max-seq-len", "16"], "--prompt-len + --new-tokens (96) exceeds --max-seq-len 16"),
    ([*BENCH, "--device", "banana"], "device='banana' is not a device name"),
    ([*BENCH, "--synthetic", "0.9"], "argument --synthetic: expected a sparsity"),
    ([*BENCH, "--rounds", "0"], "argument --rounds: expected a positive integer, got 0"),
    ([*BENCH, "--threads", "0"], "argument --threads: expected a positive integer, got 0"),
    (["bench", "{badplan}"], "{badplan}/plan.json: layers[1].attn is 'remove'"),
    # sweep
    (["sweep", "{model}", "--calib", "{text}", "--ppl", "{text}", "--cache", "{new}/cache", "--out", "{results}"],
     "{results}.json already exists; choose another path or pass --overwrite"),
    ([*SWEEP_ARGS, "--levels", "0.9"], "argument --levels: expected a sparsity"),
    ([*SWEEP_ARGS, "--ppl", "{new}/wiki.txt"], "Perplexity text {new}/wiki.txt does not exist"),
    ([*SWEEP_ARGS, "--calib", "{empty}"], "Calibration file {empty} holds no text"),
    ([*SWEEP_ARGS, "--subfit", "bogus=1"], "Unknown SubFit settings ['bogus']"),
    ([*SWEEP_ARGS, "--subfit", "selection_draws"], "--subfit takes FIELD=VALUE; got 'selection_draws'. Give e.g. selection_draws=1"),
    ([*SWEEP_ARGS, "--subfit", "selection_draws=0"], "selection_draws=0 must be a whole number >= 1"),
    ([*SWEEP_ARGS, "--window", "4096"], "window=4096 (--window) is longer than the model's 512 positions"),
    ([*SWEEP_ARGS, "--cache", "{report}"], "--cache {report} is a file; give a folder"),
    ([*SWEEP_ARGS, "--device", "banana"], "device='banana' is not a device name"),
    ([*SWEEP_ARGS, "--tasks", "no_such_task", "--include-path", "{tasks}"], "Unknown lm-eval task(s) no_such_task"),
    (["sweep", "{model}", "--calib", "{text}", "--out", "{new}/results"], "the following arguments are required: --cache"),
]


@pytest.fixture
def places(tmp_path, stories_dir, tinystories_file, small_plan, family_model_dir) -> dict[str, str]:
    """Inputs and outputs of every kind the cases name, made under tmp_path: {name} -> path."""
    p = {name: tmp_path / name for name in ("model", "text", "empty", "blank", "latin1", "assets", "report",
                                            "folder", "stray", "gpt2", "weightless", "badconfig", "results")}
    shutil.copytree(stories_dir, p["model"])
    p["text"].write_text(tinystories_file.read_text()[:20_000])
    p["empty"].write_text("")
    p["blank"].write_text("  \n\n \t\n")
    p["latin1"].write_bytes("Once upon a time\nthere was a caf\u00e9.\n".encode("latin-1"))
    (p["assets"] / "data" / "mc_eval").mkdir(parents=True)  # shared assets whose PIQA file has a bad line
    (p["assets"] / "data" / "mc_eval" / "piqa.jsonl").write_text(
        json.dumps(GOOD_TASK) + "\n" + json.dumps({**GOOD_TASK, "gold": 3}) + "\n")
    p["report"].write_text("mine")
    p["folder"].mkdir()
    (p["folder"] / "notes.txt").write_text("mine")
    p["stray"].mkdir()
    (p["stray"] / "bypass.safetensors").write_text("mine")
    p["gpt2"].mkdir()
    (p["gpt2"] / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    p["weightless"].mkdir()
    shutil.copy(stories_dir / "config.json", p["weightless"])
    p["badconfig"].mkdir()
    (p["badconfig"] / "config.json").write_text('{"model_type": "llama",')
    p["plan"] = small_plan.save(tmp_path / "plan")
    p["annotated"] = small_plan.save(tmp_path / "annotated")
    (p["annotated"] / "notes.txt").write_text("mine")
    p["badplan"] = small_plan.save(tmp_path / "badplan")
    record = json.loads((p["badplan"] / "plan.json").read_text())
    record["layers"][1]["attn"] = "remove"
    (p["badplan"] / "plan.json").write_text(json.dumps(record))
    Path(f"{p['results']}.json").write_text("{}")
    p["new"] = tmp_path / "new"
    p["tasks"] = Path(__file__).resolve().parents[1] / "bench" / "tasks"
    p["llama"] = family_model_dir("llama")
    return {f"{{{name}}}": str(path) for name, path in p.items()}


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every entry under `root`: a file's bytes, None for a folder."""
    return {str(q.relative_to(root)): None if q.is_dir() else q.read_bytes() for q in root.rglob("*")}


def fill(text: str, places: dict[str, str]) -> str:
    return re.sub(r"\{\w+\}", lambda m: places.get(m.group(0), m.group(0)), text)


def run(argv: list[str]) -> int:
    """`subfit ARGV` in this process; the sweep's own entry point for `sweep` (`subfit sweep` runs
    that script in a new interpreter, `test_sweep_passes_its_refusal_through` covers the hop)."""
    try:
        return sweep_main(argv[1:]) if argv[0] == "sweep" else main(argv)
    except SystemExit as e:  # argparse
        return e.code


@pytest.mark.parametrize("argv, message", CASES, ids=[f"{i:02d}-{c[0][0]}" for i, c in enumerate(CASES)])
def test_bad_invocation_is_refused_in_one_line(argv, message, places, tmp_path, capsys):
    argv, message = [fill(a, places) for a in argv], fill(message, places)
    before = snapshot(tmp_path)
    code = run(argv)
    out, err = capsys.readouterr()
    assert code == 2, err
    assert "Traceback" not in err and out == ""
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if ": error: " in line]
    assert errors == [lines[-1]], f"one error line, last: {lines[-3:]}"
    command = "sweep" if argv[0] == "sweep" else argv[0]
    assert errors[0].startswith(f"subfit {command}: error: ") and message in errors[0], errors[0]
    assert FIX.search(errors[0].split(": error: ", 1)[1]), f"no fix in: {errors[0]}"
    assert snapshot(tmp_path) == before


def test_bad_line_of_an_offline_task_file_is_refused(places, tmp_path, capsys, monkeypatch):
    """lm-eval reads the offline tasks through bench/tasks/local_data.py, which checks every line."""
    monkeypatch.setenv("SUBFIT_ASSETS", places["{assets}"])
    before = snapshot(tmp_path)
    argv = [fill(a, places) for a in ["eval", "{model}", "--tasks", "piqa_local", "--include-path", "{tasks}",
                                      "--json", "{new}/report.json"]]
    assert run(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("subfit eval: error: ") and "piqa.jsonl:2: gold is 3; expected the index" in err, err
    assert snapshot(tmp_path) == before


def test_sweep_passes_its_refusal_through(places, tmp_path, capfd):
    """`subfit sweep` runs bench/sweep/sweep.py in a new interpreter: its status and line come back."""
    argv = [fill(a, places) for a in ["sweep", "{model}", "--calib", "{text}", "--ppl", "{text}", "--cache",
                                      "{new}/cache", "--out", "{results}"]]
    before = snapshot(tmp_path)
    assert main(argv) == 2
    err = capfd.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("subfit sweep: error: ") and "already exists" in err
    assert snapshot(tmp_path) == before
