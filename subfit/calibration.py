"""Calibration data: N sequences of L tokens, seeded, from a text file, a dataset, or the model.

Too little text for the request is an error, never a silently shorter run: the quality of every
fit depends on how many tokens it saw.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from subfit.errors import cause
from subfit.models import check_positions, max_positions

SELF = "self"
SAMPLING_CACHE_BYTES = 512 * 2**20  # KV cache of the sequences sampled at once from the model


class CalibrationError(ValueError):
    """The calibration request cannot be met as asked."""


def read_text(path: str | os.PathLike, what: str = "Text file") -> str:
    """A UTF-8 text file with line endings normalised (WikiText ships CRLF). A missing file, a
    folder, bytes that are not UTF-8 and a file without text are refused, naming the file (`what`
    says which input it is): decoding errors replaced by '?' would be scored as if they were text."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} {'is a folder' if path.is_dir() else 'does not exist'}; give a "
                                "text file.")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{what} {path} is not UTF-8 text (line {line}, byte {e.start}); convert it to "
                               "UTF-8, e.g. iconv -f latin1 -t utf-8.") from None
    if not text.strip():
        raise ValueError(f"{what} {path} holds no text{' (only whitespace)' if text else ''}; give a file "
                               "with text in it.")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def tokenize_stream(tokenizer, text: str) -> torch.Tensor:
    """One long token stream; documents (blank-line separated) joined with EOS when there is one."""
    docs = [d.strip() for d in text.split("\n\n") if d.strip()]
    if not docs:
        raise CalibrationError("The calibration text holds no text (only whitespace).")
    ids: list[int] = []
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for encoded in tokenizer(docs, add_special_tokens=False)["input_ids"]:
        ids.extend(encoded + sep)
    return torch.tensor(ids, dtype=torch.long)


def sample_windows(stream: torch.Tensor, n: int, length: int, seed: int, what: str, skip: int = 0) -> torch.Tensor:
    """N distinct, non-overlapping windows of `length` tokens, chosen at random (seeded). `skip`
    passes over the first windows of the seeded order: `skip=N` gives windows disjoint from the N
    that calibration drew (held-out text of the same source)."""
    available = stream.numel() // length
    if available < skip + n:
        raise CalibrationError(
            f"{what} holds {stream.numel():,} tokens = {available} sequences of {length} tokens, but {skip + n} were "
            f"asked for ({(skip + n) * length:,} tokens). Give more text, or lower --calib-samples / --calib-len."
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randperm(available, generator=gen)[skip:skip + n].sort().values * length
    return torch.stack([stream[s:s + length] for s in starts.tolist()])


def from_text_file(tokenizer, path, n: int, length: int, seed: int = 0) -> torch.Tensor:
    text = read_text(path, "Calibration file")
    return sample_windows(tokenize_stream(tokenizer, text), n, length, seed, f"Calibration file {path}")


def from_dataset(tokenizer, spec: str, n: int, length: int, seed: int = 0, text_field: str = "text") -> torch.Tensor:
    """`spec` is `ID[:CONFIG[:SPLIT]]` for `datasets.load_dataset` (needs network or a local cache)."""
    try:
        from datasets import load_dataset
    except ImportError:
        raise CalibrationError(f"Calibration from hf:{spec} needs the `datasets` package: pip install datasets, "
                               "or give a text file (--calib FILE).") from None
    name, config, split = (spec.split(":") + [None, None])[:3]
    try:
        data = load_dataset(name, config or None, split=split or "train")
    except (OSError, ValueError) as e:  # unreachable hub, unknown id, config or split: datasets' own words
        raise CalibrationError(f"Cannot load the dataset hf:{spec}: {cause(e)} Check the ID[:CONFIG[:SPLIT]], or give "
                               "a text file (--calib FILE).") from None
    if text_field not in data.column_names:
        raise CalibrationError(f"Dataset {spec} has no column {text_field!r}; its columns are {data.column_names}.")
    text = "\n\n".join(t for t in data[text_field] if t and t.strip())
    if not text:
        raise CalibrationError(f"Dataset {spec} holds no text in its column {text_field!r}.")
    return sample_windows(tokenize_stream(tokenizer, text), n, length, seed, f"Dataset {spec}")


@torch.no_grad()
def from_model(model, tokenizer, n: int, length: int, seed: int = 0) -> torch.Tensor:
    """Sequences sampled from the model itself (temperature 1, from BOS): no data download at all.

    All N sequences decode together through the runtime's static KV cache, so each step is one
    batched forward: several times faster than a generic generate loop on a CPU. The runtime runs
    in its default dtype (bf16 where the matrix units make that fast, as `subfit generate` does),
    which samples from the model as deployed, three times faster than float32 on an AMX CPU."""
    from subfit.runtime import Runtime
    from subfit.runtime.model import default_dtype

    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise CalibrationError("Sampling calibration text from the model needs a BOS or EOS token to start from, "
                               "and this tokenizer has neither. Pass calibration text instead (--calib FILE).")
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    dtype = default_dtype(next(model.parameters()).device)
    cache_bytes = (2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * length
                   * dtype.itemsize)
    rows = max(1, min(n, SAMPLING_CACHE_BYTES // cache_bytes))
    runtime = Runtime.from_hf(model, None, tokenizer, max_seq_len=length, batch_size=rows, dtype=dtype)
    sequences = []
    for chunk, first in enumerate(range(0, n, rows)):
        count = min(rows, n - first)
        sampled = runtime.generate([[start]] * count, max_new_tokens=length - 1, temperature=1.0, eos=[],
                                   seed=1_000_003 * seed + chunk)
        sequences += [[start] + ids for ids in sampled.ids]
    return torch.tensor(sequences, dtype=torch.long)


def load_calibration(source: str | None, model, tokenizer, n: int, length: int, seed: int = 0) -> torch.Tensor:
    """Dispatch on the source: None/'self' (sampled from the model), `hf:ID[:CONFIG[:SPLIT]]`, or a file."""
    if n < 1 or length < 2:
        raise CalibrationError(f"Calibration needs at least 1 sequence of at least 2 tokens; got {n} x {length}.")
    check_positions(max_positions(model.config), length, f"calib_len={length} (--calib-len)")
    if source is None or source == SELF:
        return from_model(model, tokenizer, n, length, seed)
    if source.startswith("hf:"):
        return from_dataset(tokenizer, source[3:], n, length, seed)
    return from_text_file(tokenizer, source, n, length, seed)


def describe(source: str | None, ids: torch.Tensor, seed: int) -> dict:
    return {"source": source or SELF, "samples": ids.shape[0], "length": ids.shape[1], "seed": seed}
