"""Evaluation: perplexity on a text file and agreement of next-token distributions with the dense
model, plus the paired statistics that compare two models on the same windows or examples.

Every metric takes a `LogitsFn` (`input_ids [B, T] -> logits [B, T, V]`), so the dense model, a
plan's reference executor and the runtime are scored by one code path. Tasks (multiple choice,
generation, few-shot) are lm-evaluation-harness's job: `subfit.harness`.
"""
from __future__ import annotations

import math
import numbers
import os
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from subfit.calibration import read_text
from subfit.models import check_positions

LogitsFn = Callable[[torch.Tensor], torch.Tensor]
DEFAULT_WINDOW = 1024  # perplexity window in tokens, when the model takes that many
OUTCOMES = {"acc": "correct", "acc_norm": "correct_norm"}  # metric -> its per-example outcomes in a task report


def text_tokens(tokenizer, text: str, max_tokens: int | None = None) -> torch.Tensor:
    """The whole text as one stream (the tokenizer's own BOS handling), cut to `max_tokens`."""
    ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
    return ids[:max_tokens] if max_tokens else ids


def _windows(n_tokens: int, window: int, stride: int):
    """(begin, end, first) of rolling windows as in the Hugging Face perplexity recipe: windows
    start every `stride` tokens, and in each only the tokens not scored before count (logits from
    index `first` on), so overlapping windows give later tokens extra context. With stride =
    window, a window's first token has no context and is not scored, as in that recipe."""
    scored_until, start = 0, 0
    while scored_until < n_tokens:
        end = min(start + window, n_tokens)
        begin = max(0, end - window)  # a short last window reaches back for context
        yield begin, end, max(scored_until - begin, 1) - 1
        scored_until, start = end, start + stride


@torch.no_grad()
def mean_token_loss(logits_fn: LogitsFn, windows: torch.Tensor, batch_size: int = 4) -> float:
    """Mean next-token cross-entropy (nats) over equal-length token windows [N, L]: the loss of a
    model on held-out calibration windows, where the perplexity recipe's single stream does not apply."""
    if windows.ndim != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be [N, L] token ids with L >= 2, got shape {tuple(windows.shape)}.")
    total = 0.0
    for batch in windows.split(batch_size):
        logits = logits_fn(batch)[:, :-1].float()
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"))
    return total / (windows.shape[0] * (windows.shape[1] - 1))


@torch.no_grad()
def perplexity(
    logits_fn: LogitsFn,
    ids: torch.Tensor,
    *,
    window: int | None = None,
    stride: int | None = None,
    dense_fn: LogitsFn | None = None,
    progress: bool = True,
) -> dict:
    """Perplexity of a token stream; with `dense_fn`, also KL(dense || model) and top-1 agreement.
    Each window's summed NLL is kept, so two models scored on the same stream can be compared
    window by window (`perplexity_ratio`). `window` defaults to `DEFAULT_WINDOW`, or the model's
    positions if fewer."""
    window = check_perplexity_window(window, stride, getattr(logits_fn, "max_positions", None))
    stride = window if stride is None else stride
    if ids.numel() < 2:
        raise ValueError("The text has fewer than 2 tokens: nothing to score; give a longer text.")
    window_nll, window_tokens, kl, agree = [], [], 0.0, 0
    spans = list(_windows(ids.numel(), window, stride))
    for start, end, first in tqdm(spans, desc="perplexity", disable=not progress, leave=False):
        chunk = ids[start:end][None]
        logits = logits_fn(chunk)[0, first:-1].float()
        targets = chunk[0, first + 1:]
        logp = F.log_softmax(logits, -1)
        window_nll.append(-float(logp.gather(-1, targets[:, None]).sum()))
        window_tokens.append(targets.numel())
        if dense_fn is not None:
            dense_logp = F.log_softmax(dense_fn(chunk)[0, first:-1].float(), -1)
            kl += float((dense_logp.exp() * (dense_logp - logp)).sum())
            agree += int((dense_logp.argmax(-1) == logp.argmax(-1)).sum())
    count = sum(window_tokens)
    result = {"ppl": math.exp(sum(window_nll) / count), "tokens": count, "window": window, "stride": stride,
              "window_nll": window_nll, "window_tokens": window_tokens}
    if dense_fn is not None:
        result.update(kl=kl / count, top1_agreement=agree / count)
    return result


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_count(name: str, value, minimum: int = 1, *, optional: bool = False, why: str = "") -> None:
    """Refuse an evaluation setting that is not an integer >= `minimum` (or None, when `optional`)."""
    if (value is None and optional) or (_is_int(value) and value >= minimum):
        return
    raise ValueError(f"{name}={value!r}: expected an integer >= {minimum}{' or None' if optional else ''}"
                     f"{f' ({why})' if why else ''}.")


