"""One readable decoder (Llama / Mistral / Qwen2 / Qwen3) with a SubFit plan baked in.

Built once from the Hugging Face weights: a kept unit becomes an `Attention` or `FeedForward`,
a bypassed one a `Bypass` (the fitted linear map), a deleted one nothing at all. The plan is
therefore static structure, not a per-step branch, and a bypassed attention has no weights and
no KV cache slot.

The residual stream travels as `(x, residual)` with `hidden = x + residual` (`x` may be None):
each unit adds the pending `x` into the residual inside its first fused op (residual add +
RMSNorm, or the fused bypass) instead of in a separate pass, as the Triton kernels want.

Two dtypes: `dtype` for the matmul weights, the activations between them and the KV cache, and
`stream_dtype` for the residual stream, the norms and the bypasses. On the PyTorch path the stream
is float32 whatever `dtype` is: a bf16 decode step streams half the weight bytes while the sums
that carry the signal from layer to layer stay exact (the stream's tensors are under 1% of the
bytes). The Triton kernels run everything in `dtype`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from subfit.hardware import fast_bf16
from subfit.models import Decoder
from subfit.plan import Plan
from subfit.runtime.cpu_kernels import kernel_for
from subfit.runtime.kv_cache import CompactKVCache, slot_map
from subfit.runtime.ops import KernelOps, Step, TorchOps, rms_norm

Stream = tuple[torch.Tensor | None, torch.Tensor | None]


def default_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on CUDA and on a CPU with bf16 units (a decode step streams half the bytes), else float32."""
    return torch.bfloat16 if device.type == "cuda" or fast_bf16(device) else torch.float32


def check_dtype(dtype: torch.dtype, device: torch.device) -> None:
    """Refuse bf16 on a CPU without bf16 units rather than run it emulated."""
    if device.type == "cpu" and dtype == torch.bfloat16 and not fast_bf16(device):
        raise ValueError("bfloat16 decode on CPU needs AVX512-BF16 or AMX-BF16, which this CPU lacks; "
                         "use dtype float32 (--dtype float32).")


