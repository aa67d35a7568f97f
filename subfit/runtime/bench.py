"""Decode latency measurement shared by `subfit bench` and `bench/decode/`.

Every contender has `prefill(ids)` (returns the first new token, greedy) and `decode(token)`
(returns the next one), so all are timed the same way: prefill latency once per round, then
`new_tokens - 1` decode steps. Speed depends on a plan's shape, not its weights, so benchmarks
may use `synthetic_plan` (random bypass weights at a target sparsity) when no real plan exists.
"""
from __future__ import annotations

import inspect
import platform
import statistics
import time
from dataclasses import dataclass

import torch

from subfit.models import Decoder as HFDecoder
from subfit.plan import Plan


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class RuntimeContender:
    """Our runtime: prefill + CUDA-graphed (on GPU) decode steps, greedy."""

    def __init__(self, runtime):
        self.runtime = runtime
        self.device = runtime.device

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        return self.runtime.prefill(ids).argmax(-1)

    def decode(self, token: torch.Tensor) -> torch.Tensor:
        return self.runtime.decode_step(token).argmax(-1)

    def kv_bytes_per_token(self) -> int:
        return self.runtime.kv_cache_bytes() // (self.runtime.batch_size * self.runtime.max_seq_len)

    def weight_bytes_per_token(self) -> int:
        return self.runtime.model.decode_weight_bytes()


class HFContender:
    """A transformers model, greedy: eager with its dynamic cache, or (`compiled=True`, CUDA) the
    static cache with a torch.compile'd decode step, as the Hugging Face docs recommend."""

    def __init__(self, model, *, compiled: bool = False, max_cache_len: int = 2048):
        self.model, self.compiled, self.max_cache_len = model, compiled, max_cache_len
        self.device = model.device
        # Newer transformers name the cache argument `cache` (`past_key_values` goes in 5.40).
        self.cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.step = self._step
        if compiled:
            self.step = torch.compile(self._step, mode="reduce-overhead", fullgraph=True)

    def _step(self, token, cache_position, cache):
        logits = self.model(token, cache_position=cache_position, use_cache=True, return_dict=False,
                            **{self.cache_arg: cache})[0]
        return logits[:, -1].argmax(-1, keepdim=True)

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        from transformers import DynamicCache, StaticCache

        ids = ids.to(self.device)
        if not self.compiled:
            self.cache = DynamicCache(config=self.model.config)
        elif hasattr(self, "cache"):
            self.cache.reset()  # same buffers every round: the compiled step's CUDA graphs stay valid
        else:
            self.cache = StaticCache(config=self.model.config, max_cache_len=self.max_cache_len)
        self.position = ids.shape[1]
        return self._step(ids, torch.arange(self.position, device=self.device), self.cache)

    @torch.inference_mode()
    def decode(self, token: torch.Tensor) -> torch.Tensor:
        position = torch.tensor([self.position], device=self.device)
        self.position += 1
        return self.step(token.view(-1, 1), position, self.cache).clone()

    def kv_bytes_per_token(self) -> int:
        cfg = self.model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * self.model.dtype.itemsize

    def weight_bytes_per_token(self) -> int:
        return weight_bytes_per_step(HFDecoder(self.model).block_params(), self.model.config, self.model.dtype.itemsize)


def weight_bytes_per_step(block_params: int, config, itemsize: int) -> int:
    """Weight bytes one decode step of a Hugging Face model reads: the transformer blocks'
    parameters, the final norm and the LM head; the embedding adds only one row."""
    return (block_params + config.vocab_size * config.hidden_size + config.hidden_size) * itemsize


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def environment(device: torch.device) -> dict:
    """What a decode figure depends on besides the code: library versions, threads, the processor
    and (on CPU) its bf16 units."""
    import transformers

    from subfit.hardware import cpu_bf16_units

    env = {"torch": torch.__version__, "transformers": transformers.__version__, "device": device.type}
    if device.type == "cuda":
        return env | {"processor": torch.cuda.get_device_name(device)}
    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    return env | {"processor": caps.get("cpu_name") or platform.processor() or platform.machine(),
                  "cores": caps.get("num_physical_cores"), "threads": torch.get_num_threads(),
                  "bf16_units": cpu_bf16_units()}


def describe(env: dict) -> str:
    """`environment` as one line (the thread count only when `env` has one)."""
    line = f"torch {env['torch']}, transformers {env['transformers']}, {env['processor']}"
    if env["device"] == "cpu":
        line += f" ({env['cores']} cores, bf16 units: {', '.join(env['bf16_units']) or 'none'})"
        if "threads" in env:
            line += f", {env['threads']} thread{'s' * (env['threads'] > 1)}"
    return line


