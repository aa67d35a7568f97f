"""What compress costs on this machine, and what its plans are worth: SmolLM2-135M-Instruct.

Run: `pytest bench/compress --benchmark-only -s` (about an hour on the 2-core CPU). Two jobs, each
in a child process so its peak resident memory is its own, both with compress's defaults:

- `self`: the quick start, `subfit compress --sparsity 0.25 --out DIR` (text sampled from the model);
- `levels`: `subfit.compress_levels` at the five levels 12.5%-37.5% on wiki_passages.txt in one call.

One level on wiki_passages.txt (`subfit compress --sparsity 0.25 --calib wiki_passages.txt`), with
the time of each of its phases, is `profile_compress.py`'s job; its 25% plan is the levels job's.

Every plan is then scored on WikiText-2 (window 1024, first 16,384 tokens) as a ratio to the dense
model. The table goes to bench/results/compress_<device>.md (+ .json). No time is asserted.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ASSETS = Path(os.environ.get("SUBFIT_ASSETS", ROOT.parent / "shared" / "assets"))
CALIB = ASSETS / "data" / "calib" / "wiki_passages.txt"
WIKITEXT = ASSETS / "data" / "wikitext-2-raw" / "wiki.test.raw"
LEVELS = (0.125, 0.1875, 0.25, 0.3125, 0.375)
RESULTS: dict[str, dict] = {}

# Every job reports its own peak resident memory when it exits.
PEAK = ("import atexit, resource, sys\n"
        "atexit.register(lambda: print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr))\n")
CLI_JOB = PEAK + "from subfit.cli import main\nsys.exit(main(sys.argv[1:]))\n"
LEVELS_JOB = PEAK + """from subfit import compress_levels, models
model, tokenizer, _ = models.load(None)
for level, plan in zip({levels}, compress_levels(model, {levels}, sys.argv[1], tokenizer=tokenizer, progress=False)):
    plan.save(f"{{sys.argv[2]}}/{{level:g}}")
"""

pytestmark = pytest.mark.skipif(not (CALIB.exists() and WIKITEXT.exists()), reason=f"{ASSETS} lacks the texts: set SUBFIT_ASSETS")


def run(argv: list[str], extensions: Path) -> dict:
    """Run a child process as a user's first run (C++ kernels built into the empty `extensions`
    folder); its wall time and peak resident memory."""
    start = time.perf_counter()
    done = subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          env={**os.environ, "TORCH_EXTENSIONS_DIR": str(extensions)})
    seconds = time.perf_counter() - start
    peak_kb = int(done.stderr.rsplit("PEAK_RSS_KB", 1)[1].split()[0])
    return {"seconds": seconds, "peak_rss_gb": peak_kb / 2**20}


def ppl_ratio(plan_dir: Path) -> float:
    """WikiText-2 perplexity of the plan over the dense model's, measured side by side."""
    report = plan_dir.parent / f"{plan_dir.name}.eval.json"
    subprocess.run([sys.executable, "-m", "subfit.cli", "eval", str(plan_dir), "--ppl", str(WIKITEXT), "--window",
                    "1024", "--max-tokens", "16384", "--json", str(report)], check=True, stdout=subprocess.DEVNULL)
    columns = json.loads(report.read_text())["columns"]
    return columns["compressed"]["perplexity"]["ppl"] / columns["dense"]["perplexity"]["ppl"]


JOBS = ("self", "levels")


@pytest.mark.parametrize("job", JOBS)
def test_compress_cost_and_quality(job, benchmark, tmp_path):
    out = tmp_path / job
    if job == "levels":
        argv = [sys.executable, "-c", LEVELS_JOB.format(levels=list(LEVELS)), str(CALIB), str(out)]
    else:
        argv = [sys.executable, "-c", CLI_JOB, "compress", "--sparsity", "0.25", "--out", str(out)]
    result = benchmark.pedantic(run, args=(argv, tmp_path / "torch_extensions"), rounds=1, iterations=1)
    plans = {level: out / f"{level:g}" for level in LEVELS} if job == "levels" else {0.25: out}
    result["ppl_ratio"] = {f"{level:g}": ppl_ratio(path) for level, path in plans.items()}
    result["sparsity"] = {f"{level:g}": json.loads((path / "plan.json").read_text())["accounting"]["sparsity"]
                          for level, path in plans.items()}
    benchmark.extra_info.update(result)
    RESULTS[job] = result


@pytest.fixture(scope="module", autouse=True)
def write_results():
    """After the jobs that ran (`-k self` runs one): their table."""
    yield
    if not RESULTS:
        return
    import torch

    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
    names = {"self": "`subfit compress --sparsity 0.25` (text sampled from the model)",
             "levels": "`compress_levels` at 12.5%, 18.75%, 25%, 31.25%, 37.5% on wiki_passages.txt, one call"}
    lines = ["# Compress: cost and quality, SmolLM2-135M-Instruct, compress's defaults", "",
             f"`python -m pytest {' '.join(sys.argv[1:])}` on {machine}. Time is a first run's: it includes loading "
             "the model and building the C++ kernels; WikiText-2 perplexity (window 1024, first 16,384 tokens) "
             "as a ratio to the dense model.", "",
             "| job | time | peak memory | exact sparsity | WikiText-2, x dense |", "|---|---:|---:|---:|---:|"]
    for job, result in RESULTS.items():
        levels = ", ".join(result["sparsity"])
        lines.append(f"| {names[job]} | {result['seconds'] / 60:.1f} min | {result['peak_rss_gb']:.2f} GB | "
                     + ", ".join(f"{v:.3f}" for v in result["sparsity"].values()) + " | "
                     + ", ".join(f"{v:.2f}x" for v in result["ppl_ratio"].values()) + f" |  <!-- {levels} -->")
    results = ROOT / "bench" / "results"
    (results / "compress_cpu.md").write_text("\n".join(lines) + "\n")
    (results / "compress_cpu.json").write_text(json.dumps({"machine": machine, "jobs": RESULTS}, indent=1) + "\n")
