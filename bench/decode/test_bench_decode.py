"""Batch-1 decode speed: transformers eager vs the subfit runtime, dense and at 12.5 / 25 / 37.5 %
plans, at each CPU thread count; and how closely the bf16 runtime follows the float32 one.

Run: `flock /tmp/subfit-cpu.lock pytest bench/decode --benchmark-only -s` (CPU thread counts:
$BENCH_THREADS, default "1,2", all in one run). Two models: SmolLM2-135M-Instruct (the real
default model) and a Llama-3.2-1B-shaped model with random weights (hidden 2048, 16 layers, 32/8
heads, FFN 8192, vocab 128256). Speed depends on a plan's shape, not its weights, so the plans
have random bypass weights: for SmolLM2 the shapes (unit actions, ranks) of SubFit's default plans
at each level, read from bench/results/draws3_<level>_smollm2.json; for the 1B-shaped model
`synthetic_plan`s (bypasses on non-contiguous layers, alternating attention and feedforward).

transformers runs in the dtype the runtime reads models in (float32 on CPU); the runtime rows run
float32 and the default dtype (bf16 on CUDA and on a CPU with AMX or AVX512-BF16). Each case is one
pytest-benchmark (the decode steps after an untimed prefill); prefill latency is timed beside it.
The tables (ratios, bytes read per step, % of the copy bandwidth measured in the same run at the
same thread count, versions and bf16 units beside every figure) go to
bench/results/decode_<device>.md (+ .json) when the session ends. No timing is asserted.
"""
from __future__ import annotations

import gc
import json
import os
import statistics
import time
from pathlib import Path

import pytest
import torch

from subfit import models
from subfit.models import Decoder
from subfit.plan import Plan
from subfit.runtime import Runtime
from subfit.runtime.bench import (HFContender, RuntimeContender, describe, dtype_name, environment, greedy_agreement,
                                  markdown_table, memory_bandwidth, shaped_plan, synchronize, synthetic_plan)
from subfit.runtime.generate import parse_dtype, read_dtype
from subfit.runtime.model import Dense

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT.parents[1] / "bench" / "results"
PROMPTS = ROOT / "prompts.txt"
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
RUNTIME_DTYPE = parse_dtype(None, DEVICE)  # what `subfit.runtime.load` picks here
HF_DTYPE = read_dtype(RUNTIME_DTYPE, DEVICE)  # what it reads the model in, and transformers runs in
THREADS = [int(t) for t in os.environ.get("BENCH_THREADS", "1,2").split(",")] if DEVICE.type == "cpu" else [0]
AGREEMENT_TOKENS = 32

# model -> (prompt tokens, new tokens, timed rounds); the 1B-shaped model is slow on CPU.
SETTINGS = {
    "SmolLM2-135M": (64, 33, 5) if DEVICE.type == "cpu" else (128, 129, 10),
    "Llama-3.2-1B-shape (random)": (32, 9, 3) if DEVICE.type == "cpu" else (128, 129, 10),
}
# contender -> (kind, sparsity, dtype)
CONTENDERS = {f"transformers eager (dense, {dtype_name(HF_DTYPE)})": ("eager", 0.0, HF_DTYPE)}
if DEVICE.type == "cuda":
    CONTENDERS["transformers static cache + torch.compile (dense)"] = ("compiled", 0.0, HF_DTYPE)
for _dtype in dict.fromkeys((HF_DTYPE, RUNTIME_DTYPE)):
    CONTENDERS[f"runtime dense ({dtype_name(_dtype)})"] = ("runtime", 0.0, _dtype)
for _sparsity in (0.125, 0.25, 0.375):
    CONTENDERS[f"runtime {_sparsity:.1%} ({dtype_name(RUNTIME_DTYPE)})"] = ("runtime", _sparsity, RUNTIME_DTYPE)
