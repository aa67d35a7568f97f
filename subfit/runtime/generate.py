"""Prefill, decode step, sampling, CUDA graph and the generation loop around `Transformer`.

Sequences of one batch keep their own lengths: a prompt batch is right-padded for prefill (causal
attention keeps padding out of every real token's view), then each sequence decodes at its own
position, and attention reads only its `seq_lens[b]` cached tokens. Every sequence therefore sees
exactly the positions it would see alone.
"""
from __future__ import annotations

import math
import numbers
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

import subfit.runtime.cpu_kernels as cpu_kernels
import subfit.runtime.tensor_parallel as tensor_parallel
from subfit import models
from subfit.devices import check_device, default_device
from subfit.models import Decoder
from subfit.plan import PLAN_FILE, Plan
from subfit.runtime.model import Transformer, check_dtype, default_dtype

Prompt = str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]] | torch.Tensor
DEFAULT_MAX_SEQ_LEN = 2048


class CacheOverflowError(ValueError):
    """A prompt plus the tokens asked for do not fit the static KV cache."""


@dataclass
class StreamStep:
    """One decoding step: the token each sequence produced (None once it has finished) and the new text."""

    ids: list[int | None]
    text: list[str]


@dataclass
class Generation:
    """New tokens (EOS included when produced) and their text. For a single prompt `ids` is a list
    of ints and `text` a str; for a batch, one entry per prompt."""

    ids: list[int] | list[list[int]]
    text: str | list[str]


def _positive_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1


def _real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


# argument -> (test, what it must be): the sampling rules, for the Python API and the CLI alike
SAMPLING_RULES = {
    "max_new_tokens": (_positive_int, "a positive integer"),
    "temperature": (lambda v: _real(v) and v >= 0, "a temperature >= 0 (0 = greedy), not inf or nan"),
    "top_k": (lambda v: v is None or _positive_int(v), "a positive integer"),
    "top_p": (lambda v: v is None or (_real(v) and 0 < v <= 1), "a top-p in (0, 1]"),
    "seed": (lambda v: v is None or (isinstance(v, numbers.Integral) and not isinstance(v, bool)
                                     and -2**63 <= v < 2**64), "an integer seed (a torch.Generator's range)"),
}


