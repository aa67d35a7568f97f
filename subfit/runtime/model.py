"""One readable decoder (Llama / Mistral / Qwen2 / Qwen3) with a SubFit plan baked in.

Built once from the Hugging Face weights: a kept unit becomes an `Attention` or `FeedForward`,
a bypassed one a `Bypass` (the fitted linear map), a deleted one nothing at all. The plan is
therefore static structure, not a per-step branch, and a bypassed attention has no weights and
no KV cache slot.

The residual stream travels as `(x, residual)` with `hidden = x + residual` (`x` may be None):
each unit adds the pending `x` into the residual inside its first fused op (residual add +
RMSNorm, or the fused bypass) instead of in a separate pass, as the Triton kernels want.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from subfit.models import Decoder
from subfit.plan import Plan
from subfit.runtime.kv_cache import CompactKVCache, slot_map
from subfit.runtime.ops import KernelOps, Step, TorchOps, rms_norm

Stream = tuple[torch.Tensor | None, torch.Tensor | None]


class Dense(nn.Module):
    """`y = x @ W.T + b` for one or several Hugging Face Linears that read the same input (q/k/v,
    gate/up), fused into one matmul.

    On CPU in float32 the weight is pre-packed once for oneDNN (the blocked layout PyTorch's own
    CPU compiler uses): a one-row product, i.e. every decode matmul, then streams it ~2x faster
    than nn.Linear on the 2-core CPU this was measured on. Elsewhere it stays a [out, in] tensor
    for F.linear, shared with the Hugging Face module when there is nothing to fuse.
    """

    def __init__(self, *linears: nn.Linear):
        super().__init__()
        weights = [lin.weight.detach() for lin in linears]
        weight = weights[0] if len(weights) == 1 else torch.cat(weights)
        self.bias = None
        if any(lin.bias is not None for lin in linears):
            self.bias = torch.cat([lin.bias.detach() if lin.bias is not None else weight.new_zeros(lin.out_features)
                                   for lin in linears])
        self.packed = (weight.device.type == "cpu" and weight.dtype == torch.float32
                       and torch.backends.mkldnn.is_available())
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, 1) if self.packed else weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


class Attention(nn.Module):
    """Pre-norm grouped-query attention writing its K/V into its slot of the compact cache."""

    def __init__(self, hf_block: nn.Module, config, ops):
        super().__init__()
        attn = hf_block.self_attn
        self.ops = ops
        self.norm_weight = hf_block.input_layernorm.weight
        self.eps = hf_block.input_layernorm.variance_epsilon
        self.n_head = config.num_attention_heads
        self.n_kv = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.n_head
        self.wqkv = Dense(attn.q_proj, attn.k_proj, attn.v_proj)  # Qwen2's biases come along
        self.wo = Dense(attn.o_proj)
        # Qwen3 normalises each head of q and k before RoPE.
        self.q_norm = attn.q_norm if hasattr(attn, "q_norm") else None
        self.k_norm = attn.k_norm if hasattr(attn, "k_norm") else None
        self.k_cache: torch.Tensor | None = None  # views of this layer's slot, bound by Transformer.setup_cache
        self.v_cache: torch.Tensor | None = None

    def forward(self, x, residual, step: Step) -> Stream:
        normed, h = self.ops.add_rms_norm(x, residual, self.norm_weight, self.eps)
        b, t, _ = normed.shape
        qkv = self.wqkv(normed).view(b, t, self.n_head + 2 * self.n_kv, self.head_dim)
        qk, v = qkv[:, :, : self.n_head + self.n_kv], qkv[:, :, self.n_head + self.n_kv:]
        if self.q_norm is not None:
            qk = torch.cat((rms_norm(qk[:, :, : self.n_head], self.q_norm.weight, self.q_norm.variance_epsilon),
                            rms_norm(qk[:, :, self.n_head:], self.k_norm.weight, self.k_norm.variance_epsilon)), 2)
        q, k = self.ops.rope_and_cache(qk, self.n_head, v, step, self.k_cache, self.v_cache)
        if step.prefill:  # the prompt attends to itself only (prefill starts at position 0)
            y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               is_causal=True, enable_gqa=True).transpose(1, 2)
        else:
            y = self.ops.decode_attention(q.reshape(b, self.n_head, self.head_dim), self.k_cache, self.v_cache, step)
        return self.wo(y.reshape(b, t, -1)), h


class FeedForward(nn.Module):
    """Pre-norm SwiGLU MLP with gate and up fused into one matmul."""

    def __init__(self, hf_block: nn.Module, ops):
        super().__init__()
        mlp = hf_block.mlp
        self.ops = ops
        self.norm_weight = hf_block.post_attention_layernorm.weight
        self.eps = hf_block.post_attention_layernorm.variance_epsilon
        self.w13 = Dense(mlp.gate_proj, mlp.up_proj)
        self.w2 = Dense(mlp.down_proj)

    def forward(self, x, residual, step: Step) -> Stream:
        normed, h = self.ops.add_rms_norm(x, residual, self.norm_weight, self.eps)
        gate, up = self.w13(normed).chunk(2, dim=-1)
        return self.w2(self.ops.swiglu(gate, up)), h


class Bypass(nn.Module):
    """A removed unit's stand-in, `h + (norm(h) @ down) @ up + bias`, as one fused op. It consumes
    the pending `x`, so the stream leaves it fully summed."""

    def __init__(self, norm: nn.Module, down: torch.Tensor, up: torch.Tensor, bias: torch.Tensor, ops):
        super().__init__()
        self.ops = ops
        self.norm_weight, self.eps = norm.weight, norm.variance_epsilon
        self.down, self.up, self.bias = down, up, bias  # `down` is shared by all FFN bypasses

    def forward(self, x, residual, step: Step) -> Stream:
        return None, self.ops.bypass(x, residual, self.norm_weight, self.eps, self.down, self.up, self.bias)


class Block(nn.Module):
    """One layer: each unit kept, bypassed, or (None) deleted."""

    def __init__(self, attn: nn.Module | None, ffn: nn.Module | None):
        super().__init__()
        self.attn, self.ffn = attn, ffn

    def forward(self, x, residual, step: Step) -> Stream:
        for unit in (self.attn, self.ffn):
            if unit is not None:
                x, residual = unit(x, residual, step)
        return x, residual


class Transformer(nn.Module):
    """`forward(ids, step)` -> final normed hidden states; `logits(hidden)` -> float32 logits."""

    def __init__(self, hf_model: nn.Module, plan: Plan | None, *, max_seq_len: int, use_kernels: bool):
        super().__init__()
        dec = Decoder(hf_model)
        config = dec.config
        check_supported(config, max_seq_len)
        attn_actions = plan.attn if plan is not None else ["keep"] * dec.num_layers
        ffn_actions = plan.ffn if plan is not None else ["keep"] * dec.num_layers
        self.ops = KernelOps() if use_kernels else TorchOps()
        self.config = config
        self.max_seq_len = max_seq_len
        self.n_kv = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.slots = slot_map(attn_actions)
        weight = dec.body.embed_tokens.weight
        # Bypass weights in the model's dtype; "ffn.basis" stays one tensor, shared by every FFN bypass.
        tensors = {k: v.to(weight.device, weight.dtype) for k, v in (plan.tensors if plan is not None else {}).items()}

        def unit(kind: str, i: int, action: str) -> nn.Module | None:
            block = dec.layers[i]
            if action == "delete":
                return None
            if action == "bypass":
                down = tensors[f"attn.{i}.down"] if kind == "attn" else tensors["ffn.basis"]
                return Bypass(dec.norm(kind, i), down, tensors[f"{kind}.{i}.up"], tensors[f"{kind}.{i}.bias"], self.ops)
            return Attention(block, config, self.ops) if kind == "attn" else FeedForward(block, self.ops)

        self.layers = nn.ModuleList(
            Block(unit("attn", i, attn_actions[i]), unit("ffn", i, ffn_actions[i])) for i in range(dec.num_layers)
        )
        self.embed_weight = weight
        self.norm_weight, self.norm_eps = dec.body.norm.weight, dec.body.norm.variance_epsilon
        self.lm_head = Dense(hf_model.lm_head)  # packed on CPU: a copy even when tied to the embedding
        # RoPE tables from the model's own rotary module, so llama3/yarn/... scaling is honoured.
        positions = torch.arange(max_seq_len, device=weight.device)[None]
        cos, sin = dec.rotary(torch.zeros(1, device=weight.device, dtype=torch.float32), positions)
        self.register_buffer("cos", cos[0, :, : self.head_dim // 2].float().contiguous(), persistent=False)
        self.register_buffer("sin", sin[0, :, : self.head_dim // 2].float().contiguous(), persistent=False)
        self.cache: CompactKVCache | None = None

    def setup_cache(self, batch_size: int) -> CompactKVCache:
        """Allocate the static compact cache for `batch_size` sequences and bind each attention to its slot."""
        self.cache = CompactKVCache(self.slots, batch_size, self.n_kv, self.max_seq_len, self.head_dim,
                                    dtype=self.embed_weight.dtype, device=self.embed_weight.device)
        for i, block in enumerate(self.layers):
            if isinstance(block.attn, Attention):
                block.attn.k_cache, block.attn.v_cache = self.cache.layer(i)
        return self.cache

    def step(self, positions: torch.Tensor, seq_lens: torch.Tensor, *, prefill: bool, kv_len: int = 0,
             mask: torch.Tensor | None = None) -> Step:
        return Step(positions, seq_lens, self.cos, self.sin, prefill, kv_len, mask)

    def forward(self, ids: torch.Tensor, step: Step) -> torch.Tensor:
        x, residual = None, F.embedding(ids, self.embed_weight)
        step = self.ops.prepare(step, residual.dtype)
        for block in self.layers:
            x, residual = block(x, residual, step)
        return self.ops.add_rms_norm(x, residual, self.norm_weight, self.norm_eps)[0]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()


def sliding_window(config) -> int | None:
    """The attention window Hugging Face would apply to some layer, if any."""
    window = getattr(config, "sliding_window", None)
    if config.model_type == "mistral":
        return window
    return window if "sliding_attention" in (getattr(config, "layer_types", None) or []) else None


def check_supported(config, max_seq_len: int) -> None:
    """Refuse what this decoder does not implement rather than silently differ from the model."""
    window = sliding_window(config)
    if window is not None and max_seq_len > window:
        raise ValueError(f"This model uses sliding-window attention ({window} tokens), which the runtime does not "
                         f"implement; a cache of {max_seq_len} tokens would exceed it. Use max_seq_len <= {window}.")
