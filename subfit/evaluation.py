"""Evaluation: perplexity, zero-shot multiple choice (lm-evaluation-harness semantics), and
agreement of next-token distributions with the dense model.

Every metric takes a `LogitsFn` (`input_ids [B, T] -> logits [B, T, V]`, right padding allowed),
so the dense model, a plan's reference executor and the runtime are scored by one code path.
"""
from __future__ import annotations

import json
import math
import numbers
import os
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from subfit.calibration import read_text
from subfit.models import check_positions

LogitsFn = Callable[[torch.Tensor], torch.Tensor]
DEFAULT_WINDOW = 1024  # perplexity window in tokens, when the model takes that many
MAX_CONTEXT = 2048  # tokens of a multiple-choice context and continuation, as lm-eval's default max_length
TASK_FORMATS = ("query/choices/gold", "context_options/continuation/gold", "context/continuation")


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


def check_inputs(*, ppl: str | os.PathLike | None = None, tasks: Sequence[str | os.PathLike] = (),
                 limit: int | None = None, window: int | None = None, stride: int | None = None,
                 max_tokens: int | None = None, batch_size: int = 16,
                 max_positions: int | None = None) -> tuple[str | None, dict[str, list[dict]]]:
    """Check every evaluation setting and input file, before any work: `evaluate` calls it, and
    `subfit eval` before it loads the model. Returns the perplexity text and each task's examples."""
    check_perplexity_window(window, stride, max_positions)
    if isinstance(tasks, (str, os.PathLike)):
        raise ValueError(f"tasks={str(tasks)!r} is one path; give a list of task files, e.g. tasks=[{str(tasks)!r}].")
    _check_count("max_tokens", max_tokens, 2, optional=True, why="None: the whole text")
    _check_count("batch_size", batch_size)
    _check_count("limit", limit, optional=True, why="None: every example")
    text = read_text(ppl, "Perplexity text") if ppl is not None else None
    docs: dict[str, list[dict]] = {}
    for path in tasks:
        name = Path(path).stem
        if name in docs:
            raise ValueError(f"Two task files are named {name!r}; their results would share one entry of the "
                             "report. Rename one of them.")
        docs[name] = load_task(path, limit)
    return text, docs


def load_task(path: str | os.PathLike, limit: int | None = None) -> list[dict]:
    """The first `limit` examples of a JSONL task file, each checked by `requests_for`; a bad line
    is refused naming the file and the line."""
    _check_count("limit", limit, optional=True, why="None: every example")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Task file {path} {'is a folder' if path.is_dir() else 'does not exist'}; give a "
                                ".jsonl file.")
    docs = []
    for line_no, raw in enumerate(path.read_bytes().splitlines(), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}:{line_no} is not UTF-8 text (byte {e.start}); task files are UTF-8 JSON "
                             "lines.") from e
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as e:
            raise ValueError(f"{path}:{line_no} is not valid JSON ({e}).") from e
        try:
            requests_for(doc)
        except ValueError as e:
            raise ValueError(f"{path}:{line_no}: {e}") from e
        docs.append(doc)
        if limit is not None and len(docs) >= limit:
            break
    if not docs:
        raise ValueError(f"Task file {path} holds no examples.")
    return docs


def _check_gold(doc: dict, options: str) -> int:
    gold, count = doc["gold"], len(doc[options])
    if not _is_int(gold) or not 0 <= gold < count:
        raise ValueError(f"gold is {gold!r}; expected the index of the right entry of {options!r}, an integer "
                         f"from 0 to {count - 1}.")
    return int(gold)


def _check_fields(doc: dict, required: dict[str, str]) -> None:
    """`required`: field -> "text" (a string) or "texts" (a non-empty list of strings) or "index"."""
    missing = [k for k in required if k not in doc]
    if missing:
        raise ValueError(f"the example lacks {', '.join(repr(k) for k in missing)}; the "
                         f"{'/'.join(required)} format needs every one of them.")
    for name, kind in required.items():
        value = doc[name]
        if kind == "text" and not isinstance(value, str):
            raise ValueError(f"{name} is {value!r:.60}; expected a string.")
        if kind == "texts" and not (isinstance(value, list) and value and all(isinstance(v, str) for v in value)):
            raise ValueError(f"{name} is {value!r:.60}; expected a non-empty list of strings.")