def greedy_agreement(reference, other, prompt: list[int], new_tokens: int) -> dict:
    """How closely runtime `other` follows runtime `reference` on one prompt: greedy tokens equal
    before the first difference and, there, the reference's logit margin between its token and
    `other`'s (a near tie explains a difference); then, with both fed the reference's tokens,
    top-1 agreement and the relative error of the logits over all `new_tokens` positions."""
    expected = reference.generate(prompt, new_tokens, eos=[]).ids
    got = other.generate(prompt, new_tokens, eos=[]).ids
    same = next((i for i, (a, b) in enumerate(zip(expected, got)) if a != b), min(len(expected), len(got)))

    def logits_along(runtime) -> torch.Tensor:
        logits = [runtime.prefill([prompt])[0]]
        logits += [runtime.decode_step([token])[0] for token in expected[:-1]]
        return torch.stack(logits)

    ref, oth = logits_along(reference), logits_along(other)
    margin = (ref[same, expected[same]] - ref[same, got[same]]).item() if same < new_tokens else None
    return {"new_tokens": new_tokens, "same_prefix": same, "margin_at_difference": margin,
            "top1": (ref.argmax(-1) == oth.argmax(-1)).float().mean().item(),
            "relative_error": ((oth - ref).norm() / ref.norm()).item()}


@dataclass
class Timing:
    prefill_s: float
    decode_s_per_token: float

    @property
    def tokens_per_s(self) -> float:
        return 1.0 / self.decode_s_per_token


def time_contender(contender, ids: torch.Tensor, new_tokens: int, rounds: int, warmup: int = 1) -> Timing:
    """Median over `rounds` of prefill latency and of decode time per token (greedy, batch of `ids`)."""
    prefill, decode = [], []
    for i in range(warmup + rounds):
        synchronize(contender.device)
        start = time.perf_counter()
        token = contender.prefill(ids)
        synchronize(contender.device)
        mid = time.perf_counter()
        for _ in range(new_tokens - 1):
            token = contender.decode(token)
        synchronize(contender.device)
        end = time.perf_counter()
        if i >= warmup:
            prefill.append(mid - start)
            decode.append((end - mid) / (new_tokens - 1))
    return Timing(statistics.median(prefill), statistics.median(decode))


def memory_bandwidth(device: torch.device | str, nbytes: int | None = None) -> float:
    """Measured copy bandwidth in bytes/s (read + write), the roofline's denominator: the median
    of ten copies of `nbytes` (default 1 GiB on CUDA, 256 MiB elsewhere). On CUDA each copy is
    timed with device events, so launch and host-synchronisation latency stay out of it."""
    device = torch.device(device)
    nbytes = nbytes or (1 << 30 if device.type == "cuda" else 1 << 28)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up: first-touch page mapping stays out of the timings
    seconds = []
    for _ in range(10):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            seconds.append(start.elapsed_time(end) / 1e3)
        else:
            start = time.perf_counter()
            dst.copy_(src)
            seconds.append(time.perf_counter() - start)
    return 2 * src.nbytes / statistics.median(seconds)


def synthetic_plan(hf_model, source, sparsity: float, *, attn_rank: int | None = None, ffn_rank: int | None = None,
                   seed: int = 0) -> Plan:
    """A plan of the right shape for speed measurements: bypasses with small random weights on
    non-contiguous layers, alternating attention and feedforward, until `sparsity` of the block
    parameters is removed (within half a unit). Default ranks: hidden/8 (attn) and hidden/2 (ffn)."""
    plan = Plan.empty(HFDecoder(hf_model), source)
    if sparsity <= 0:
        return plan
    order = _spread(len(plan.attn))
    candidates = [(kind, layer) for pair in zip(order, order[::-1]) for kind, layer in zip(("attn", "ffn"), pair)]
    target = sparsity * plan.block_params
    removed = 0
    for kind, layer in candidates:
        cost = plan.unit_params[kind]
        if plan.actions(kind)[layer] == "keep" and removed + cost <= target + plan.unit_params["attn"] / 2:
            plan.actions(kind)[layer] = "bypass"
            removed += cost
    plan = shaped_plan(hf_model, source, plan.attn, plan.ffn, attn_rank=attn_rank, ffn_rank=ffn_rank, seed=seed)
    plan.method = {"name": "synthetic", "sparsity": sparsity}
    return plan


