"""Tensor parallelism over torch.distributed, as gpt-fast does it: one process per device, each
holding 1/N of every matmul that dominates a decode step, two small all-reduces per layer.

`shard(model, tp)` cuts a `Transformer` built whole down to this rank's share, in place:

- Attention: rank r keeps query heads [r*H/N, (r+1)*H/N) and the KV heads they read (the rows of
  q/k/v: column-parallel) and the matching input columns of o_proj (row-parallel). Each rank
  attends over its own heads with its own slice of the compact KV cache; o_proj's partial sums are
  added by one all-reduce.
- FeedForward: 1/N of the intermediate width (rows of gate/up, columns of down_proj), one all-reduce.
- Bypass `(norm(h) @ down) @ up`: 1/N of the rank dimension (columns of `down`, rows of `up`),
  one all-reduce, then the bias. The rank is a sum, so it need not divide evenly: ranks differ by
  at most one column. The shared FeedForward basis is sharded once.

Replicated on every rank: the embedding, the norms, the LM head, the RoPE tables and the bypass
biases. They are a few percent of a decode step's bytes except the LM head of a large
vocabulary; sharding it would add an all-gather of the logits to every step. Because every rank
then holds the same all-reduced stream and the same head, all ranks compute the same logits and
greedy decoding agrees by construction; a sampled token is broadcast from rank 0 (`Runtime`).

Each rank reads the whole base model before keeping its share: the steady state is 1/N of the
sharded weights, the load peak is not.
"""
from __future__ import annotations

import numbers
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from subfit.devices import check_device, default_device
from subfit.runtime.model import Attention, Bypass, Dense, FeedForward, Transformer
from subfit.runtime.ops import Step


class TensorParallel:
    """This process's place among the `size` ranks of the default process group that share a model."""

    def __init__(self):
        self.rank, self.size = dist.get_rank(), dist.get_world_size()

    def all_reduce(self, partial: torch.Tensor) -> torch.Tensor:
        """The sum of every rank's `partial`, in place."""
        dist.all_reduce(partial)
        return partial

    def broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rank 0's `tensor` on every rank, in place."""
        dist.broadcast(tensor, src=0)
        return tensor


def init_distributed(device: str | torch.device | None = None) -> torch.device:
    """Join the process group that torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR/PORT) and return
    this rank's device: cuda:LOCAL_RANK with NCCL on GPUs, the CPU with gloo. Outside torchrun it
    joins nothing, so one script serves both launches (`load(tp=N)` then says to use torchrun)."""
    device = check_device(default_device() if device is None else device)
    if "WORLD_SIZE" in os.environ and not dist.is_initialized():
        if device.type == "cuda":
            if device.index is None:
                device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    return rank_device(device)


def rank_device(device: torch.device) -> torch.device:
    """A bare "cuda" means this rank's current GPU once a process group exists, not cuda:0 for all."""
    if device.type == "cuda" and device.index is None and dist.is_available() and dist.is_initialized():
        return torch.device("cuda", torch.cuda.current_device())
    return device


def shard_sizes(config) -> dict[str, int]:
    """What the degree must divide: whole heads per rank (KV heads first: they are the fewest) and
    an even FeedForward width."""
    return {"KV heads": config.num_key_value_heads, "attention heads": config.num_attention_heads,
            "FeedForward width": config.intermediate_size}


def valid_degrees(config) -> list[int]:
    sizes = shard_sizes(config).values()
    return [d for d in range(1, min(sizes) + 1) if all(n % d == 0 for n in sizes)]


def check_degree(tp: int, config, model_name: str) -> None:
    """Refuse a degree that does not split the model into equal whole shards, naming the valid ones."""
    if not isinstance(tp, numbers.Integral) or isinstance(tp, bool) or tp < 1:
        raise ValueError(f"tp={tp!r}: expected a positive integer (the number of processes sharing the model).")
    for what, n in shard_sizes(config).items():
        if n % tp:
            valid = ", ".join(map(str, valid_degrees(config)))
            raise ValueError(f"tp={tp} does not divide {model_name}'s {n} {what}; valid degrees: {valid}.")


def check_group(tp: int) -> None:
    """Refuse tp > 1 unless this process is one of exactly `tp` in an initialised process group."""
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(f"tp={tp} needs {tp} processes in a torch.distributed process group: launch with "
                         f"`torchrun --nproc-per-node {tp} ...` and call subfit.runtime.init_distributed() before "
                         f"loading (`torchrun --nproc-per-node {tp} -m subfit generate --tp {tp} ...` does both).")
    if dist.get_world_size() != tp:
        raise ValueError(f"tp={tp} but the process group has {dist.get_world_size()} processes; each process holds "
                         f"one shard: launch with torchrun --nproc-per-node {tp}.")


def check(tp: int, config, model_name: str) -> None:
    """Everything `load(tp=...)` refuses before reading weights: the degree, then the launch."""
    check_degree(tp, config, model_name)
    if tp > 1:
        check_group(tp)


