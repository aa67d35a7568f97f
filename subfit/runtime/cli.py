"""`subfit generate` and `subfit bench`: registered on the main parser by `add_commands`."""
from __future__ import annotations

import argparse
import io
import os
import sys
import time
from pathlib import Path

from subfit.argtypes import positive_int, probability, sparsity, temperature

GENERATE_EXAMPLES = """examples:
  subfit generate plans/smollm2-25 --prompt "Once upon a time" --max-new-tokens 100
  subfit generate plans/smollm2-25 --prompt "The capital of France is" --temperature 0.7 --top-p 0.9 --seed 0
  subfit generate ../shared/assets/models/stories260K --prompt "Once upon a time"   # a model: dense
  subfit generate plans/moved --base /new/place/of/the/model --prompt "Hi" --device cuda --dtype bfloat16
  torchrun --nproc-per-node 2 -m subfit generate plans/llama-8b-25 --tp 2 --prompt "Hi"   # 2 GPUs, 1/2 each
"""
BENCH_EXAMPLES = """examples:
  subfit bench                                   # the default model, dense: transformers vs runtime
  subfit bench plans/smollm2-25                  # + the plan's runtime
  subfit bench --synthetic 0.125 0.25 0.375      # + shape-only plans at these sparsities
  subfit bench plans/smollm2-25 --device cuda --dtype bfloat16 --new-tokens 128
  subfit bench --threads 1 --rounds 5             # CPU: one thread is steadier on a busy machine
"""
DTYPES = ("float32", "float16", "bfloat16")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", nargs="?", default=None, metavar="PLAN_DIR_OR_MODEL",
                   help="plan directory, or a model (Hugging Face id, folder, .gguf) run dense; "
                        "default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="weights and KV cache (default: bfloat16 on CUDA and on a CPU with AMX or AVX512-BF16, "
                        "else float32)")
    p.add_argument("--base", default=None, help="base model location, when the plan's has moved")
    p.add_argument("--max-seq-len", type=positive_int, default=None,
                   help="KV cache length per sequence (default: min(model's max positions, 2048))")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="CPU threads for torch (default: torch's choice; 1 is often best for batch-1 decode "
                        "on a busy machine)")


def add_commands(subparsers) -> None:
    """Register `generate` and `bench` on an argparse subparsers object."""
    p = subparsers.add_parser("generate", help="generate text with a plan (or a dense model), streaming",
                              epilog=GENERATE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(p)
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=positive_int, default=64, help="tokens to generate (default 64)")
    p.add_argument("--temperature", type=temperature, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=positive_int, default=None, help="sample from the k most likely tokens")
    p.add_argument("--top-p", type=probability, default=None, help="nucleus sampling mass, e.g. 0.9")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling")
    p.add_argument("--tp", type=positive_int, default=1,
                   help="tensor-parallel degree: shard the model over this many processes, launched with "
                        "torchrun --nproc-per-node N (NCCL on GPUs, gloo on CPU); rank 0 prints")
    p.set_defaults(run=run_generate)

    p = subparsers.add_parser("bench", help="decode latency: transformers vs the runtime (dense and plans)",
                              epilog=BENCH_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(p)
    p.add_argument("--synthetic", type=sparsity, nargs="*", default=[],
                   help="also time shape-only plans at these sparsities (random bypass weights)")
    p.add_argument("--prompt-len", type=positive_int, default=64, help="prompt tokens (default 64)")
    p.add_argument("--new-tokens", type=positive_int, default=32, help="tokens generated per round (default 32)")
    p.add_argument("--rounds", type=positive_int, default=3, help="timed rounds, median reported (default 3)")
    p.set_defaults(run=run_bench)


def _set_threads(args) -> None:
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)


