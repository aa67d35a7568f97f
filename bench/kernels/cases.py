"""The kernel benchmark cases: each subfit_kernels op at the decode and prefill shapes of a model,
the implementations it is compared with, and the bytes an ideal implementation must move.

A case holds several independent input sets (weights included) so that a timer can cycle through
them and every call reads its inputs from device memory, as a decode step reads each layer's
weights once (bench/gpu/timing.py). Implementations: "triton" (ours), "eager" (the op's PyTorch
reference), "compile" (that reference under torch.compile) and "liger" (Liger-Kernel, for the ops
it has: fused add+RMSNorm and SwiGLU).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

import subfit_kernels as K
from subfit.config import SubFitConfig

EPS = 1e-5
DECODE_ATTENTION_BATCHES = (1, 8)
IMPLS = ("triton", "eager", "compile", "liger")
LIGER_OPS = {"add_rms_norm": "fused_add_rms_norm_forward", "swiglu": "swiglu_forward"}


@dataclass(frozen=True)
class ModelShape:
    """The dims of one model that the ops see."""

    name: str
    hidden: int
    q_heads: int
    kv_heads: int
    head_dim: int
    ffn: int

    @classmethod
    def of(cls, name: str, config: dict) -> "ModelShape":
        return cls(name, config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"],
                   config["head_dim"], config["intermediate_size"])

    @property
    def ranks(self) -> dict[str, int]:
        """The bypass ranks `subfit compress` uses by default for this hidden size."""
        ranks = SubFitConfig().ranks(self.hidden)
        return {"bypass_attn": ranks["attn"], "bypass_ffn": ranks["ffn"]}


@dataclass
class Case:
    op: str
    model: str
    phase: str  # "decode" | "prefill"
    shape: str
    nbytes: int  # read + written by an ideal implementation, per call
    sets: int
    impls: dict[str, Callable[[int], object]]  # implementation -> call on input set i


class Builder:
    """Builds cases on one device in one dtype; `sets_for(bytes)` decides how many input sets."""

    def __init__(self, device: torch.device, dtype: torch.dtype, sets_for: Callable[[int], int],
                 compile_backend: str = "inductor", liger=None, context: int = 4096):
        self.device, self.dtype, self.sets_for = device, dtype, sets_for
        self.compile_backend, self.liger, self.context = compile_backend, liger, context
        # One reference function is compiled for every shape it is timed at (12 for the bypass): past
        # dynamo's default of 8 it would silently run eager under the "compile" label. Raise the
        # limit, and fail loudly should it still be hit.
        for name, value in (("recompile_limit", 64), ("fail_on_recompile_limit_hit", True)):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, value)

    def randn(self, *shape: int, scale: float = 1.0) -> torch.Tensor:
        return (scale * torch.randn(*shape, device=self.device)).to(self.dtype)

    def _case(self, op: str, m: ModelShape, phase: str, shape: str, moved: int, one_set: Callable[[], tuple],
              kernel: Callable, reference: Callable, liger: Callable | None = None) -> Case:
        sets = [one_set() for _ in range(self.sets_for(moved))]
        compiled = torch.compile(reference, dynamic=False, backend=self.compile_backend)
        impls = {
            "triton": lambda i: kernel(*sets[i], backend="triton"),
            "eager": lambda i: reference(*sets[i]),
            "compile": lambda i: compiled(*sets[i]),
        }
        if liger is not None:
            impls["liger"] = lambda i: liger(*sets[i])
        return Case(op, m.name, phase, shape, moved, len(sets), impls)

    def build(self, op: str, m: ModelShape, phase: str, rows: int) -> Case:
        """`rows` is tokens for the row-wise ops and the batch for decode attention."""
        make = {"add_rms_norm": self._add_rms_norm, "swiglu": self._swiglu, "rope+cache": self._rope,
                "bypass_attn": self._bypass, "bypass_ffn": self._bypass, "decode_attention": self._decode_attention}
        return make[op](m, rows, phase, op)

    def _add_rms_norm(self, m: ModelShape, rows: int, phase: str, op: str) -> Case:
        def one():
            return self.randn(rows, m.hidden), self.randn(rows, m.hidden), self.randn(m.hidden), EPS

        moved = (4 * rows + 1) * m.hidden * self.dtype.itemsize  # read x, residual, weight; write y, h
        liger = None
        if self.liger is not None:
            fn = getattr(self.liger, LIGER_OPS[op])
            liger = lambda x, r, w, eps: fn(x, r, w, eps, 0.0, "llama")  # noqa: E731 - Hugging Face casting
        return self._case(op, m, phase, f"[{rows}, {m.hidden}]", moved, one, K.add_rms_norm,
                          K.add_rms_norm_reference, liger)

    def _swiglu(self, m: ModelShape, rows: int, phase: str, op: str) -> Case:
        def one():
            return self.randn(rows, m.ffn), self.randn(rows, m.ffn)

        moved = 3 * rows * m.ffn * self.dtype.itemsize  # read gate, up; write out
        liger = getattr(self.liger, LIGER_OPS[op]) if self.liger is not None else None
        return self._case(op, m, phase, f"[{rows}, {m.ffn}]", moved, one, K.swiglu, K.swiglu_reference, liger)

    def _bypass(self, m: ModelShape, rows: int, phase: str, op: str) -> Case:
        hidden, rank = m.hidden, m.ranks[op]

        def one():
            return (self.randn(rows, hidden), self.randn(rows, hidden), self.randn(hidden), EPS,
                    self.randn(hidden, rank, scale=hidden ** -0.5), self.randn(rank, hidden, scale=rank ** -0.5),
                    self.randn(hidden, scale=0.1))

        # read x, residual, norm weight, down, up, bias; write out
        moved = (3 * rows * hidden + 2 * hidden + 2 * hidden * rank) * self.dtype.itemsize
        return self._case(op, m, phase, f"[{rows}, {hidden}] r={rank}", moved, one, K.fused_bypass,
                          K.fused_bypass_reference)

    def _rope(self, m: ModelShape, tokens: int, phase: str, op: str) -> Case:
        hq, hkv, d = m.q_heads, m.kv_heads, m.head_dim
        max_pos = self.context + tokens
        start = 0 if phase == "prefill" else self.context  # decode appends after `context` cached tokens
        angles = torch.arange(max_pos, device=self.device)[:, None] * torch.rand(d // 2, device=self.device)
        cos, sin = angles.cos(), angles.sin()
        positions = torch.arange(start, start + tokens, device=self.device)[None]

        def one():
            qkv = self.randn(1, tokens, (hq + 2 * hkv) * d)  # q, k, v are views of one fused projection
            q, k, v = (t.unflatten(-1, (-1, d)) for t in qkv.split([hq * d, hkv * d, hkv * d], dim=-1))
            k_cache = torch.empty(1, hkv, max_pos, d, dtype=self.dtype, device=self.device)
            return q, k, cos, sin, positions, v, k_cache, torch.empty_like(k_cache)

        def kernel(q, k, cos, sin, positions, v, k_cache, v_cache, backend):
            return K.apply_rope(q, k, cos, sin, positions, k_cache=k_cache, v_cache=v_cache, v=v, backend=backend)

        def reference(q, k, cos, sin, positions, v, k_cache, v_cache):
            return K.apply_rope_reference(q, k, cos, sin, positions, k_cache=k_cache, v_cache=v_cache, v=v)

        # q read and written; k read, written and cached; v read and cached; a cos and a sin row per token
        moved = tokens * ((2 * hq + 5 * hkv) * d * self.dtype.itemsize + d * 4)
        return self._case(op, m, phase, f"T={tokens} {hq}/{hkv} heads d={d}", moved, one, kernel, reference)

    def _decode_attention(self, m: ModelShape, batch: int, phase: str, op: str) -> Case:
        hq, hkv, d, ctx = m.q_heads, m.kv_heads, m.head_dim, self.context

        def one():
            return (self.randn(batch, hq, d), self.randn(batch, hkv, ctx, d), self.randn(batch, hkv, ctx, d),
                    torch.full((batch,), ctx, dtype=torch.int32, device=self.device))

        moved = batch * (2 * hq * d + 2 * hkv * ctx * d) * self.dtype.itemsize + 4 * batch  # q, K, V in; out
        return self._case(op, m, "decode", f"B={batch} ctx={ctx} {hq}/{hkv} heads d={d}", moved, one,
                          K.decode_attention, K.decode_attention_reference)


def specs(prefill_rows: int) -> list[tuple[str, str, int]]:
    """(op, phase, rows) of one model: every op at 1 row and at `prefill_rows`, decode attention at
    batch 1 and 8."""
    row_ops = ("add_rms_norm", "swiglu", "rope+cache", "bypass_attn", "bypass_ffn")
    return ([(op, "decode", 1) for op in row_ops] + [("decode_attention", "decode", b) for b in DECODE_ATTENTION_BATCHES]
            + [(op, "prefill", prefill_rows) for op in row_ops])