def requests_for(doc: dict) -> tuple[list[tuple[str, str]], int | None, str]:
    """(context, continuation) pairs, the gold index and the kind, as lm-evaluation-harness builds
    them: `Question: ...\nAnswer:` + ` choice`; WinoGrande partial scoring (the options change the
    context, the shared continuation is scored); LAMBADA's last word (accuracy = greedy match).
    An example with missing or mistyped fields, or a gold index out of range, is refused."""
    if not isinstance(doc, dict):
        raise ValueError(f"an example is {doc!r:.60}; expected a JSON object in one of the formats {TASK_FORMATS}.")
    if "choices" in doc:
        _check_fields(doc, {"query": "text", "choices": "texts", "gold": "index"})
        query = doc["query"].rstrip()
        context = query if query.endswith("Answer:") else query + "\nAnswer:"
        return [(context, " " + c) for c in doc["choices"]], _check_gold(doc, "choices"), "choice"
    if "context_options" in doc:
        _check_fields(doc, {"context_options": "texts", "continuation": "text", "gold": "index"})
        return ([(c, " " + doc["continuation"]) for c in doc["context_options"]], _check_gold(doc, "context_options"),
                "partial")
    if "context" in doc and "continuation" in doc:
        _check_fields(doc, {"context": "text", "continuation": "text"})
        if not doc["continuation"].strip():
            raise ValueError("continuation is empty; expected the word(s) to predict.")
        return [(doc["context"], " " + doc["continuation"].strip())], None, "greedy"
    raise ValueError(f"Unknown task format with keys {sorted(doc)}; expected one of {TASK_FORMATS}.")


def _encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], int]:
    """Tokens of context + continuation and how many belong to the continuation (lm-eval encodes
    the whole string and splits it, so merges across the boundary count as continuation)."""
    whole = tokenizer(context + continuation)["input_ids"]
    ctx = tokenizer(context)["input_ids"]
    n_cont = max(len(whole) - len(ctx), 1)
    return whole, n_cont


@torch.no_grad()
def loglikelihoods(logits_fn: LogitsFn, tokenizer, pairs: list[tuple[str, str]], batch_size: int = 16,
                   max_len: int | None = None, progress: bool = True) -> list[tuple[float, bool]]:
    """(summed log-likelihood of the continuation, whether it is the greedy continuation). Contexts
    are cut from the left to `max_len` tokens: by default 2048, or the model's positions if fewer."""
    if max_len is None:
        max_len = min(MAX_CONTEXT, getattr(logits_fn, "max_positions", None) or MAX_CONTEXT)
    encoded = [_encode_pair(tokenizer, c, x) for c, x in pairs]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
    results: list[tuple[float, bool]] = [(0.0, False)] * len(encoded)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for first in tqdm(range(0, len(order), batch_size), desc="choices", disable=not progress, leave=False):
        idx = order[first:first + batch_size]
        seqs = [encoded[i][0][-max_len:] for i in idx]
        width = max(len(s) for s in seqs)
        batch = torch.full((len(seqs), width), pad, dtype=torch.long)
        for row, s in enumerate(seqs):
            batch[row, :len(s)] = torch.tensor(s)
        # Positions that predict each row's continuation, right-aligned in a [rows, K] index.
        n_conts = [min(encoded[i][1], len(s) - 1) for i, s in zip(idx, seqs)]
        k = max(n_conts)
        index = torch.stack([torch.arange(len(s) - k - 1, len(s) - 1).clamp_min(0) for s in seqs])
        if hasattr(logits_fn, "logits_at"):  # fast path: project only the positions scored
            logits = logits_fn.logits_at(batch, index)
        else:
            full = logits_fn(batch)
            logits = full.gather(1, index[..., None].expand(-1, -1, full.shape[-1]))
        logp = F.log_softmax(logits.float(), -1)
        for row, i in enumerate(idx):
            n, n_cont = len(seqs[row]), n_conts[row]
            targets = batch[row, n - n_cont:n]
            pred = logp[row, k - n_cont:]
            results[i] = (float(pred.gather(-1, targets[:, None]).sum()), bool((pred.argmax(-1) == targets).all()))
    return results