CASES = [(m, t, c) for m in SETTINGS for t in THREADS for c in CONTENDERS]
ROWS: dict[str, dict[int, list[dict]]] = {}
AGREEMENT: list[dict] = []
OPS: dict[int, list[dict]] = {}
PROFILED = [name for name, (kind, sparsity, _) in CONTENDERS.items() if kind == "eager" or kind == "runtime" and not sparsity]
GEMV_LABEL = "subfit::cpu_gemv"  # the profiler ranges around the C++ kernels' calls
NORM_LABEL = "subfit::cpu_add_rms_norm"
UNIT_LABEL = "subfit::cpu_decode_unit"  # a whole unit in one C++ call (its SDPA stays visible as attention)
MATMUL_OPS = {"aten::linear", "aten::matmul", "aten::t", "aten::mm", "aten::addmm", "aten::mv", "aten::addmv",
              "aten::addmv_"}


def llama_1b_shape():
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, vocab_size=128256, max_position_embeddings=131072,
                         rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 8192},
                         tie_word_embeddings=True, rms_norm_eps=1e-5)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=HF_DTYPE, attn_implementation="sdpa")
    return model.to(DEVICE).eval(), None, models.ModelSource("random:llama-3.2-1b-shape")


_loaded: dict[str, tuple] = {}


def base_model(name: str):
    """(model, tokenizer, source), one model in memory at a time (the 1B-shaped one needs ~5 GB in float32)."""
    if name not in _loaded:
        _loaded.clear()
        gc.collect()
        if name == "SmolLM2-135M":
            try:
                _loaded[name] = models.load(None, dtype=HF_DTYPE, device=DEVICE)
            except FileNotFoundError as e:
                pytest.skip(str(e))
        else:
            _loaded[name] = llama_1b_shape()
    return _loaded[name]


def contender(name: str, model_name: str, model, source, max_seq_len: int):
    kind, sparsity, dtype = CONTENDERS[name]
    if kind == "compiled":
        return HFContender(model, compiled=True, max_cache_len=max_seq_len)
    if kind == "eager":
        return HFContender(model)
    plan = plan_at(model_name, model, source, sparsity)
    return RuntimeContender(Runtime.from_hf(model, plan, max_seq_len=max_seq_len, dtype=dtype))


def subfit_row(sparsity: float) -> dict | None:
    """SubFit's default SmolLM2 plan at this level, as the quality sweep recorded it."""
    path = RESULTS / f"draws3_{sparsity:g}_smollm2.json"
    if not path.exists():
        return None
    return next(r for r in json.loads(path.read_text())["rows"] if r["method"] == "subfit")


def plan_at(model_name: str, model, source, sparsity: float) -> Plan:
    """The plan timed at `sparsity`: SubFit's default plan's shape for SmolLM2, else a synthetic one."""
    if not sparsity:
        return Plan.empty(Decoder(model), source)
    row = subfit_row(sparsity) if model_name == "SmolLM2-135M" else None
    if row is None:
        return synthetic_plan(model, source, sparsity)
    return shaped_plan(model, source, row["actions"]["attn"], row["actions"]["ffn"])


_bandwidth: dict[int, float] = {}


def bandwidth(threads: int) -> float:
    """Copy bandwidth at this thread count, measured once in this run."""
    if threads not in _bandwidth:
        _bandwidth[threads] = memory_bandwidth(DEVICE)
    return _bandwidth[threads]