def shaped_plan(hf_model, source, attn: list[str], ffn: list[str], *, attn_rank: int | None = None,
                ffn_rank: int | None = None, seed: int = 0) -> Plan:
    """A plan with these unit actions and small random bypass weights of these ranks (default
    hidden/8 and hidden/2, the compressor's): a real plan's shape, which is all its speed depends on."""
    dec = HFDecoder(hf_model)
    plan = Plan.empty(dec, source)
    plan.attn, plan.ffn = list(attn), list(ffn)
    hidden = dec.hidden_size
    attn_rank, ffn_rank = attn_rank or hidden // 8, ffn_rank or hidden // 2
    gen = torch.Generator().manual_seed(seed)
    scale = 0.02
    tensors = {}
    if "bypass" in plan.ffn:
        tensors["ffn.basis"] = torch.randn(hidden, ffn_rank, generator=gen) * scale
    for kind in ("attn", "ffn"):
        rank = attn_rank if kind == "attn" else ffn_rank
        for layer, action in enumerate(plan.actions(kind)):
            if action == "bypass":
                if kind == "attn":
                    tensors[f"attn.{layer}.down"] = torch.randn(hidden, rank, generator=gen) * scale
                tensors[f"{kind}.{layer}.up"] = torch.randn(rank, hidden, generator=gen) * scale
                tensors[f"{kind}.{layer}.bias"] = torch.randn(hidden, generator=gen) * scale
    plan.tensors = tensors
    plan.method = {"name": "shaped", "attn": plan.attn, "ffn": plan.ffn}
    plan.validate()
    return plan


def _spread(n: int) -> list[int]:
    """Layers 1..n-2 in an order that keeps consecutive picks apart (bisection order)."""
    inner = list(range(1, n - 1)) or list(range(n))
    order, queue = [], [(0, len(inner))]
    while queue:
        lo, hi = queue.pop(0)
        if lo >= hi:
            continue
        mid = (lo + hi) // 2
        order.append(inner[mid])
        queue += [(mid + 1, hi), (lo, mid)]
    return order


def compare(contenders: dict, ids: torch.Tensor, new_tokens: int, rounds: int, *,
            bandwidth: float | None = None) -> list[dict]:
    """Time each contender (name -> zero-argument builder, built and freed one at a time so that big
    models fit) and return one row each, with speed relative to the first row.

    `roofline` is the fraction of `bandwidth` (bytes/s) that a decode step's weight and KV reads
    reach: those bytes divided by the decode time.
    """
    rows: list[dict] = []
    context = ids.shape[1] + new_tokens / 2  # mean cache length over the decode steps
    for name, build in contenders.items():
        contender = build()
        timing = time_contender(contender, ids, new_tokens, rounds)
        kv = contender.kv_bytes_per_token()
        read = contender.weight_bytes_per_token() + kv * context * ids.shape[0]
        rows.append({
            "contender": name,
            "prefill_ms": timing.prefill_s * 1e3,
            "decode_ms_per_token": timing.decode_s_per_token * 1e3,
            "tokens_per_s": timing.tokens_per_s * ids.shape[0],
            "kv_bytes_per_token": kv,
            "bytes_read_per_step": int(read),
            "roofline": read / timing.decode_s_per_token / bandwidth if bandwidth else None,
        })
        del contender
    for row in rows:
        row["speedup"] = row["tokens_per_s"] / rows[0]["tokens_per_s"]
    return rows


def markdown_table(rows: list[dict], baseline: str = "first row", dense_name: str = "runtime dense") -> str:
    """Rows from `compare` (or alike) as a markdown table; `speedup` is relative to `baseline`, and
    a `vs_runtime_dense` column (relative to `dense_name`) is shown when the rows carry it."""
    dense = all("vs_runtime_dense" in r for r in rows)
    head = (f"| contender | prefill ms | decode ms/token | tokens/s | x {baseline} |"
            + (f" x {dense_name} |" if dense else "") + " KV bytes/token | MB/step | % roofline |")
    lines = [head, "|---|" + "---:|" * (head.count("|") - 2)]
    for r in rows:
        roof = f"{100 * r['roofline']:.0f}%" if r.get("roofline") is not None else "n/a"
        lines.append(f"| {r['contender']} | {r['prefill_ms']:.1f} | {r['decode_ms_per_token']:.2f} | "
                     f"{r['tokens_per_s']:.1f} | {r['speedup']:.2f} |" + (f" {r['vs_runtime_dense']:.2f} |" if dense
                                                                        else "")
                     + f" {r['kv_bytes_per_token']:,} | {r['bytes_read_per_step'] / 1e6:.0f} | {roof} |")
    return "\n".join(lines)