def choice_outcomes(logits_fn: LogitsFn, tokenizer, docs: list[dict], batch_size: int = 16,
                    progress: bool = True) -> tuple[list[int], list[int]]:
    """Per example, 1 if right: by summed log-likelihood (acc) and by log-likelihood per
    character of the continuation (acc_norm), like lm-eval; greedy tasks score both alike."""
    built = [requests_for(d) for d in docs]
    pairs = [p for reqs, _, _ in built for p in reqs]
    scores = loglikelihoods(logits_fn, tokenizer, pairs, batch_size, progress=progress)
    acc, acc_norm = [], []
    cursor = 0
    for reqs, gold, kind in built:
        chunk = scores[cursor:cursor + len(reqs)]
        cursor += len(reqs)
        if kind == "greedy":
            acc.append(int(chunk[0][1]))
            acc_norm.append(int(chunk[0][1]))
            continue
        lls = [s for s, _ in chunk]
        acc.append(int(max(range(len(lls)), key=lls.__getitem__) == gold))
        normed = [ll / max(len(cont), 1) for ll, (_, cont) in zip(lls, reqs)]
        acc_norm.append(int(max(range(len(normed)), key=normed.__getitem__) == gold))
    return acc, acc_norm


def _mean_stderr(values: list[float]) -> tuple[float, float]:
    """Mean and its standard error (sample standard deviation / sqrt(n), as lm-eval reports)."""
    x = torch.tensor(values, dtype=torch.float64)
    return float(x.mean()), float(x.std() / math.sqrt(len(values))) if len(values) > 1 else float("nan")


def multiple_choice(logits_fn: LogitsFn, tokenizer, task: str | os.PathLike | list[dict], limit: int | None = None,
                    batch_size: int = 16, progress: bool = True) -> dict:
    """acc and acc_norm with their standard errors, and the per-example outcomes that a paired
    comparison of two models on the same examples needs (`paired_difference`). `task` is a task
    file, or its examples as `load_task` returns them."""
    docs = task if isinstance(task, list) else load_task(task, limit)
    acc, acc_norm = choice_outcomes(logits_fn, tokenizer, docs, batch_size, progress)
    (a, a_se), (an, an_se) = _mean_stderr(acc), _mean_stderr(acc_norm)
    return {"acc": a, "acc_stderr": a_se, "acc_norm": an, "acc_norm_stderr": an_se, "n": len(acc),
            "correct": acc, "correct_norm": acc_norm}


def paired_difference(model: dict, other: dict, metric: str = "acc") -> tuple[float, float]:
    """Accuracy of `model` minus `other` on the same examples, and the standard error of that
    difference from the per-example differences: far smaller than the two accuracies' own errors
    when both models get most examples alike, which is what separates close methods."""
    keys = {"acc": "correct", "acc_norm": "correct_norm"}
    if metric not in keys:
        raise ValueError(f"metric={metric!r}: choose 'acc' or 'acc_norm'.")
    if keys[metric] not in model or keys[metric] not in other:
        raise ValueError("A task result has no per-example outcomes (made by an older subfit): evaluate it again.")
    a, b = model[keys[metric]], other[keys[metric]]
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
    ppl: str | os.PathLike | None = None,
    tasks: list[str | os.PathLike] = (),
    limit: int | None = None,
    window: int | None = None,
    stride: int | None = None,
    max_tokens: int | None = None,
    dense_fn: LogitsFn | None = None,
    batch_size: int = 16,
    progress: bool = True,
) -> dict:
    """Perplexity on a text file (and agreement with `dense_fn`), and accuracy on task files. Every
    setting and every input file is checked before any work (`check_inputs`), the window against
    the model's positions too when `logits_fn` knows them (`ReferenceModel.max_positions`)."""
    text, docs = check_inputs(ppl=ppl, tasks=tasks, limit=limit, window=window, stride=stride,
                              max_tokens=max_tokens, batch_size=batch_size,
                              max_positions=getattr(logits_fn, "max_positions", None))
    report: dict = {}
    if text is not None:
        ids = text_tokens(tokenizer, text, max_tokens)
        report["perplexity"] = {"file": str(ppl), **perplexity(logits_fn, ids, window=window, stride=stride,
                                                                dense_fn=dense_fn, progress=progress)}
    for name, examples in docs.items():
        report.setdefault("tasks", {})[name] = multiple_choice(logits_fn, tokenizer, examples, batch_size=batch_size,
                                                               progress=progress)
    return report
