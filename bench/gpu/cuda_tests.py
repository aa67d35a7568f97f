"""Phase 2: the CUDA tests: every kernel test in float32, float16 and bfloat16, and the CUDA decode
runtime test (CUDA-graph decode vs eager vs transformers), in parallel workers.

pytest runs in a child process with its own deadline inside the phase's time box, so that a hung
test still leaves the counts of everything that finished (read from its JUnit XML).
"""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections import Counter

from bench.gpu.figures import Phase, phase_args

SUITES = ["tests/kernels", "tests/runtime/test_runtime_cuda.py"]
DRY_RUN_SUITES = ["tests/kernels/test_swiglu_kernel.py", "tests/runtime/test_runtime_cuda.py"]  # the machinery only
DTYPE = re.compile(r"\b(float32|float16|bfloat16)\b")


def outcome(case: ET.Element) -> str:
    for tag in ("failure", "error", "skipped"):
        if case.find(tag) is not None:
            return {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
    return "passed"


def message(case: ET.Element) -> str:
    element = case.find("failure") if case.find("failure") is not None else case.find("error")
    text = (element.get("message") or element.text or "").strip()
    return text.splitlines()[0][:300] if text else ""


def main() -> None:
    args = phase_args(__doc__.splitlines()[0])
    phase = Phase(2, "cuda_tests", args)
    with phase.running():
        junit = args.work / "phase2.xml"
        junit.unlink(missing_ok=True)
        command = [sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", f"--junitxml={junit}"]
        if not args.dry_run and importlib.util.find_spec("xdist"):
            command += ["-n", str(min(8, os.cpu_count() or 1))]
        command += DRY_RUN_SUITES if args.dry_run else SUITES
        env = dict(os.environ)
        if not args.dry_run:
            env.pop("TRITON_INTERPRET", None)  # real kernels on the GPU
        print("+", " ".join(command), flush=True)
        try:
            rc = subprocess.run(command, env=env, timeout=max(10.0, phase.seconds_left() - 15)).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
            phase.note("pytest stopped at its deadline; the counts cover the tests that finished")
        phase.figure("pytest_exit", rc)
        if not junit.exists():
            raise RuntimeError("pytest wrote no JUnit report")
        counts: Counter = Counter()
        by_dtype: Counter = Counter()
        failures = []
        for case in ET.parse(junit).getroot().iter("testcase"):
            result = outcome(case)
            suite = "runtime_cuda" if "test_runtime_cuda" in case.get("classname", "") else "kernels"
            counts[f"{suite}_{result}"] += 1
            found = DTYPE.search(case.get("name", ""))
            if suite == "kernels" and found:
                by_dtype[f"{found[1]}_{result}"] += 1
            if result in ("failed", "error"):
                failures.append(f"{case.get('classname')}::{case.get('name')}: {message(case)}")
        phase.figure("counts", dict(counts))
        phase.figure("kernel_tests_by_dtype", dict(by_dtype))
        phase.figure("failures", failures)
        for line in failures[:30]:
            phase.note(f"FAILED {line}")


if __name__ == "__main__":
    main()
