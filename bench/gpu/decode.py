"""Phase 4: batch-1 and batch-8 decode on random-weight bf16 models of Llama-3.2-1B, SmolLM2-135M and
Llama-3.1-8B shapes, built on the GPU.

Contenders: transformers eager, transformers static cache + torch.compile (in a child process with
its own time box: its compilation can take minutes), the runtime dense, and the runtime at 25% and
37.5% (shape-only plans: random bypasses on non-contiguous units, `synthetic_plan`). Per row:
tokens/s, ms/token, KV bytes per token (checked against the plan's accounting), and % of the
roofline = (weights + KV bytes read per step) / time / the copy bandwidth of phase 1.
"""
from __future__ import annotations

import gc
import os
import subprocess
import sys

import torch

from bench.gpu.figures import Phase, attempt, phase_args
from bench.gpu.shapes import random_model
from bench.gpu.timing import copy_bandwidth
from subfit.models import Decoder
from subfit.plan import Plan
from subfit.runtime import Runtime
from subfit.runtime.bench import HFContender, RuntimeContender, compare, synthetic_plan

ORDER = ("Llama-3.2-1B", "SmolLM2-135M", "Llama-3.1-8B")  # the targets' model first
BATCHES = (1, 8)
SPARSITIES = (0.0, 0.25, 0.375)
COMPILE_BOX_S = 60.0  # the compiled transformers contender's own time box (at least)
# (prompt tokens, new tokens, timed rounds): transformers eager is slow per step, so it decodes fewer
RUNTIME_STEPS, HF_STEPS = (128, 64, 5), (128, 32, 2)
DRY_RUN_STEPS = (8, 4, 1)


def prompt(model, batch: int, length: int) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(batch))


def runtime_contender(model, source, sparsity: float, max_seq_len: int) -> RuntimeContender:
    plan = synthetic_plan(model, source, sparsity) if sparsity else Plan.empty(Decoder(model), source)
    return RuntimeContender(Runtime.from_hf(model, plan, max_seq_len=max_seq_len))


def timed_row(phase: Phase, name: str, label: str, build, ids: torch.Tensor, steps: tuple[int, int, int],
              bandwidth: float, **extra) -> None:
    prompt_len, new, rounds = steps
    row = compare({label: build}, ids[:, :prompt_len], new, rounds, bandwidth=bandwidth)[0]
    del row["speedup"]  # ratios are the report's, across rows
    phase.row({"model": name, "batch": ids.shape[0], "prompt": prompt_len, "new_tokens": new, "rounds": rounds,
               **row, **extra})


def models_and_contenders(phase: Phase, args, device, dtype, bandwidth: float) -> None:
    for name in ORDER:
        if phase.seconds_left() < COMPILE_BOX_S + 20:
            phase.note(f"time box: {name} not measured (the compiled transformers contender keeps its {COMPILE_BOX_S:.0f} s)")
            continue
        with attempt(phase, f"{name}"):
            model, source = random_model(name, dtype=dtype, device=device, dry_run=args.dry_run)
            for batch in BATCHES:
                ids = prompt(model, batch, DRY_RUN_STEPS[0] if args.dry_run else RUNTIME_STEPS[0])
                hf_steps = DRY_RUN_STEPS if args.dry_run else HF_STEPS
                runtime_steps = DRY_RUN_STEPS if args.dry_run else RUNTIME_STEPS
                with attempt(phase, f"{name} batch {batch} transformers eager"):
                    timed_row(phase, name, "transformers eager", lambda: HFContender(model), ids, hf_steps, bandwidth)
                for sparsity in SPARSITIES:
                    label = f"runtime {100 * sparsity:g}%" if sparsity else "runtime dense"
                    max_seq_len = runtime_steps[0] + runtime_steps[1]
                    with attempt(phase, f"{name} batch {batch} {label}"):
                        contender = runtime_contender(model, source, sparsity, max_seq_len)
                        plan = contender.runtime.plan
                        accounting = plan.accounting()
                        dense = accounting["dense_kv_elements_per_token"] * dtype.itemsize
                        # the cache the runtime allocated = retained / all attention units x the dense cache
                        exact = contender.kv_bytes_per_token() * plan.num_layers == dense * accounting["kv_slots"]
                        timed_row(phase, name, label, lambda: contender, ids, runtime_steps, bandwidth,
                                  sparsity=accounting["sparsity"], kv_slots=f"{accounting['kv_slots']}/{plan.num_layers}",
                                  dense_kv_bytes_per_token=dense, kv_exact=exact)
                        del contender
                        gc.collect()
            del model
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()


def compiled_transformers(phase: Phase, args, device, dtype, bandwidth: float) -> None:
    """The child: transformers static cache + torch.compile at batch 1, model by model until its box ends."""
    steps = DRY_RUN_STEPS if args.dry_run else HF_STEPS
    for name in ORDER:
        with attempt(phase, f"{name} transformers static cache + torch.compile"):
            model, _ = random_model(name, dtype=dtype, device=device, dry_run=args.dry_run)
            timed_row(phase, name, "transformers static cache + torch.compile",
                      lambda: HFContender(model, compiled=True, max_cache_len=steps[0] + steps[1]),
                      prompt(model, 1, steps[0]), steps, bandwidth)
            del model
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()


def run_child(phase: Phase, args) -> None:
    box = phase.seconds_left() - 15  # the phase's clock starts after its imports; the shell's box before them
    if box < 10:
        phase.note("no time left for transformers static cache + torch.compile")
        return
    command = [sys.executable, "-m", "bench.gpu.decode", "--hf-compile", "--work", str(args.work), "--budget",
               str(box)] + (["--dry-run"] if args.dry_run else [])
    env = dict(os.environ)
    if args.dry_run:  # the dry run checks the static-cache path, not inductor's compile time on a CPU
        env["TORCHDYNAMO_DISABLE"] = "1"
    print("+", " ".join(command), flush=True)
    try:
        rc = subprocess.run(command, env=env, timeout=box).returncode
        if rc:
            phase.note(f"transformers static cache + torch.compile failed (exit {rc}); see the log")
    except subprocess.TimeoutExpired:
        phase.note(f"transformers static cache + torch.compile: time box of {box:.0f} s reached; the models not in "
                   "the table did not finish")


def main() -> None:
    args = phase_args(__doc__.splitlines()[0], {"--hf-compile": "time only transformers static cache + torch.compile"})
    phase = Phase(4, "decode", args, part="hf_compile" if args.hf_compile else "")
    with phase.running():
        device = torch.device("cpu" if args.dry_run else "cuda")
        dtype = torch.float32 if args.dry_run else torch.bfloat16
        bandwidth = copy_bandwidth(args.work, device)
        phase.figure("copy_bandwidth_Bps", bandwidth)
        if args.hf_compile:
            compiled_transformers(phase, args, device, dtype, bandwidth)
            return
        phase.figure("dtype", str(dtype).removeprefix("torch."))
        models_and_contenders(phase, args, device, dtype, bandwidth)
        run_child(phase, args)


if __name__ == "__main__":
    main()