def run_generate(args) -> int:
    import torch.distributed as dist

    from subfit.runtime import init_distributed, load

    if (args.top_k is not None or args.top_p is not None) and args.temperature == 0:
        raise ValueError("--top-k/--top-p only apply when sampling: give --temperature > 0 as well.")
    processes = int(os.environ.get("WORLD_SIZE", 1))  # set by torchrun
    if args.tp == 1 and processes > 1:
        raise ValueError(f"torchrun started {processes} processes but --tp is 1; give --tp {processes} "
                         "(one process per shard).")
    _set_threads(args)
    device = init_distributed(args.device) if args.tp > 1 else args.device
    try:
        runtime = load(args.target, device, args.dtype, args.base, max_seq_len=args.max_seq_len, tp=args.tp)
        steps = runtime.stream(args.prompt, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                               top_p=args.top_p, seed=args.seed)  # checks the prompt and arguments before any output
        printer = runtime.model.tp is None or runtime.model.tp.rank == 0  # every rank decodes; one prints
        out = sys.stdout if printer else io.StringIO()
        start, count = time.perf_counter(), 0
        out.write(args.prompt)
        for step in steps:
            out.write(step.text[0])
            out.flush()
            count += 1
        elapsed = time.perf_counter() - start
        out.write("\n")
        if printer:
            print(f"[{count} tokens in {elapsed:.2f} s, {count / elapsed:.1f} tokens/s; KV cache "
                  f"{runtime.kv_cache_bytes() / 2**20:.1f} MiB{'' if args.tp == 1 else ' per rank'}]",
                  file=sys.stderr)
    finally:
        if args.tp > 1 and dist.is_initialized():
            dist.destroy_process_group()
    return 0


def run_bench(args) -> int:
    import torch

    from subfit import models
    from subfit.devices import check_device, default_device
    from subfit.plan import PLAN_FILE, Plan
    from subfit.runtime import Runtime
    from subfit.runtime.bench import (HFContender, RuntimeContender, compare, describe, dtype_name, environment,
                                      markdown_table, memory_bandwidth, synthetic_plan)
    from subfit.runtime.generate import parse_dtype, read_dtype

    needed = args.prompt_len + args.new_tokens
    max_seq_len = args.max_seq_len or needed
    if needed > max_seq_len:
        raise ValueError(f"--prompt-len + --new-tokens ({needed}) exceeds --max-seq-len {max_seq_len}; give "
                         f"--max-seq-len {needed} or shorter lengths.")
    _set_threads(args)
    device = check_device(args.device or default_device())
    dtype = parse_dtype(args.dtype, device)
    plan = Plan.load(args.target) if args.target and (Path(args.target) / PLAN_FILE).is_file() else None
    if plan is not None:
        hf_model, tokenizer, source = models.load_base(plan.base, args.base, dtype=read_dtype(dtype, device),
                                                       device=device)
    else:
        hf_model, tokenizer, source = models.load(args.base or args.target, dtype=read_dtype(dtype, device),
                                                  device=device)
    models.check_positions(models.max_positions(hf_model.config), max_seq_len,
                           f"--prompt-len + --new-tokens = {needed}" if max_seq_len == needed
                           else f"--max-seq-len {max_seq_len}")
    ids = torch.randint(0, hf_model.config.vocab_size, (1, args.prompt_len), generator=torch.Generator().manual_seed(0))

    def runtime(p, runtime_dtype=dtype):
        return lambda: RuntimeContender(Runtime.from_hf(hf_model, p, tokenizer, max_seq_len=max_seq_len,
                                                        dtype=runtime_dtype))

    # transformers runs in the dtype the model was read in (float32 on CPU); so does a first runtime row.
    hf_dtype = hf_model.dtype
    name = dtype_name(dtype)
    dense = Plan.empty(models.Decoder(hf_model), source)
    contenders = {f"transformers eager (dense, {dtype_name(hf_dtype)})": lambda: HFContender(hf_model)}
    if dtype != hf_dtype:
        contenders[f"runtime dense ({dtype_name(hf_dtype)})"] = runtime(dense, hf_dtype)
    contenders[f"runtime dense ({name})"] = runtime(dense)
    if plan is not None:
        contenders[f"runtime plan {plan.accounting()['sparsity']:.1%} ({name})"] = runtime(plan)
    for sparsity in args.synthetic:
        contenders[f"runtime synthetic {sparsity:.1%} ({name})"] = runtime(synthetic_plan(hf_model, source, sparsity))
    bandwidth = memory_bandwidth(device)
    rows = compare(contenders, ids, args.new_tokens, args.rounds, bandwidth=bandwidth)
    print(f"{source.describe()} on {device}, batch 1, prompt {args.prompt_len}, {args.new_tokens} new tokens, "
          f"median of {args.rounds}; {describe(environment(device))}; copy bandwidth {bandwidth / 1e9:.1f} GB/s")
    print(markdown_table(rows))
    return 0