def graph_capturable() -> bool:
    """Whether a CUDA graph can capture this group's all-reduces: NCCL's, not gloo's (host copies)."""
    return dist.get_backend() == "nccl"


def model_name(path: str, gguf_file: str | None = None) -> str:
    """How messages name a model: its .gguf file or its folder / hub id's last part."""
    return Path(gguf_file).stem if gguf_file else Path(path).name


class RowParallelDense(Dense):
    """A Dense holding some input columns of a weight: the ranks' partial outputs are summed here."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, tp: TensorParallel):
        super().__init__(weight, bias)
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce(super().forward(x))


class ShardedBypass(nn.Module):
    """A bypass holding a slice of its rank: `h + all_reduce((norm(h) @ down_r) @ up_r) + bias`. The
    sum leaves as the pending `x` of the stream, so the next unit's fused norm adds it in."""

    def __init__(self, bypass: Bypass, down: torch.Tensor, up: torch.Tensor, tp: TensorParallel):
        super().__init__()
        self.ops, self.norm_weight, self.eps, self.bias = bypass.ops, bypass.norm_weight, bypass.eps, bypass.bias
        self.down, self.up, self.tp = down, up, tp

    def forward(self, x, residual, step: Step):
        normed, h = self.ops.add_rms_norm(x, residual, self.norm_weight, self.eps)
        return self.tp.all_reduce((normed @ self.down) @ self.up) + self.bias, h


def _own(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy, so that the full tensor a slice came from can be freed."""
    return t.clone(memory_format=torch.contiguous_format)


def _block_rows(t: torch.Tensor | None, blocks: list[tuple[int, int]]) -> torch.Tensor | None:
    """The rows [start, stop) of each block, concatenated (a fused q/k/v or gate/up's share)."""
    return None if t is None else torch.cat([t[start:stop] for start, stop in blocks])


def _share(n: int, tp: TensorParallel) -> tuple[int, int]:
    """This rank's [start, stop) of n items, split as evenly as possible."""
    return n * tp.rank // tp.size, n * (tp.rank + 1) // tp.size


def shard_attention(attn: Attention, tp: TensorParallel) -> None:
    n_q, n_kv, d = attn.n_head // tp.size, attn.n_kv // tp.size, attn.head_dim
    q0, k0, v0 = tp.rank * n_q, attn.n_head + tp.rank * n_kv, attn.n_head + attn.n_kv + tp.rank * n_kv
    blocks = [(q0 * d, (q0 + n_q) * d), (k0 * d, (k0 + n_kv) * d), (v0 * d, (v0 + n_kv) * d)]
    attn.wqkv = Dense(_block_rows(attn.wqkv.weight, blocks), _block_rows(attn.wqkv.bias, blocks))
    wo = attn.wo
    attn.wo = RowParallelDense(_own(wo.weight[:, q0 * d: (q0 + n_q) * d]), wo.bias if tp.rank == 0 else None, tp)
    attn.n_head, attn.n_kv = n_q, n_kv
    attn.decode_kernel = None  # the whole-unit kernel knows no all-reduce


def shard_feed_forward(ffn: FeedForward, tp: TensorParallel) -> None:
    width = ffn.w2.weight.shape[1]
    start, stop = _share(width, tp)
    blocks = [(start, stop), (width + start, width + stop)]  # gate rows, then up rows
    ffn.w13 = Dense(_block_rows(ffn.w13.weight, blocks), _block_rows(ffn.w13.bias, blocks))
    ffn.w2 = RowParallelDense(_own(ffn.w2.weight[:, start:stop]), ffn.w2.bias if tp.rank == 0 else None, tp)
    ffn.decode_kernel = None  # the whole-unit kernel knows no all-reduce


def shard_bypass(bypass: Bypass, tp: TensorParallel, downs: dict[int, torch.Tensor]) -> ShardedBypass:
    """`downs` maps a full `down` to its share, so the FeedForward basis all FFN bypasses read stays one tensor."""
    start, stop = _share(bypass.down.shape[1], tp)
    if id(bypass.down) not in downs:
        downs[id(bypass.down)] = _own(bypass.down[:, start:stop])
    return ShardedBypass(bypass, downs[id(bypass.down)], _own(bypass.up[start:stop]), tp)


def shard(model: Transformer, tp: TensorParallel) -> None:
    """Keep this rank's share of every attention, FeedForward and bypass of `model`, in place, before
    its cache is allocated (the cache then holds this rank's KV heads only)."""
    downs: dict[int, torch.Tensor] = {}
    for block in model.layers:
        for kind in ("attn", "ffn"):
            unit = getattr(block, kind)
            if isinstance(unit, Attention):
                shard_attention(unit, tp)
            elif isinstance(unit, FeedForward):
                shard_feed_forward(unit, tp)
            elif isinstance(unit, Bypass):
                setattr(block, kind, shard_bypass(unit, tp, downs))
    model.n_kv //= tp.size
    model.tp = tp
