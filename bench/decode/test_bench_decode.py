"""Batch-1 decode speed: transformers vs the subfit runtime, dense and at 12.5 / 25 / 37.5 % plans.

Run: `pytest bench/decode --benchmark-only -s`. Two models: SmolLM2-135M-Instruct (the real default
model) and a Llama-3.2-1B-shaped model with random weights (hidden 2048, 16 layers, 32/8 heads,
FFN 8192, vocab 128256). Speed depends on a plan's shape, not its weights, so the plans are
`synthetic_plan`s: bypasses (attn rank hidden/8, ffn rank hidden/2) on non-contiguous layers.

Each case is one pytest-benchmark (the decode steps after an untimed prefill); prefill latency is
timed beside it. The one table of ratios, KV bytes per token and % of the memory roofline (weight
and KV bytes read per step / measured copy bandwidth) goes to bench/results/decode_<device>.md
(+ .json) when the session ends. No timing is asserted. CPU threads: $BENCH_THREADS (default 1).
"""
from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import time
from pathlib import Path

import pytest
import torch

from subfit import models
from subfit.models import Decoder
from subfit.plan import Plan
from subfit.runtime import Runtime
from subfit.runtime.bench import (HFContender, RuntimeContender, markdown_table, memory_bandwidth, synchronize,
                                  synthetic_plan)

ROOT = Path(__file__).resolve().parents[2]
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
if DEVICE.type == "cpu":  # memory-bound: 1 thread streamed weights as fast as 2 here, and is steadier under load
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))

# model -> (prompt tokens, new tokens, timed rounds); the 1B-shaped model is slow on CPU.
SETTINGS = {
    "SmolLM2-135M": (64, 33, 5) if DEVICE.type == "cpu" else (128, 129, 10),
    "Llama-3.2-1B-shape (random)": (32, 9, 3) if DEVICE.type == "cpu" else (128, 129, 10),
}
CONTENDERS = ("transformers eager (dense)", "transformers static cache + torch.compile (dense)", "runtime dense",
              "runtime 12.5%", "runtime 25%", "runtime 37.5%")
CASES = [(m, c) for m in SETTINGS for c in CONTENDERS]
ROWS: dict[str, list[dict]] = {}


def llama_1b_shape():
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, vocab_size=128256, max_position_embeddings=131072,
                         rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 8192},
                         tie_word_embeddings=True, rms_norm_eps=1e-5)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=DTYPE, attn_implementation="sdpa")
    return model.to(DEVICE).eval(), models.ModelSource("random:llama-3.2-1b-shape")


_loaded: dict[str, tuple] = {}


def base_model(name: str):
    """One model in memory at a time (the 1B-shaped one needs ~5 GB in float32)."""
    if name not in _loaded:
        _loaded.clear()
        gc.collect()
        if name == "SmolLM2-135M":
            try:
                model, _, source = models.load(None, dtype=DTYPE, device=DEVICE)
            except FileNotFoundError as e:
                pytest.skip(str(e))
        else:
            model, source = llama_1b_shape()
        _loaded[name] = (model, source)
    return _loaded[name]


def contender(name: str, model, source, max_seq_len: int):
    if name.startswith("transformers static"):
        if DEVICE.type != "cuda":
            pytest.skip("transformers static cache + torch.compile: GPU only (CPU inductor compile time dominates "
                        "and is not what this comparison is about)")
        return HFContender(model, compiled=True, max_cache_len=max_seq_len)
    if name.startswith("transformers"):
        return HFContender(model)
    sparsity = 0.0 if name == "runtime dense" else float(name.split()[-1].rstrip("%")) / 100
    plan = synthetic_plan(model, source, sparsity) if sparsity else Plan.empty(Decoder(model), source)
    return RuntimeContender(Runtime.from_hf(model, plan, max_seq_len=max_seq_len))


@pytest.fixture(scope="session")
def bandwidth() -> float:
    return memory_bandwidth(DEVICE)


@pytest.fixture(scope="session", autouse=True)
def write_table(bandwidth):
    """After the last case: one table for the whole run."""
    yield
    if not ROWS:
        return
    lines = [f"# Decode speed, batch 1, {DEVICE.type} ({DTYPE})", "",
             f"machine: {_machine()}; torch {torch.__version__}, threads {torch.get_num_threads()}; "
             f"measured copy bandwidth {bandwidth / 1e9:.1f} GB/s", ""]
    for model_name, rows in ROWS.items():
        prompt, new, rounds = SETTINGS[model_name]
        eager = next((r for r in rows if r["contender"].startswith("transformers eager")), rows[0])
        dense = next((r for r in rows if r["contender"] == "runtime dense"), rows[0])
        for r in rows:
            r["speedup"] = r["tokens_per_s"] / eager["tokens_per_s"]
            r["vs_runtime_dense"] = r["tokens_per_s"] / dense["tokens_per_s"]
        lines += [f"## {model_name}: prompt {prompt} tokens, {new} generated, median of {rounds} rounds", "",
                  markdown_table(rows, baseline="transformers eager"), ""]
    lines += ["decode = time per generated token after prefill (greedy); % roofline = (weights + KV read per step) / "
              "time / copy bandwidth.", "", "measured with `pytest bench/decode --benchmark-only -s`"]
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"decode_{DEVICE.type}.md").write_text("\n".join(lines) + "\n")
    (out / f"decode_{DEVICE.type}.json").write_text(json.dumps(
        {"device": DEVICE.type, "dtype": str(DTYPE), "machine": _machine(), "threads": torch.get_num_threads(),
         "bandwidth_bytes_per_s": bandwidth, "models": ROWS}, indent=1))


def _machine() -> str:
    if DEVICE.type == "cuda":
        return torch.cuda.get_device_name(DEVICE)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())  # other work on the machine skews CPU timings
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average {load}"


@pytest.mark.parametrize("model_name, name", CASES, ids=[f"{m}-{c}" for m, c in CASES])
def test_decode(benchmark, bandwidth, model_name, name):
    model, source = base_model(model_name)
    prompt, new, rounds = SETTINGS[model_name]
    ids = torch.randint(0, model.config.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(0))
    runner = contender(name, model, source, max_seq_len=prompt + new)

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
    row = {"contender": name, "prefill_ms": statistics.median(prefill_times[1:]) * 1e3,
           "decode_ms_per_token": decode_s * 1e3, "tokens_per_s": 1 / decode_s, "kv_bytes_per_token": kv,
           "bytes_read_per_step": int(read), "roofline": read / decode_s / bandwidth}
    benchmark.extra_info.update(row)
    ROWS.setdefault(model_name, []).append(row)
    del runner
    gc.collect()
