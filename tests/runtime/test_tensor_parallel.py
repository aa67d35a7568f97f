"""Tensor parallelism on CPU: two gloo processes decode stories260K exactly like one process (greedy
tokens equal, logits within float32 rounding), each holding half of the sharded weights and of the
KV cache; sampled tokens agree across ranks; bad degrees and launches are refused before any work.
NCCL on several GPUs runs the same code and is not exercised here."""
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_runtime_bf16 import NEW, PROMPTS

from subfit.runtime import Runtime, init_distributed, load
from subfit.runtime.model import Attention, Bypass, FeedForward
from subfit.runtime.tensor_parallel import ShardedBypass

TP = 2
MAX_SEQ_LEN = 64
KERNEL_SEQ_LEN, KERNEL_NEW = 24, 6
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def sharded_bytes(runtime: Runtime) -> int:
    """Bytes of the tensors tensor parallelism splits: q/k/v, o, gate/up, down and the bypass matrices."""
    tensors = {}
    for unit in runtime.model.modules():
        if isinstance(unit, Attention):
            parts = (unit.wqkv.weight, unit.wo.weight)
        elif isinstance(unit, FeedForward):
            parts = (unit.w13.weight, unit.w2.weight)
        elif isinstance(unit, (Bypass, ShardedBypass)):
            parts = (unit.down, unit.up)
        else:
            continue
        tensors.update({id(t): t for t in parts})
    return sum(t.nbytes for t in tensors.values())


def decode(runtime: Runtime, prompts: list[list[int]]) -> dict:
    """Greedy tokens of every prompt, and the prefill and first decode-step logits of the first."""
    tokens = [runtime.generate(p, NEW, eos=[]).ids for p in prompts]
    prefill = runtime.prefill([prompts[0]])
    step = runtime.decode_step(prefill.argmax(-1))
    return {"tokens": tokens, "logits": torch.cat([prefill, step])}


def worker(rank: int, port: int, plans: dict, prompts: list[list[int]], out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(TP), TRITON_INTERPRET="1")  # Triton on CPU, for the kernel path below
    torch.set_num_threads(1)
    device = init_distributed("cpu")
    results = {}
    for name, plan in plans.items():
        runtime = load(plan, device, "float32", max_seq_len=MAX_SEQ_LEN, tp=TP)
        results[name] = decode(runtime, prompts)
        results[name].update(sharded_bytes=sharded_bytes(runtime), kv_bytes=runtime.kv_cache_bytes())
        torch.manual_seed(rank)  # unseeded sampling: the ranks' own draws would differ
        results[name]["sampled"] = runtime.generate(prompts[0], 16, temperature=1.0, eos=[]).ids
    # The Triton path (interpreted: few tokens) with this rank's heads and the unfused sharded bypass.
    kernels = load(plans["p25"], device, "float32", max_seq_len=KERNEL_SEQ_LEN, use_kernels=True, tp=TP)
    from subfit_kernels._common import INTERPRET  # read at import: here, after TRITON_INTERPRET is set

    results["kernels"] = {"tokens": [kernels.generate(p, KERNEL_NEW, eos=[]).ids for p in prompts[:2]],
                          "logits": kernels.prefill([prompts[0]]), "triton": INTERPRET}
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def plans(stories, build_plan, tmp_path_factory) -> dict:
    """The empty plan and a ~25% plan with a bypassed attention, a deleted one and a bypassed FeedForward,
    saved as plan folders (each process loads its own, as from the command line). The bypass ranks
    are odd: a rank is a sum, so it splits unevenly (4 + 3, 3 + 2) and is not refused."""
    model, _, source = stories
    folder = tmp_path_factory.mktemp("plans")
    shapes = {"empty": ({}, {}), "p25": ({1: "bypass", 3: "delete"}, {2: "bypass"})}
    for name, (attn, ffn) in shapes.items():
        build_plan(model, source, attn, ffn, attn_rank=7, ffn_rank=5).save(folder / name)
    return {name: folder / name for name in shapes}


@pytest.fixture(scope="module")
def prompt_ids(stories) -> list[list[int]]:
    tokenizer = stories[1]
    return [tokenizer(p).input_ids for p in PROMPTS]