@pytest.fixture(scope="session", autouse=True)
def write_results():
    """After the last case: the tables for the whole run."""
    start_load = _load_average()
    yield
    if not (ROWS or OPS or AGREEMENT):
        return
    env = environment(DEVICE)
    env.pop("threads", None)
    lines = [f"# Decode speed, batch 1, {DEVICE.type}", "", describe(env), ""]
    if DEVICE.type == "cpu":
        lines += [f"load average (1, 5, 15 min) at start {start_load}, at end {_load_average()}: other work on the "
                  "machine skews CPU timings", ""]
    for model_name, by_threads in ROWS.items():
        prompt, new, rounds = SETTINGS[model_name]
        for threads, rows in by_threads.items():
            eager = next((r for r in rows if r["contender"].startswith("transformers eager")), rows[0])
            dense = next((r for r in rows if r["contender"] == f"runtime dense ({dtype_name(HF_DTYPE)})"), rows[0])
            for r in rows:
                r["speedup"] = r["tokens_per_s"] / eager["tokens_per_s"]
                r["vs_runtime_dense"] = r["tokens_per_s"] / dense["tokens_per_s"]
            where = f"{threads} thread{'s' * (threads > 1)}, " if DEVICE.type == "cpu" else ""
            lines += [f"## {model_name}: {where}prompt {prompt} tokens, {new} generated, median of {rounds} rounds", "",
                      f"copy bandwidth {rows[0]['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s", "",
                      markdown_table(rows, baseline="transformers eager",
                                     dense_name=f"runtime dense {dtype_name(HF_DTYPE)}"), ""]
    lines += ["decode = time per generated token after prefill (greedy); MB/step = weight + KV bytes one decode step "
              "reads, as stored (bf16 weights, float32 norms, bypasses and residual stream); % roofline = those bytes "
              "/ decode time / copy bandwidth (read + write bytes of a large copy per second).", ""]
    lines += _ops_lines() + _plan_note() + _agreement_lines()
    lines += ["measured with `flock /tmp/subfit-cpu.lock pytest bench/decode --benchmark-only -s`"]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"decode_{DEVICE.type}.md").write_text("\n".join(lines) + "\n")
    (RESULTS / f"decode_{DEVICE.type}.json").write_text(json.dumps(
        {"environment": env, "load_average": {"start": start_load, "end": _load_average()},
         "models": {m: {str(t): rows for t, rows in by.items()} for m, by in ROWS.items()},
         "ops": {str(t): rows for t, rows in OPS.items()}, "agreement": AGREEMENT}, indent=1))


def _load_average() -> str:
    return ", ".join(f"{x:.1f}" for x in os.getloadavg())


def _plan_note() -> list[str]:
    """The shapes behind the plan rows."""
    if "SmolLM2-135M" not in _loaded:
        return []
    model, _, source = _loaded["SmolLM2-135M"]
    lines = ["SmolLM2 plan rows run the shapes of SubFit's default plans (`bench/results/draws3_<level>_smollm2.json`) "
             "with random bypass weights:", "",
             "| level | attn bypasses | ffn bypasses | removed params | bypass params | KV reduction |",
             "|---|---:|---:|---:|---:|---:|"]
    for kind, sparsity, _ in CONTENDERS.values():
        if kind == "runtime" and sparsity:
            acc = plan_at("SmolLM2-135M", model, source, sparsity).accounting()
            lines.append(f"| {sparsity:.1%} | {acc['removed_attn']} | {acc['removed_ffn']} | {acc['removed_params']:,} | "
                         f"{acc['bypass_params']:,} | {acc['kv_reduction']:.0%} |")
    return lines + [""]


