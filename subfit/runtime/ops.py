"""The five fused steps of a decoder layer, in two interchangeable implementations.

`KernelOps` calls the Triton kernels of `subfit_kernels` (on CUDA, or on CPU under
TRITON_INTERPRET=1); `TorchOps` is the fast plain-PyTorch path used everywhere else. The model
calls `self.ops.<step>` and never knows which one it got, so both paths run the same code.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from subfit.runtime.cpu_kernels import decode_kernels


@dataclass(frozen=True)
class Step:
    """What one forward pass needs besides the token ids: where the new tokens go in the cache.

    `positions` [B, T] are the cache positions (= RoPE positions) of the new tokens and
    `seq_lens` [B] int32 the valid cache length of each sequence after this pass. `kv_len` and
    `mask` serve only the PyTorch decode path, which attends over `cache[:kv_len]` (and, with no
    mask, i.e. sequences of equal length, writes the new token at `kv_len - 1`) rather than
    the whole static buffer (the Triton kernel reads `seq_lens` instead).
    """

    positions: torch.Tensor
    seq_lens: torch.Tensor
    cos: torch.Tensor  # [max_seq_len, head_dim // 2] float32
    sin: torch.Tensor
    prefill: bool
    kv_len: int = 0
    mask: torch.Tensor | None = None  # [B, 1, 1, kv_len] bool, only for ragged batches
    # Filled once per forward by TorchOps.prepare, shared by every layer:
    cos_at: torch.Tensor | None = None  # [B, T, 1, D] in the activation dtype: [cos, cos] at `positions`
    sin_at: torch.Tensor | None = None  # [-sin, sin]
    batch_index: torch.Tensor | None = None  # [B, 1]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Hugging Face LlamaRMSNorm exactly: statistics in float32, scale in the input dtype. On float32
    (the PyTorch path's residual stream) that is `F.rms_norm`, one fused op instead of eight."""
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps)
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE with Hugging Face's rotate_half convention, `x * cos + rotate_half(x) * sin`, from the
    full-width tables `cos` = [cos, cos] and `sin` = [-sin, sin] (broadcast over heads): the halves
    swapped by a flip, so three ops rather than seven."""
    swapped = x.unflatten(-1, (2, -1)).flip(-2).flatten(-2)
    return torch.addcmul(x * cos, swapped, sin)


class TorchOps:
    """Plain PyTorch: few, large ops; writes into the static cache in place. On a CPU where subfit's
    C++ decode kernels build, the add + RMSNorm of the float32 stream is one call (`cpu_kernels`), and
    so is each whole unit of a batch-1 decode step (`model.unit_kernel`).

    In every op the residual stream is `x + residual`, where the pending `x` may be None.
    """

    def __init__(self, device: torch.device | str = "cpu"):
        # On a CPU: the C++ kernels' module (its whole-unit decode kernels serve `model`'s units) or None.
        self.cpu_kernels = decode_kernels() if torch.device(device).type == "cpu" else None
        self.norm_kernel = self.cpu_kernels.add_rms_norm_out if self.cpu_kernels is not None else None

    def prepare(self, step: Step, dtype: torch.dtype) -> Step:
        """Per-forward work that every layer would otherwise repeat: RoPE rows and a batch index."""
        cos, sin = step.cos[step.positions].unsqueeze(2), step.sin[step.positions].unsqueeze(2)
        return replace(step, cos_at=torch.cat((cos, cos), -1).to(dtype), sin_at=torch.cat((-sin, sin), -1).to(dtype),
                       batch_index=torch.arange(step.positions.shape[0], device=step.positions.device)[:, None])

    def add_rms_norm(self, x, residual, weight, eps):
        if (self.norm_kernel is not None and residual.dtype == weight.dtype == torch.float32
                and residual.is_contiguous()
                and (x is None or (x.dtype in (torch.float32, torch.bfloat16) and x.is_contiguous()
                                   and x.shape == residual.shape))):
            h = residual if x is None else torch.empty_like(residual)
            normed = torch.empty_like(residual)
            self.norm_kernel(x, residual, weight, eps, h, normed)
            return normed, h
        h = residual if x is None else x + residual
        return rms_norm(h, weight, eps), h

    def bypass(self, x, residual, norm_weight, eps, down, up, bias):
        normed, h = self.add_rms_norm(x, residual, norm_weight, eps)
        return h + ((normed @ down) @ up + bias)

    def rope_and_cache(self, qk, n_q, v, step: Step, k_cache, v_cache):
        """Rotate q and k together (one op chain for both), then store k and v at their positions."""
        qk = rotate(qk, step.cos_at, step.sin_at)
        q, k = qk[:, :, :n_q], qk[:, :, n_q:]
        if step.prefill:  # prompts start at position 0: a slice write, no scatter
            t = k.shape[1]
            k_cache[:, :, :t] = k.transpose(1, 2)
            v_cache[:, :, :t] = v.transpose(1, 2)
        elif step.mask is None:  # every sequence at position kv_len - 1: a plain slice write, no scatter
            k_cache.select(2, step.kv_len - 1).copy_(k.select(1, 0))
            v_cache.select(2, step.kv_len - 1).copy_(v.select(1, 0))
        else:
            k_cache[step.batch_index, :, step.positions] = k
            v_cache[step.batch_index, :, step.positions] = v
        return q, k

    def decode_attention(self, q, k_cache, v_cache, step: Step):
        """One query per sequence, GQA without repeating K/V: the G query heads that share a KV head
        become G query rows of one attention over that head's cache."""
        b, n_q, d = q.shape
        n_kv = k_cache.shape[1]
        out = F.scaled_dot_product_attention(
            q.view(b, n_kv, n_q // n_kv, d), k_cache[:, :, : step.kv_len], v_cache[:, :, : step.kv_len],
            attn_mask=step.mask,
        )
        return out.view(b, n_q, d)

    def swiglu(self, gate, up):
        return F.silu(gate) * up


class KernelOps:
    """The Triton kernels (with their CPU reference fallbacks inside subfit_kernels)."""

    def __init__(self):
        import subfit_kernels

        self.k = subfit_kernels

    def prepare(self, step: Step, dtype: torch.dtype) -> Step:
        return step  # the kernels index the RoPE tables themselves

    def add_rms_norm(self, x, residual, weight, eps):
        if x is None:
            return self.k.add_rms_norm(residual, None, weight, eps)
        return self.k.add_rms_norm(x, residual, weight, eps)

    def bypass(self, x, residual, norm_weight, eps, down, up, bias):
        return self.k.fused_bypass(x, residual, norm_weight, eps, down, up, bias)

    def rope_and_cache(self, qk, n_q, v, step: Step, k_cache, v_cache):
        return self.k.apply_rope(qk[:, :, :n_q], qk[:, :, n_q:], step.cos, step.sin, step.positions,
                                 k_cache=k_cache, v_cache=v_cache, v=v)

    def decode_attention(self, q, k_cache, v_cache, step: Step):
        return self.k.decode_attention(q, k_cache, v_cache, step.seq_lens)

    def swiglu(self, gate, up):
        return self.k.swiglu(gate, up)