class Dense(nn.Module):
    """`y = x @ W.T + b` with `W` [out, in] stored once, in its own dtype; the input is cast to it
    and the output stays in it.

    On CPU a one-row input, i.e. every batch-1 decode matmul, is a matrix-vector product, which
    runs at the rate one core streams the weight: bfloat16 weights go to subfit's GEMV kernel
    (`cpu_kernels`, ~5 us per call where `torch.mv`'s bfloat16 path costs ~25 us, and faster on small
    matrices), float32 ones to `torch.mv` (MKL). The matmul path (`F.linear`, oneDNN) costs
    15-20 us per call there and is kept for prompts and batches.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.weight, self.bias = weight, bias
        self.dtype = weight.dtype
        self.gemv = weight.device.type == "cpu"
        self.kernel = kernel_for(weight) if self.gemv else None

    @classmethod
    def fuse(cls, *linears: nn.Linear, dtype: torch.dtype | None = None) -> "Dense":
        """One Dense for Hugging Face Linears that read the same input (q/k/v, gate/up), in `dtype`
        (default: theirs). The weight is shared with the Linear when there is nothing to fuse or cast."""
        weights = [lin.weight.detach() for lin in linears]
        weight = (weights[0] if len(weights) == 1 else torch.cat(weights)).to(dtype or weights[0].dtype)
        bias = None
        if any(lin.bias is not None for lin in linears):
            bias = torch.cat([lin.bias.detach() if lin.bias is not None else weight.new_zeros(lin.out_features)
                              for lin in linears]).to(weight.dtype)
        return cls(weight, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None and x.numel() == x.shape[-1]:  # rounds x to bfloat16 itself
            out = torch.empty(*x.shape[:-1], self.weight.shape[0], dtype=self.dtype)
            self.kernel(self.weight, x.reshape(-1), self.bias, out.view(-1))
            return out
        if x.dtype != self.dtype:
            x = x.to(self.dtype)
        if self.gemv and x.numel() == x.shape[-1]:
            row = x.view(-1)
            y = torch.mv(self.weight, row) if self.bias is None else torch.addmv(self.bias, self.weight, row)
            return y.view(*x.shape[:-1], -1)
        return F.linear(x, self.weight, self.bias)


class Attention(nn.Module):
    """Pre-norm grouped-query attention writing its K/V into its slot of the compact cache."""

    def __init__(self, hf_block: nn.Module, config, ops, dtype: torch.dtype, stream_dtype: torch.dtype):
        super().__init__()
        attn = hf_block.self_attn
        self.ops = ops
        self.norm_weight, self.eps = norm_of(hf_block.input_layernorm, stream_dtype)
        self.n_head = config.num_attention_heads
        self.n_kv = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.n_head
        self.wqkv = Dense.fuse(attn.q_proj, attn.k_proj, attn.v_proj, dtype=dtype)  # Qwen2's biases come along
        self.wo = Dense.fuse(attn.o_proj, dtype=dtype)
        # Qwen3 normalises each head of q and k before RoPE (on the activations, hence in `dtype`).
        self.q_norm = norm_of(attn.q_norm, dtype) if hasattr(attn, "q_norm") else None
        self.k_norm = norm_of(attn.k_norm, dtype) if hasattr(attn, "k_norm") else None
        self.k_cache: torch.Tensor | None = None  # views of this layer's slot, bound by Transformer.setup_cache
        self.v_cache: torch.Tensor | None = None
        self.decode_kernel = None if self.q_norm is not None else unit_kernel(ops, "attention_decode", stream_dtype,
                                                                             self.wqkv, self.wo)

    def forward(self, x, residual, step: Step) -> Stream:
        one_token = residual.numel() == residual.shape[-1]
        if self.decode_kernel is not None and one_token and not step.prefill and step.mask is None:
            return None, self.decode_kernel(x, residual, self.norm_weight, self.eps, self.wqkv.weight, self.wqkv.bias,
                                            self.wo.weight, self.wo.bias, step.cos, step.sin, step.kv_len - 1,
                                            self.k_cache, self.v_cache, self.n_head)
        normed, h = self.ops.add_rms_norm(x, residual, self.norm_weight, self.eps)
        b, t, _ = normed.shape
        qkv = self.wqkv(normed).view(b, t, self.n_head + 2 * self.n_kv, self.head_dim)
        qk, v = qkv[:, :, : self.n_head + self.n_kv], qkv[:, :, self.n_head + self.n_kv:]
        if self.q_norm is not None:
            qk = torch.cat((rms_norm(qk[:, :, : self.n_head], *self.q_norm),
                            rms_norm(qk[:, :, self.n_head:], *self.k_norm)), 2)
        q, k = self.ops.rope_and_cache(qk, self.n_head, v, step, self.k_cache, self.v_cache)
        if step.prefill:  # the prompt attends to itself only (prefill starts at position 0)
            y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               is_causal=True, enable_gqa=True).transpose(1, 2)
        else:
            y = self.ops.decode_attention(q.reshape(b, self.n_head, self.head_dim), self.k_cache, self.v_cache, step)
        return self.wo(y.reshape(b, t, -1)), h


class FeedForward(nn.Module):
    """Pre-norm SwiGLU MLP with gate and up fused into one matmul."""

    def __init__(self, hf_block: nn.Module, ops, dtype: torch.dtype, stream_dtype: torch.dtype):
        super().__init__()
        mlp = hf_block.mlp
        self.ops = ops
        self.norm_weight, self.eps = norm_of(hf_block.post_attention_layernorm, stream_dtype)
        self.w13 = Dense.fuse(mlp.gate_proj, mlp.up_proj, dtype=dtype)
        self.w2 = Dense.fuse(mlp.down_proj, dtype=dtype)
        biased = self.w13.bias is not None or self.w2.bias is not None
        self.decode_kernel = None if biased else unit_kernel(ops, "feed_forward_decode", stream_dtype, self.w13, self.w2)

    def forward(self, x, residual, step: Step) -> Stream:
        if self.decode_kernel is not None and residual.numel() == residual.shape[-1]:
            return None, self.decode_kernel(x, residual, self.norm_weight, self.eps, self.w13.weight, self.w2.weight)
        normed, h = self.ops.add_rms_norm(x, residual, self.norm_weight, self.eps)
        gate, up = self.w13(normed).chunk(2, dim=-1)
        return self.w2(self.ops.swiglu(gate, up)), h


class Bypass(nn.Module):
    """A removed unit's stand-in, `h + (norm(h) @ down) @ up + bias`, as one fused op. It consumes
    the pending `x`, so the stream leaves it fully summed. Its weights are in the stream dtype: it
    reads and writes the stream, and its hidden x rank matrices are ~2% of a plan's bytes."""

    def __init__(self, norm: nn.Module, down: torch.Tensor, up: torch.Tensor, bias: torch.Tensor, ops):
        super().__init__()
        self.ops = ops
        self.norm_weight, self.eps = norm_of(norm, down.dtype)
        self.down, self.up, self.bias = down, up, bias  # `down` is shared by all FFN bypasses
        self.decode_kernel = unit_kernel(ops, "bypass_decode", down.dtype)  # its weights are in the stream dtype

    def forward(self, x, residual, step: Step) -> Stream:
        if self.decode_kernel is not None and residual.numel() == residual.shape[-1]:
            return None, self.decode_kernel(x, residual, self.norm_weight, self.eps, self.down, self.up, self.bias)
        return None, self.ops.bypass(x, residual, self.norm_weight, self.eps, self.down, self.up, self.bias)


