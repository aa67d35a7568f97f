"""bench/gpu.sh --dry-run: every phase of the one-shot GPU check runs on the CPU at tiny shapes and
leaves its figures, so the script, which runs only where a GPU is at hand, cannot rot between runs."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu")
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run(["bash", "bench/gpu.sh", "--dry-run"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out, done.stdout, json.loads((out / "gpu.json").read_text())


def test_every_phase_ran(dry_run):
    _, stdout, report = dry_run
    assert report["dry_run"] is True
    for number, phase in report["phases"].items():
        assert phase["status"] == "ok", f"phase {number}: {phase['status']} {phase['notes']}"
        assert phase["exit"] == 0 and phase["wall_s"] <= phase["box_s"]
    closing = stdout[stdout.rindex("GPU CHECK"):].splitlines()  # the closing table is printed last
    assert len(closing) < 30 and closing[-1].strip().startswith("full figures:")


def test_every_phase_left_its_figures(dry_run):
    out, _, report = dry_run
    p = report["phases"]
    assert p["1"]["figures"]["copy_bandwidth_Bps"] > 0 and p["1"]["figures"]["matmul_tflops"] > 0
    counts = p["2"]["figures"]["counts"]
    assert counts.get("kernels_passed", 0) > 0 and not counts.get("kernels_failed")
    assert counts.get("runtime_cuda_skipped", 0) > 0  # collected, and skipped without a GPU
    kernels = p["3"]["rows"]
    for op in ("add_rms_norm", "swiglu", "rope+cache", "bypass_attn", "bypass_ffn", "decode_attention"):
        timed = {r["impl"] for r in kernels if r["op"] == op and r.get("eager_us", 0) > 0}
        assert {"triton", "eager", "compile"} <= timed, f"{op}: only {timed} timed"
    liger = [r for r in kernels if r["impl"] == "liger" and r["op"] in ("add_rms_norm", "swiglu")]
    assert liger and all(r.get("eager_us") or r["status"].startswith(("error", "UNAVAILABLE")) for r in liger)
    contenders = {(r["model"], r["batch"], r["contender"]) for r in p["4"]["rows"]}
    for model in ("SmolLM2-135M", "Llama-3.2-1B", "Llama-3.1-8B"):
        for name in ("transformers eager", "runtime dense", "runtime 25%", "runtime 37.5%"):
            assert {(model, 1, name), (model, 8, name)} <= contenders
        assert (model, 1, "transformers static cache + torch.compile") in contenders
    assert all(r["kv_exact"] for r in p["4"]["rows"] if "kv_exact" in r)
    assert p["5"]["figures"]["compress_s"] > 0 and p["5"]["figures"]["sparsity"] > 0.2
    read = [t for t in report["targets"] if t["measured"] is not None or t["met"] is not None]
    assert len(report["targets"]) == 11 and len(read) >= 8  # Liger's and the launch-bound one need a GPU
    assert "## Targets" in (out / "gpu.md").read_text() and (out / "gpu.log").stat().st_size > 0