def check_perplexity_window(window: int | None, stride: int | None, max_positions: int | None = None) -> int:
    """The window to score with: as given, or `DEFAULT_WINDOW` tokens or the model's positions
    if fewer (a default is never refused); refuse windows that would score nothing, skip tokens,
    or run past the model's positions."""
    if window is None:
        window = min(DEFAULT_WINDOW, max_positions or DEFAULT_WINDOW)
    _check_count("window", window, 2, why="a window needs a token and a next token to score")
    _check_count("stride", stride, 1, optional=True, why="None: the window")
    if stride is not None and stride > window:
        raise ValueError(f"stride={stride} is larger than window={window}: tokens between windows would never be "
                         "scored. Give a stride of at most the window.")
    check_positions(max_positions, window, f"window={window} (--window)")
    return window


def check_inputs(*, ppl: str | os.PathLike | None = None, window: int | None = None, stride: int | None = None,
                 max_tokens: int | None = None, max_positions: int | None = None) -> str | None:
    """Check every perplexity setting and the text file, before any work: `evaluate` calls it, and
    `subfit eval` before it loads the model. Returns the text."""
    check_perplexity_window(window, stride, max_positions)
    _check_count("max_tokens", max_tokens, 2, optional=True, why="None: the whole text")
    return read_text(ppl, "Perplexity text") if ppl is not None else None


def _mean_stderr(values: list[float]) -> tuple[float, float]:
    """Mean and its standard error (sample standard deviation / sqrt(n), as lm-eval reports)."""
    x = torch.tensor(values, dtype=torch.float64)
    return float(x.mean()), float(x.std() / math.sqrt(len(values))) if len(values) > 1 else float("nan")


def paired_difference(model: dict, other: dict, metric: str = "acc") -> tuple[float, float]:
    """Accuracy of `model` minus `other` on the same examples, and the standard error of that
    difference from the per-example differences: far smaller than the two accuracies' own errors
    when both models get most examples alike, which is what separates close methods."""
    if metric not in OUTCOMES:
        raise ValueError(f"metric={metric!r}: choose 'acc' or 'acc_norm'.")
    if OUTCOMES[metric] not in model or OUTCOMES[metric] not in other:
        raise ValueError("A task result has no per-example outcomes (made by an older subfit): evaluate it again.")
    a, b = model[OUTCOMES[metric]], other[OUTCOMES[metric]]
    if len(a) != len(b):
        raise ValueError(f"Paired comparison needs the same examples: {len(a)} outcomes against {len(b)}.")
    return _mean_stderr([x - y for x, y in zip(a, b)])


def perplexity_ratio(model: dict, other: dict) -> tuple[float, float]:
    """Perplexity of `model` over `other` on the same windows, and the standard error of its log
    from the windows' per-token NLL differences (windows as the independent units)."""
    if "window_nll" not in model or "window_nll" not in other:
        raise ValueError("A perplexity result has no per-window losses (made by an older subfit): evaluate it again.")
    if model["window_tokens"] != other["window_tokens"]:
        raise ValueError("Perplexity ratio needs the same text and windows for both models.")
    n = torch.tensor(model["window_tokens"], dtype=torch.float64)
    d = torch.tensor(model["window_nll"], dtype=torch.float64) - torch.tensor(other["window_nll"], dtype=torch.float64)
    log_ratio = float(d.sum() / n.sum())
    w = len(n)
    if w < 2:
        return math.exp(log_ratio), float("nan")
    residual = d - log_ratio * n
    stderr = float(torch.sqrt((residual ** 2).sum() * w / (w - 1)) / n.sum())
    return math.exp(log_ratio), stderr


def evaluate(
    logits_fn: LogitsFn,
    tokenizer,
    *,
    ppl: str | os.PathLike,
    window: int | None = None,
    stride: int | None = None,
    max_tokens: int | None = None,
    dense_fn: LogitsFn | None = None,
    progress: bool = True,
) -> dict:
    """Perplexity on a text file, and agreement with `dense_fn`. Every setting and the file are
    checked before any work (`check_inputs`), the window against the model's positions too when
    `logits_fn` knows them (`ReferenceModel.max_positions`)."""
    text = check_inputs(ppl=ppl, window=window, stride=stride, max_tokens=max_tokens,
                        max_positions=getattr(logits_fn, "max_positions", None))
    if text is None:
        raise ValueError("ppl=None: give a text file to score.")
    ids = text_tokens(tokenizer, text, max_tokens)
    return {"perplexity": {"file": str(ppl), **perplexity(logits_fn, ids, window=window, stride=stride,
                                                          dense_fn=dense_fn, progress=progress)}}