def check_sampling(max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
                   top_p: float | None = None, seed: int | None = None) -> None:
    """Refuse a bad generation argument before any work, naming it and what it must be."""
    values = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_k": top_k, "top_p": top_p,
              "seed": seed}
    for name, value in values.items():
        valid, expected = SAMPLING_RULES[name]
        if not valid(value):
            raise ValueError(f"{name}={value!r}: expected {expected}.")


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token per row of `logits` [B, V]: argmax when temperature is 0, else temperature, top-k
    and top-p (nucleus) filtering in Hugging Face's order, then a draw."""
    if not temperature or temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        ordered, order = torch.sort(logits, dim=-1, descending=True)
        probs = ordered.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs >= top_p  # tokens after the nucleus; the top one always stays
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return draw(logits.softmax(dim=-1), generator)


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of `probs` [B, V] by inverting its cumulative distribution at a uniform draw:
    B random numbers, where `torch.multinomial` draws one per vocabulary entry (74 ms a step for
    80 x 49k on a CPU core, most of the time of sampling calibration text). A token of probability
    0 is never drawn: the first entry whose running total exceeds the draw has mass."""
    cdf = probs.double().cumsum(dim=-1)
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device, dtype=torch.float64) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True)[:, 0].clamp_max(probs.shape[-1] - 1)


class Runtime:
    """A plan's model ready to decode: `generate`, `stream`, or `prefill` + `decode_step` by hand.

    The KV cache is static (allocated for `max_seq_len` tokens per sequence, reallocated only when
    the batch size changes); on CUDA the decode step is replayed from a CUDA graph.
    """

    def __init__(self, model: Transformer, tokenizer=None, plan: Plan | None = None, *, eos: list[int] | None = None,
                 cuda_graph: bool = False):
        self.model, self.tokenizer, self.plan = model, tokenizer, plan
        self.device = model.embed_weight.device
        self.dtype = model.dtype
        self.max_seq_len = model.max_seq_len
        self.eos = list(eos or [])
        self.cuda_graph = cuda_graph
        self._lengths: list[int] = []
        self._graph: torch.cuda.CUDAGraph | None = None
        self._setup(1)

    @classmethod
    def from_hf(cls, hf_model, plan: Plan | None = None, tokenizer=None, *, max_seq_len: int | None = None,
                batch_size: int = 1, use_kernels: bool | None = None, cuda_graph: bool | None = None,
                dtype: torch.dtype | str | None = None, tp: int = 1) -> "Runtime":
        """Build from a loaded Hugging Face model, after checking that `plan` is valid and was made for
        it. `dtype` (default: the model's) is the matmul weights' and the KV cache's. Fused projections
        and weights cast to `dtype` are copies; the other weights are shared with `hf_model`.
        `tp` > 1 keeps this rank's share of the model (see `tensor_parallel`); every rank of the
        process group calls this with the same arguments."""
        if tp != 1:
            tensor_parallel.check(tp, hf_model.config, tensor_parallel.model_name(*_source_parts(hf_model)))
        if plan is not None:
            plan.validate()
            plan.check_base(Decoder(hf_model))
        device = hf_model.get_input_embeddings().weight.device
        if use_kernels is None:  # the Triton interpreter on CPU is for tests: ask for it by name
            use_kernels = device.type == "cuda"
        capturable = tp == 1 or tensor_parallel.graph_capturable()
        if cuda_graph is None:
            cuda_graph = device.type == "cuda" and use_kernels and capturable
        if cuda_graph and not (use_kernels and device.type == "cuda"):
            raise ValueError("cuda_graph=True needs a CUDA device and use_kernels=True (the PyTorch decode path "
                             "has data-dependent shapes).")
        if cuda_graph and not capturable:
            raise ValueError("cuda_graph=True with tp > 1 needs the NCCL backend, whose all-reduces a CUDA graph can "
                             "capture; use cuda_graph=False with gloo.")
        limit = models.max_positions(hf_model.config)
        if max_seq_len is None:
            max_seq_len = min(limit or DEFAULT_MAX_SEQ_LEN, DEFAULT_MAX_SEQ_LEN)
        for name, value in (("max_seq_len", max_seq_len), ("batch_size", batch_size)):
            if not _positive_int(value):
                raise ValueError(f"{name}={value!r}: expected a positive integer.")
        models.check_positions(limit, max_seq_len, f"max_seq_len={max_seq_len} (--max-seq-len)")
        if dtype is not None:
            dtype = parse_dtype(dtype, device)
        model = Transformer(hf_model, plan, max_seq_len=max_seq_len, use_kernels=use_kernels, dtype=dtype)
        if tp > 1:
            tensor_parallel.shard(model, tensor_parallel.TensorParallel())
        runtime = cls(model, tokenizer, plan, eos=_default_eos(hf_model, tokenizer), cuda_graph=cuda_graph)
        if batch_size != 1:
            runtime._setup(batch_size)
        return runtime

    # state ---------------------------------------------------------------------------------
    def _setup(self, batch_size: int) -> None:
        """(Re)allocate the static cache and the per-sequence position buffers for `batch_size`."""
        self.model.setup_cache(batch_size)
        self._pos = torch.zeros(batch_size, 1, dtype=torch.long, device=self.device)  # next token's position
        self._seq_lens = torch.ones(batch_size, dtype=torch.int32, device=self.device)  # = _pos + 1
        self._graph = None

    def kv_cache_bytes(self) -> int:
        """Bytes held by the KV cache: retained attention slots only."""
        return self.model.cache.nbytes()

    @property
    def batch_size(self) -> int:
        return self.model.cache.batch_size

    # low level -----------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor | Sequence[Sequence[int]],
                lengths: Sequence[int] | None = None) -> torch.Tensor:
        """Start new sequences from `ids` ([B, T] tensor, right-padded when `lengths` is given, or a list
        of token lists) and return the float32 logits [B, V] of each sequence's next token."""
        rows = _rows_of(ids, lengths)
        self._check(rows, 0)
        b, t = len(rows), max(len(r) for r in rows)
        if self.batch_size != b:
            self._setup(b)
        padded = torch.zeros(b, t, dtype=torch.long)
        for i, row in enumerate(rows):
            padded[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
        lengths_t = torch.tensor([len(r) for r in rows], device=self.device)
        positions = torch.arange(t, device=self.device).expand(b, t)
        step = self.model.step(positions, lengths_t.to(torch.int32), prefill=True)
        hidden = self.model(padded.to(self.device), step)
        logits = self.model.logits(hidden[torch.arange(b, device=self.device), lengths_t - 1])
        self._lengths = [len(r) for r in rows]
        self._pos.copy_(lengths_t[:, None])
        self._seq_lens.copy_(lengths_t + 1)
        return logits

    @torch.inference_mode()
    def decode_step(self, tokens: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """Append one token per sequence ([B]) and return the float32 logits [B, V] of the next one."""
        if not self._lengths:
            raise RuntimeError("decode_step() needs a prefill() first.")
        if max(self._lengths) >= self.max_seq_len:
            raise CacheOverflowError(f"The KV cache is full ({self.max_seq_len} tokens per sequence); "
                                     "load the runtime with a larger max_seq_len.")
        tokens = torch.as_tensor(tokens, device=self.device).view(self.batch_size, 1)
        if self.cuda_graph:
            logits = self._graphed(tokens)
        else:
            kv_len = max(self._lengths) + 1
            mask = None
            if min(self._lengths) != max(self._lengths):  # ragged batch: hide other sequences' tails
                mask = (torch.arange(kv_len, device=self.device) < self._seq_lens[:, None])[:, None, None, :]
            step = self.model.step(self._pos, self._seq_lens, prefill=False, kv_len=kv_len, mask=mask)
            logits = self.model.logits(self.model(tokens, step)[:, 0])
        self._pos += 1
        self._seq_lens += 1
        self._lengths = [n + 1 for n in self._lengths]
        return logits

    def _graphed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Replay the captured decode step; capture it on first use (after warm-up runs, which also
        autotune the Triton kernels; each run recomputes the same step, so the cache stays right)."""
        if self._graph is None:
            self._static_tokens = tokens.clone()
            step = self.model.step(self._pos, self._seq_lens, prefill=False)

            def run() -> torch.Tensor:
                return self.model.logits(self.model(self._static_tokens, step)[:, 0])

            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    run()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._static_logits = run()
            self._graph = graph
        self._static_tokens.copy_(tokens)
        self._graph.replay()
        return self._static_logits.clone()

    def _check(self, rows: list[list[int]], max_new_tokens: int) -> None:
        """Reject bad prompts before any work is done."""
        if not rows or any(len(r) == 0 for r in rows):
            raise ValueError("Every prompt needs at least one token (e.g. BOS).")
        vocab = self.model.embed_weight.shape[0]
        bad = [tok for r in rows for tok in r if not 0 <= tok < vocab]
        if bad:
            raise ValueError(f"Token ids {bad[:5]} are outside the vocabulary [0, {vocab}).")
        longest = max(len(r) for r in rows)
        if longest + max_new_tokens > self.max_seq_len:
            raise CacheOverflowError(
                f"The prompt ({longest} tokens) plus max_new_tokens ({max_new_tokens}) needs "
                f"{longest + max_new_tokens} positions, but the KV cache holds {self.max_seq_len}. Shorten the "
                f"prompt, ask for fewer tokens, or load with max_seq_len >= {longest + max_new_tokens}.")

    # high level ----------------------------------------------------------------------------
    def stream(self, prompt: Prompt, max_new_tokens: int = 64, *, temperature: float = 0.0, top_k: int | None = None,
               top_p: float | None = None, eos: int | Sequence[int] | None = None,
               seed: int | None = None) -> Iterator[StreamStep]:
        """Generate step by step: yields one `StreamStep` per new token position. The prompt is checked
        here, before the first token; the work happens as the iterator is consumed."""
        check_sampling(max_new_tokens, temperature, top_k, top_p, seed)
        rows, _, eos_ids, generator = self._prepare(prompt, max_new_tokens, eos, seed)
        return self._stream(rows, max_new_tokens, temperature, top_k, top_p, eos_ids, generator, text=True)

    def generate(self, prompt: Prompt, max_new_tokens: int = 64, *, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, eos: int | Sequence[int] | None = None,
                 seed: int | None = None) -> Generation:
        """Generate up to `max_new_tokens` per prompt (text, token ids, or a batch of either), stopping a
        sequence at EOS; greedy when temperature is 0."""
        check_sampling(max_new_tokens, temperature, top_k, top_p, seed)
        rows, single, eos_ids, generator = self._prepare(prompt, max_new_tokens, eos, seed)
        new: list[list[int]] = [[] for _ in rows]
        for step in self._stream(rows, max_new_tokens, temperature, top_k, top_p, eos_ids, generator, text=False):
            for b, token in enumerate(step.ids):
                if token is not None:
                    new[b].append(token)
        texts = [self._text(r, n) for r, n in zip(rows, new)]
        return Generation(new[0], texts[0]) if single else Generation(new, texts)

    def _prepare(self, prompt: Prompt, max_new_tokens: int, eos, seed):
        """Validate everything before any work: token lists, single-or-batch, EOS ids, RNG."""
        rows, single = self._encode(prompt)
        self._check(rows, max_new_tokens)
        eos_ids = set(self.eos if eos is None else _token_ids([eos] if _is_token(eos) else eos, "eos"))
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(seed)
        return rows, single, eos_ids, generator

    def _stream(self, rows, max_new_tokens, temperature, top_k, top_p, eos_ids, generator, *,
                text: bool) -> Iterator[StreamStep]:
        new: list[list[int]] = [[] for _ in rows]
        shown = [""] * len(rows)
        done = [False] * len(rows)
        logits = self.prefill(rows)
        for i in range(max_new_tokens):
            tokens = sample(logits, temperature, top_k, top_p, generator)
            if temperature and self.model.tp is not None:  # ranks without a seed draw differently: rank 0 decides
                self.model.tp.broadcast(tokens)
            ids: list[int | None] = []
            texts: list[str] = []
            for b, token in enumerate(tokens.tolist()):
                if done[b]:
                    ids.append(None)
                    texts.append("")
                    continue
                new[b].append(token)
                done[b] = token in eos_ids
                ids.append(token)
                if not text:
                    continue
                full = self._text(rows[b], new[b])
                stable = full if done[b] or i == max_new_tokens - 1 else full.rstrip("\ufffd")  # half a character
                if stable.startswith(shown[b]):
                    texts.append(stable[len(shown[b]):])
                    shown[b] = stable
                else:  # the tokenizer rewrote earlier text: nothing safe to show this step
                    texts.append("")
            yield StreamStep(ids, texts)
            if all(done) or i == max_new_tokens - 1:
                return
            logits = self.decode_step(tokens)

    def as_hf(self):
        """This runtime behind the subset of Hugging Face's `model.generate` that existing code uses."""
        from subfit.runtime.hf import HFGenerate

        return HFGenerate(self)

    # text ----------------------------------------------------------------------------------
    def _encode(self, prompt: Prompt) -> tuple[list[list[int]], bool]:
        """Token lists for a prompt or a batch of them, and whether it was a single prompt."""
        if isinstance(prompt, torch.Tensor):
            return _rows_of(prompt if prompt.dim() == 2 else prompt[None]), prompt.dim() == 1
        if isinstance(prompt, str):
            prompt = [prompt]
            single = True
        else:
            prompt = list(prompt)
            single = bool(prompt) and not isinstance(prompt[0], (str, Sequence, torch.Tensor))
            if single:
                prompt = [prompt]
        if any(isinstance(p, str) for p in prompt):
            if self.tokenizer is None:
                raise ValueError("Text prompts need a tokenizer; pass token ids or load the runtime with one.")
            return [self.tokenizer(p).input_ids for p in prompt], single
        return [_token_ids(p, "prompt") for p in prompt], single

    def _text(self, prompt: list[int], new: list[int]) -> str:
        """Text of `new` as it reads after the prompt: decoded behind the prompt's last token so that
        tokenizers which drop a word's leading space at the start of a string keep it here."""
        if self.tokenizer is None:
            return ""
        kwargs = {"skip_special_tokens": True, "clean_up_tokenization_spaces": False}
        head = self.tokenizer.decode(prompt[-1:], **kwargs)
        full = self.tokenizer.decode(prompt[-1:] + new, **kwargs)
        return full[len(head):] if full.startswith(head) else self.tokenizer.decode(new, **kwargs)


def _rows_of(ids, lengths: Sequence[int] | None = None) -> list[list[int]]:
    """[B, T] tensor (right-padded to `lengths`) or list of token lists -> list of token lists."""
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist() if ids.dim() == 2 else [ids.tolist()]
    rows = [_token_ids(r, "ids") for r in ids]
    if lengths is not None:
        if len(lengths) != len(rows):
            raise ValueError(f"{len(lengths)} lengths for {len(rows)} sequences.")
        rows = [r[: int(n)] for r, n in zip(rows, lengths)]
    return rows


def _is_token(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _token_ids(values, what: str) -> list[int]:
    """Token ids as ints; a float, bool or text among them is refused, never rounded or iterated."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise ValueError(f"{what}={values!r:.60}: expected token ids (integers).")
    values = list(values)
    bad = [v for v in values if not _is_token(v)]
    if bad:
        raise ValueError(f"{what} holds {bad[0]!r}, which is not a token id: token ids are integers "
                         "(tokenize text first, or pass it as a string).")
    return [int(v) for v in values]


def _source_parts(hf_model) -> tuple[str, str | None]:
    source = models.source_of(hf_model)
    return source.path, source.gguf_file


def _default_eos(hf_model, tokenizer) -> list[int]:
    """EOS ids as `model.generate` would use them: the generation config's, else the tokenizer's."""
    eos = getattr(getattr(hf_model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = getattr(hf_model.config, "eos_token_id", None)
    if eos is None and tokenizer is not None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return []
    return [eos] if isinstance(eos, int) else list(eos)


def parse_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    """A dtype or its name, refused where the device cannot run it fast; None -> `default_dtype`."""
    if dtype is None:
        return default_dtype(device)
    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if not isinstance(dtype, torch.dtype):
        if dtype not in names:
            raise ValueError(f"Unknown dtype {dtype!r}; use one of {', '.join(names)}.")
        dtype = names[dtype]
    check_dtype(dtype, device)
    return dtype


def read_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype to read a model's weights in for a runtime of `dtype`: float32 on CPU, where the
    runtime casts its matmul weights itself and keeps the norms in float32; `dtype` elsewhere."""
    return torch.float32 if device.type == "cpu" else dtype


def _is_plan(target) -> bool:
    """A Plan or plan directory (True), or something `models.load` takes (False); a folder that is
    neither is an error here, with a clearer message than the model loader's."""
    if isinstance(target, Plan) or target is None:
        return target is not None
    path = Path(target)
    if (path / PLAN_FILE).is_file():
        return True
    if not path.exists() and (path.is_absolute() or str(target).startswith((".", "~")) or len(path.parts) > 2):
        raise FileNotFoundError(f"{target} does not exist: give a plan directory, a model folder or .gguf file, "
                                "or a Hugging Face model id.")
    if path.is_dir() and not (path / "config.json").exists() and not any(path.glob("*.gguf")):
        raise FileNotFoundError(f"{path} is neither a plan directory ({PLAN_FILE}) nor a model folder (config.json "
                                "or a .gguf file). Make a plan with `subfit compress`.")
    return False


def load(plan: Plan | str | os.PathLike | None, device: str | torch.device | None = None,
         dtype: torch.dtype | str | None = None, base: str | os.PathLike | None = None, *,
         max_seq_len: int | None = None, batch_size: int = 1, use_kernels: bool | None = None,
         cuda_graph: bool | None = None, tp: int = 1) -> Runtime:
    """Load a plan (directory or `Plan`) onto its base model and return a `Runtime` ready to decode.

    The base weights come from the path the plan names (`base=` overrides it for moved plans) and
    must match the plan's fingerprint. Anything that is not a plan directory (a model folder, hub
    id, .gguf file, or None for the default model) is loaded dense, i.e. with its empty plan.
    Defaults: CUDA if available (bfloat16, Triton kernels, CUDA graph), else CPU with bfloat16
    weights where the CPU has bf16 units and float32 elsewhere.

    `tp` > 1 shards the model over that many processes (launched by torchrun, joined by
    `init_distributed()`): each holds 1/tp of the attention heads, the FeedForward width, the bypass
    ranks and the KV cache; embeddings, norms and the LM head are replicated (see `tensor_parallel`).
    A degree that does not divide the model is refused before any weight is read; a bare "cuda"
    device means each rank's own GPU.
    """
    device = check_device(default_device() if device is None else device)
    dtype = parse_dtype(dtype, device)
    is_plan = _is_plan(plan)
    if is_plan:
        plan = plan if isinstance(plan, Plan) else Plan.load(plan)
        source = models.base_source(plan.base, base)
    else:
        source = models.resolve_source(base if base is not None else plan)
    if tp != 1:
        name = tensor_parallel.model_name(source.path, source.gguf_file)
        tensor_parallel.check(tp, models.load_config(source), name)
        device = tensor_parallel.rank_device(device)
    elif device.type == "cpu":
        cpu_kernels.build_in_background()  # a first build overlaps the model's load
    hf_model, tokenizer, _ = models.load(source, dtype=read_dtype(dtype, device), device=device)
    if not is_plan:
        plan = Plan.empty(Decoder(hf_model), source)
    return Runtime.from_hf(hf_model, plan, tokenizer, max_seq_len=max_seq_len, batch_size=batch_size,
                           use_kernels=use_kernels, cuda_graph=cuda_graph, dtype=dtype, tp=tp)