def _ops_lines() -> list[str]:
    if not OPS:
        return []
    lines = ["## Where a SmolLM2-135M decode step's time goes (torch.profiler, per token)", "",
             "| threads | contender | profiled ms/token | matmul ms (calls) | whole-unit kernels ms (calls) | "
             "attention ms | other ops ms (ops) | outside ops ms |", "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for threads, rows in OPS.items():
        for r in rows:
            lines.append(f"| {threads} | {r['contender']} | {r['ms']:.2f} | {r['matmul_ms']:.2f} ({r['matmul_calls']:.0f}) "
                         f"| {r['unit_ms']:.2f} ({r['unit_calls']:.0f}) | {r['attention_ms']:.2f} | "
                         f"{r['other_ms']:.2f} ({r['other_ops']:.0f}) | {r['outside_ms']:.2f} |")
    return lines + ["", "matmul = linear/mm/mv, subfit's bf16 GEMV kernel (`cpu_kernels`) and their dispatch; whole-unit "
                        "kernels = each attention, FeedForward and bypass unit of a decode step in one C++ call "
                        "(`cpu_kernels`: norm, matmuls, RoPE, cache write, attention, activation, residual add); "
                        "attention = PyTorch's SDPA where a unit runs op by op; other = norms (subfit's add + RMSNorm kernel on CPU), RoPE, cache writes, activations, "
                        "residual adds, sampling; outside ops = Python between ops (wall time less the ops' CPU time; "
                        "the profiler inflates both).", ""]


def _agreement_lines() -> list[str]:
    if not AGREEMENT:
        return []
    lines = [f"## {dtype_name(RUNTIME_DTYPE)} runtime vs float32 runtime, SmolLM2-135M, greedy, {AGREEMENT_TOKENS} "
             f"new tokens on each prompt of `bench/decode/prompts.txt`", "",
             "| prompt | tokens equal before the first difference | top-1 agreement along the float32 tokens | "
             "logits relative error |", "|---|---:|---:|---:|"]
    for a in AGREEMENT:
        lines.append(f"| {a['prompt']} | {a['same_prefix']}/{a['new_tokens']} | {a['top1']:.1%} | "
                     f"{a['relative_error']:.2e} |")
    return lines + ["", "relative error = ||logits - float32 logits|| / ||float32 logits|| over all positions, both "
                        "fed the float32 runtime's tokens.", ""]


@pytest.mark.parametrize("model_name, threads, name", CASES, ids=[f"{m}-{t}t-{c}" for m, t, c in CASES])
def test_decode(benchmark, model_name, threads, name):
    if threads:
        torch.set_num_threads(threads)
    model, _, source = base_model(model_name)
    prompt, new, rounds = SETTINGS[model_name]
    ids = torch.randint(0, model.config.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(0))
    copy_bandwidth = bandwidth(threads)
    runner = contender(name, model_name, model, source, max_seq_len=prompt + new)

    def prefill():
        synchronize(DEVICE)
        start = time.perf_counter()
        token = runner.prefill(ids)
        synchronize(DEVICE)
        prefill_times.append(time.perf_counter() - start)
        return (token,), {}

    def decode(token):
        for _ in range(new - 1):
            token = runner.decode(token)
        synchronize(DEVICE)

    prefill_times: list[float] = []
    benchmark.pedantic(decode, setup=prefill, rounds=rounds, warmup_rounds=1, iterations=1)
    decode_s = benchmark.stats.stats.median / (new - 1)
    kv = runner.kv_bytes_per_token()
    read = runner.weight_bytes_per_token() + kv * (prompt + new / 2)
    row = {"contender": name, "dtype": dtype_name(CONTENDERS[name][2]),
           "prefill_ms": statistics.median(prefill_times[1:]) * 1e3, "decode_ms_per_token": decode_s * 1e3, "tokens_per_s": 1 / decode_s, "kv_bytes_per_token": kv,
           "bytes_read_per_step": int(read), "roofline": read / decode_s / copy_bandwidth,
           "bandwidth_bytes_per_s": copy_bandwidth, **environment(DEVICE)}
    benchmark.extra_info.update(row)
    ROWS.setdefault(model_name, {}).setdefault(threads, []).append(row)
    del runner
    gc.collect()


@pytest.mark.skipif(RUNTIME_DTYPE == torch.float32, reason="the runtime's default dtype here is float32")
def test_default_dtype_follows_float32(benchmark):
    """Greedy tokens and logits of the default-dtype runtime against the float32 runtime (not timed)."""
    if DEVICE.type == "cpu":
        torch.set_num_threads(THREADS[0])
    model, tokenizer, source = base_model("SmolLM2-135M")
    if model.dtype != torch.float32:
        model, tokenizer, source = models.load(None, dtype=torch.float32, device=DEVICE)
    prompts = [line for line in PROMPTS.read_text().splitlines() if line.strip()]
    plan = Plan.empty(Decoder(model), source)
    reference = Runtime.from_hf(model, plan, tokenizer, dtype=torch.float32)
    other = Runtime.from_hf(model, plan, tokenizer, dtype=RUNTIME_DTYPE)

    def measure():
        return [greedy_agreement(reference, other, tokenizer(p).input_ids, AGREEMENT_TOKENS) for p in prompts]

    results = benchmark.pedantic(measure, rounds=1, iterations=1)
    AGREEMENT.extend({"prompt": p, **r} for p, r in zip(prompts, results))


def label_cpu_kernels(model) -> None:
    """Make the C++ kernels' calls visible to torch.profiler (a pybind call is no aten op): each
    `Dense` of this model calls the GEMV inside a profiler range named GEMV_LABEL, its ops the
    add + RMSNorm inside NORM_LABEL, its units their whole-unit kernels inside UNIT_LABEL."""
    from torch.profiler import record_function

    def labelled(kernel, label):
        def call(*args):
            with record_function(label):
                return kernel(*args)
        return call

    for module in model.modules():
        if isinstance(module, Dense) and module.kernel is not None:
            module.kernel = labelled(module.kernel, GEMV_LABEL)
        if getattr(module, "decode_kernel", None) is not None:
            module.decode_kernel = labelled(module.decode_kernel, UNIT_LABEL)
    if getattr(model.ops, "norm_kernel", None) is not None:
        model.ops.norm_kernel = labelled(model.ops.norm_kernel, NORM_LABEL)


@pytest.mark.parametrize("threads", THREADS, ids=[f"{t}t" for t in THREADS])
def test_decode_ops(benchmark, threads):
    """SmolLM2 decode steps under torch.profiler: time and op counts per token by kind of op (not
    the speed figures: the profiler slows small ops)."""
    from torch.profiler import profile

    if threads:
        torch.set_num_threads(threads)
    model, _, source = base_model("SmolLM2-135M")
    prompt, new, _ = SETTINGS["SmolLM2-135M"]
    ids = torch.randint(0, model.config.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(0))

    def measure(name: str) -> dict:
        runner = contender(name, "SmolLM2-135M", model, source, max_seq_len=prompt + new)
        if isinstance(runner, RuntimeContender):
            label_cpu_kernels(runner.runtime.model)
        token = runner.prefill(ids)
        for _ in range(3):
            token = runner.decode(token)
        steps = new - 4
        with profile() as prof:
            start = time.perf_counter()
            for _ in range(steps):
                token = runner.decode(token)
            wall = time.perf_counter() - start
        row = {"contender": name, "ms": wall / steps * 1e3, "matmul_ms": 0.0, "unit_ms": 0.0, "attention_ms": 0.0,
               "other_ms": 0.0, "matmul_calls": 0, "unit_calls": 0, "other_ops": 0}
        for event in prof.events():
            kind = ("matmul" if event.name in MATMUL_OPS or event.name.startswith(("mkldnn::", GEMV_LABEL))
                    else "unit" if event.name == UNIT_LABEL
                    else "attention" if "scaled_dot_product" in event.name else "other")
            row[f"{kind}_ms"] += event.self_cpu_time_total / 1e3 / steps
            if event.name in ("aten::mm", "aten::addmm", "aten::mv", "aten::addmv", GEMV_LABEL):
                row["matmul_calls"] += 1 / steps
            elif kind == "unit":
                row["unit_calls"] += 1 / steps
            elif kind == "other" and not event.cpu_children:
                row["other_ops"] += 1 / steps
        row["outside_ms"] = row["ms"] - row["matmul_ms"] - row["unit_ms"] - row["attention_ms"] - row["other_ms"]
        return row

    OPS[threads] = benchmark.pedantic(lambda: [measure(name) for name in PROFILED], rounds=1, iterations=1)