@pytest.fixture(scope="module")
def ranks(plans, prompt_ids, tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ranks")
    mp.start_processes(worker, args=(free_port(), {k: str(v) for k, v in plans.items()}, prompt_ids, str(out)),
                       nprocs=TP, join=True, start_method="spawn")
    return [torch.load(out / f"rank{r}.pt") for r in range(TP)]


@pytest.mark.parametrize("plan", ["empty", "p25"])
def test_two_ranks_decode_like_one_process(plan, plans, prompt_ids, ranks):
    single = load(plans[plan], "cpu", "float32", max_seq_len=MAX_SEQ_LEN)
    expected = decode(single, prompt_ids)
    for result in ranks:
        assert result[plan]["tokens"] == expected["tokens"]
        error = (result[plan]["logits"] - expected["logits"]).norm() / expected["logits"].norm()
        assert error < 1e-5, error  # float32 sums in another order
    assert ranks[0][plan]["sampled"] == ranks[1][plan]["sampled"]  # rank 0's draw, broadcast


def test_two_ranks_on_the_kernel_path(plans, prompt_ids, ranks):
    single = load(plans["p25"], "cpu", "float32", max_seq_len=KERNEL_SEQ_LEN)
    tokens = [single.generate(p, KERNEL_NEW, eos=[]).ids for p in prompt_ids[:2]]
    logits = single.prefill([prompt_ids[0]])
    for result in ranks:
        assert result["kernels"]["triton"]  # the kernels ran, not their PyTorch references
        assert result["kernels"]["tokens"] == tokens
        assert (result["kernels"]["logits"] - logits).norm() / logits.norm() < 1e-5


@pytest.mark.parametrize("plan", ["empty", "p25"])
def test_each_rank_holds_half(plan, plans, ranks):
    single = load(plans[plan], "cpu", "float32", max_seq_len=MAX_SEQ_LEN)
    assert sum(result[plan]["sharded_bytes"] for result in ranks) == sharded_bytes(single)  # a partition
    for result in ranks:
        assert abs(result[plan]["sharded_bytes"] / sharded_bytes(single) - 1 / TP) < 2e-3  # odd ranks: +-1/2 row
        assert result[plan]["kv_bytes"] == single.kv_cache_bytes() // TP


def test_bad_degree_is_refused_before_reading_weights(stories, stories_dir, tmp_path):
    only_config = tmp_path / "stories260K"  # no weights: the refusal must come first
    only_config.mkdir()
    shutil.copy(stories_dir / "config.json", only_config)
    with pytest.raises(ValueError, match="^tp=3 does not divide stories260K's 4 KV heads; valid degrees: 1, 2, 4.$"):
        load(only_config, "cpu", "float32", tp=3)
    with pytest.raises(ValueError, match="^tp=8 does not divide stories260K's 4 KV heads; valid degrees: 1, 2, 4.$"):
        Runtime.from_hf(stories[0], tp=8)


def test_tp_without_a_process_group_says_torchrun(stories_dir):
    with pytest.raises(ValueError, match="torchrun --nproc-per-node 2"):
        load(stories_dir, "cpu", "float32", tp=2)
    with pytest.raises(ValueError, match="positive integer"):
        load(stories_dir, "cpu", "float32", tp=0)


def test_torchrun_cli_prints_once(stories_dir):
    """`torchrun -m subfit generate --tp 2`: the single-process text, printed by rank 0 only."""
    prompt = "Once upon a time"
    single = load(stories_dir, "cpu", "float32").generate(prompt, 20).text
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(TP), "-m", "subfit",
         "generate", str(stories_dir), "--tp", str(TP), "--prompt", prompt, "--max-new-tokens", "20", "--device",
         "cpu", "--dtype", "float32"], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout == prompt + single + "\n"
    assert run.stderr.count("tokens/s") == 1


def test_cli_refusals_are_one_line(stories_dir, monkeypatch, capsys):
    from subfit.cli import main

    assert main(["generate", str(stories_dir), "--tp", "3", "--prompt", "x", "--device", "cpu"]) == 2
    assert capsys.readouterr().err == ("subfit generate: error: tp=3 does not divide stories260K's 4 KV heads; "
                                       "valid degrees: 1, 2, 4.\n")
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it, with --tp forgotten
    assert main(["generate", str(stories_dir), "--prompt", "x", "--device", "cpu"]) == 2
    assert "torchrun started 2 processes but --tp is 1; give --tp 2" in capsys.readouterr().err