def unit_kernel(ops, name: str, stream_dtype: torch.dtype, *matmuls: Dense):
    """The C++ kernel that runs a whole unit of a batch-1 decode step in one call (`cpu_kernels`), where
    it serves: the PyTorch path on a CPU where the kernels build, a float32 stream, and matmul weights
    all bfloat16 or all float32. Else None, and the unit runs op by op."""
    kernels = getattr(ops, "cpu_kernels", None)
    dtypes = {m.weight.dtype for m in matmuls}
    if (kernels is None or stream_dtype != torch.float32 or len(dtypes) > 1
            or not dtypes <= {torch.bfloat16, torch.float32}
            or any(m.weight.device.type != "cpu" or not m.weight.is_contiguous() for m in matmuls)):
        return None
    return getattr(kernels, name)


def norm_of(norm: nn.Module, dtype: torch.dtype) -> tuple[torch.Tensor, float]:
    """An RMSNorm's (weight in `dtype`, eps); the weight is shared with the module when no cast is needed."""
    return norm.weight.detach().to(dtype), norm.variance_epsilon


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
    """`forward(ids, step)` -> final normed hidden states; `logits(hidden)` -> float32 logits.

    `dtype` (default: the model's) is the matmul weights' and the KV cache's dtype."""

    def __init__(self, hf_model: nn.Module, plan: Plan | None, *, max_seq_len: int, use_kernels: bool,
                 dtype: torch.dtype | None = None):
        super().__init__()
        dec = Decoder(hf_model)
        config = dec.config
        check_supported(config, max_seq_len)
        weight = dec.body.embed_tokens.weight
        self.dtype = dtype or weight.dtype
        check_dtype(self.dtype, weight.device)
        self.stream_dtype = self.dtype if use_kernels else torch.float32
        attn_actions = plan.attn if plan is not None else ["keep"] * dec.num_layers
        ffn_actions = plan.ffn if plan is not None else ["keep"] * dec.num_layers
        self.ops = KernelOps() if use_kernels else TorchOps(weight.device)
        self.config = config
        self.max_seq_len = max_seq_len
        self.n_kv = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.slots = slot_map(attn_actions)
        # Bypass weights in the stream dtype; "ffn.basis" stays one tensor, shared by every FFN bypass.
        tensors = {k: v.to(weight.device, self.stream_dtype)
                   for k, v in (plan.tensors if plan is not None else {}).items()}

        def unit(kind: str, i: int, action: str) -> nn.Module | None:
            block = dec.layers[i]
            if action == "delete":
                return None
            if action == "bypass":
                down = tensors[f"attn.{i}.down"] if kind == "attn" else tensors["ffn.basis"]
                return Bypass(dec.norm(kind, i), down, tensors[f"{kind}.{i}.up"], tensors[f"{kind}.{i}.bias"], self.ops)
            if kind == "attn":
                return Attention(block, config, self.ops, self.dtype, self.stream_dtype)
            return FeedForward(block, self.ops, self.dtype, self.stream_dtype)

        self.layers = nn.ModuleList(
            Block(unit("attn", i, attn_actions[i]), unit("ffn", i, ffn_actions[i])) for i in range(dec.num_layers)
        )
        self.embed_weight = weight.detach().to(self.dtype)
        self.norm_weight, self.norm_eps = norm_of(dec.body.norm, self.stream_dtype)
        head = hf_model.lm_head
        tied = head.weight.data_ptr() == weight.data_ptr() and head.bias is None
        self.lm_head = Dense(self.embed_weight) if tied else Dense.fuse(head, dtype=self.dtype)
        # RoPE tables from the model's own rotary module, so llama3/yarn/... scaling is honoured.
        positions = torch.arange(max_seq_len, device=weight.device)[None]
        cos, sin = dec.rotary(torch.zeros(1, device=weight.device, dtype=torch.float32), positions)
        self.register_buffer("cos", cos[0, :, : self.head_dim // 2].float().contiguous(), persistent=False)
        self.register_buffer("sin", sin[0, :, : self.head_dim // 2].float().contiguous(), persistent=False)
        self.cache: CompactKVCache | None = None
        self.tp = None  # this rank's `tensor_parallel.TensorParallel`, once `tensor_parallel.shard` has cut the model

    def setup_cache(self, batch_size: int) -> CompactKVCache:
        """Allocate the static compact cache for `batch_size` sequences and bind each attention to its slot."""
        self.cache = CompactKVCache(self.slots, batch_size, self.n_kv, self.max_seq_len, self.head_dim,
                                    dtype=self.dtype, device=self.embed_weight.device)
        for i, block in enumerate(self.layers):
            if isinstance(block.attn, Attention):
                block.attn.k_cache, block.attn.v_cache = self.cache.layer(i)
        return self.cache

    def step(self, positions: torch.Tensor, seq_lens: torch.Tensor, *, prefill: bool, kv_len: int = 0,
             mask: torch.Tensor | None = None) -> Step:
        return Step(positions, seq_lens, self.cos, self.sin, prefill, kv_len, mask)

    def forward(self, ids: torch.Tensor, step: Step) -> torch.Tensor:
        x, residual = None, F.embedding(ids, self.embed_weight).to(self.stream_dtype)
        step = self.ops.prepare(step, self.dtype)
        for block in self.layers:
            x, residual = block(x, residual, step)
        return self.ops.add_rms_norm(x, residual, self.norm_weight, self.norm_eps)[0]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def decode_weight_bytes(self) -> int:
        """Weight bytes one decode step reads, as stored (each tensor once): the matmul weights, norms
        and bypasses of the units it runs, the final norm, the LM head and one embedding row."""
        tensors = {}
        for module in self.modules():
            for name, value in vars(module).items():
                for t in value if isinstance(value, tuple) else (value,):
                    if isinstance(t, torch.Tensor) and name not in ("k_cache", "v_cache", "embed_weight"):
                        tensors[id(t)] = t
        return sum(t.nbytes for t in tensors.values()) + self.embed_weight[0].nbytes


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
