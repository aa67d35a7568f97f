"""lm-evaluation-harness model `subfit`: any lm-eval task on a plan (or a dense model), numbers
comparable with `--model hf`.

    python -m subfit.harness --model subfit --model_args plan=plans/smollm2-25 --tasks piqa arc_easy
    python -m subfit.harness --model subfit --model_args plan=plans/smollm2-25 \\
        --tasks piqa_local --include_path bench/tasks            # offline: the local task files

`python -m subfit.harness` is lm-eval's own command line with `subfit` registered; lm-eval
releases that discover `lm_eval.models` entry points also take plain `lm_eval --model subfit`.
Model arguments: plan (a plan directory; none = the dense model), base (the base model's location
when the plan's has moved, or the dense model), device, dtype, batch_size, executor (`runtime`, the
fast path and the default on CUDA, or `reference`, the plain-PyTorch executor and the default on
CPU) and max_length.

Requests are tokenized, truncated, batched and scored as lm-eval's `hf` model does (so a plan's
numbers sit beside published ones); only the positions a continuation needs are projected to the
vocabulary.
"""
from __future__ import annotations

import os
import sys
from typing import Protocol

import torch
import torch.nn.functional as F

try:
    import lm_eval
    import lm_eval.models  # lm-eval's own models first: its registry loads them only while it is empty
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import (Collator, handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text,
                                      resolve_max_length)
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window, simple_parse_args_string
except ModuleNotFoundError as e:
    if not (e.name or "").startswith("lm_eval"):
        raise
    raise ModuleNotFoundError("lm-evaluation-harness is not installed; install subfit's evaluation extra: "
                              "pip install -e \".[eval]\"  (or: pip install \"lm-eval>=0.4.13,<0.5\")",
                              name=e.name) from e

from subfit import models
from subfit.devices import check_device, default_device
from subfit.evaluation import OUTCOMES, paired_difference
from subfit.plan import Plan
from subfit.reference import ReferenceModel
from subfit.runtime import Runtime, sample
from subfit.runtime.generate import parse_dtype

MODEL_ARGS = ("plan", "base", "device", "dtype", "batch_size", "executor", "max_length")
EXECUTORS = ("runtime", "reference")
MAX_LENGTH_CAP = 8192  # the runtime's static KV cache holds batch_size x max_length tokens
GEN_KWARGS = ("until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p")  # after lm-eval normalises them


class Executor(Protocol):
    """What the lm-eval model needs from an executor: logits at chosen positions of a batch, and
    prefill + decode steps for generation (float32 logits [B, V])."""

    def score(self, rows: list[list[int]], index: torch.Tensor) -> torch.Tensor: ...

    def prefill(self, rows: list[list[int]]) -> torch.Tensor: ...

    def decode_step(self, tokens: torch.Tensor) -> torch.Tensor: ...


def _right_padded(rows: list[list[int]], device: torch.device) -> torch.Tensor:
    batch = torch.zeros(len(rows), max(len(r) for r in rows), dtype=torch.long)
    for i, row in enumerate(rows):
        batch[i, : len(row)] = torch.tensor(row)
    return batch.to(device)


class ReferenceExecutor:
    """The plan's reference executor (plain PyTorch). It has no KV cache: each generated token
    recomputes the whole sequence, slow and obviously right; scoring is one forward per batch."""

    def __init__(self, model: ReferenceModel):
        self.model = model
        self.device = model.model.get_input_embeddings().weight.device
        self._rows: list[list[int]] = []

    @torch.inference_mode()
    def score(self, rows: list[list[int]], index: torch.Tensor) -> torch.Tensor:
        return self.model.logits_at(_right_padded(rows, self.device), index.to(self.device)).float()

    def prefill(self, rows: list[list[int]]) -> torch.Tensor:
        self._rows = [list(r) for r in rows]
        return self.score(self._rows, torch.tensor([[len(r) - 1] for r in self._rows]))[:, 0]

    def decode_step(self, tokens: torch.Tensor) -> torch.Tensor:
        for row, token in zip(self._rows, tokens.tolist()):
            row.append(token)
        return self.score(self._rows, torch.tensor([[len(r) - 1] for r in self._rows]))[:, 0]


class RuntimeExecutor:
    """The runtime (Triton kernels and CUDA graphs on CUDA). Scoring runs the runtime's own prefill
    and keeps the final hidden states it computes, so the cache and graph state stay the runtime's."""

    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self.prefill = runtime.prefill
        self.decode_step = runtime.decode_step

    @torch.inference_mode()
    def score(self, rows: list[list[int]], index: torch.Tensor) -> torch.Tensor:
        hidden: list[torch.Tensor] = []
        hook = self.runtime.model.register_forward_hook(lambda module, args, out: hidden.append(out))
        try:
            self.runtime.prefill(rows)
        finally:
            hook.remove()
        states = hidden[0]
        picked = states.gather(1, index.to(states.device)[..., None].expand(-1, -1, states.shape[-1]))
        return self.runtime.model.logits(picked)


def stop_token_ids(hf_model, tokenizer) -> list[int]:
    """Token ids that end a generation: the generation config's EOS ids (what `generate` stops at)
    and the tokenizer's EOS (which lm-eval adds to every task's stop sequences)."""
    ids = getattr(getattr(hf_model, "generation_config", None), "eos_token_id", None)
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def default_max_length(config) -> int:
    """lm-eval's `hf` rule (the model's context length), capped so a runtime cache stays small."""
    return min(resolve_max_length(config), MAX_LENGTH_CAP)


def default_executor(device: torch.device) -> str:
    """The runtime on CUDA (Triton kernels, CUDA graphs); the reference executor elsewhere."""
    return "runtime" if device.type == "cuda" else "reference"


def build_executor(kind: str, hf_model, plan: Plan | None, tokenizer, max_length: int) -> Executor:
    if kind == "runtime":
        return RuntimeExecutor(Runtime.from_hf(hf_model, plan, tokenizer, max_seq_len=max_length))
    if kind == "reference":
        return ReferenceExecutor(ReferenceModel(hf_model, plan))
    raise ValueError(f"executor={kind!r}: choose one of {', '.join(EXECUTORS)}.")


def load_base(plan: Plan | None, base: str | None, device: str | None, dtype: str | None):
    """(hf_model, tokenizer) of the plan's base model (or of `base`, dense), on `device`
    (default CUDA if available) in `dtype` (default bfloat16 on CUDA, float32 elsewhere: the
    reference executor computes in the weights' dtype, and a CPU's lm-eval `hf` runs float32)."""
    device = check_device(device or default_device())
    dtype = parse_dtype(dtype, device) if dtype is not None else torch.bfloat16 if device.type == "cuda" else torch.float32
    if plan is not None:
        hf_model, tokenizer, _ = models.load_base(plan.base, base, dtype=dtype, device=device)
    else:
        hf_model, tokenizer, _ = models.load(base, dtype=dtype, device=device)
    return hf_model, tokenizer


@register_model("subfit")
class SubfitLM(TemplateLM):
    """An lm-eval model over an `Executor`. lm-eval builds it from `--model_args` (`SubfitLM.load`);
    code that already holds a model builds it directly, e.g. to score a plan and its dense base
    from one loaded model."""

    def __init__(self, executor: Executor, tokenizer, *, stop_ids: list[int], max_length: int,
                 batch_size: int | str = 16):
        super().__init__()
        self.executor, self.tokenizer = executor, tokenizer
        self.stop_ids = stop_ids
        self._max_length, self._batch_size = max_length, _positive_int(batch_size)

    @classmethod
    def load(cls, plan: str | os.PathLike | None = None, base: str | None = None, device: str | None = None,
             dtype: str | None = None, batch_size: int | str = 16, executor: str | None = None,
             max_length: int | None = None) -> "SubfitLM":
        """Load a plan (or, without one, the dense model `base`; default the embedded SmolLM2)."""
        loaded_plan = Plan.load(plan) if plan is not None else None
        hf_model, tokenizer = load_base(loaded_plan, base, device, dtype)
        return cls.on(hf_model, tokenizer, loaded_plan, executor=executor, batch_size=batch_size,
                      max_length=max_length)

    @classmethod
    def on(cls, hf_model, tokenizer, plan: Plan | None, *, executor: str | None = None, batch_size: int | str = 16,
           max_length: int | None = None) -> "SubfitLM":
        """`plan` (None: dense) on a loaded base model, which several instances can share."""
        device = hf_model.get_input_embeddings().weight.device
        max_length = int(max_length) if max_length is not None else default_max_length(hf_model.config)
        return cls(build_executor(executor or default_executor(device), hf_model, plan, tokenizer, max_length),
                   tokenizer, stop_ids=stop_token_ids(hf_model, tokenizer), max_length=max_length,
                   batch_size=batch_size)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> "SubfitLM":
        """lm-eval's constructor hook. `--model_args` win over lm-eval's own flags (its
        `--batch_size` and `--device` always arrive: 1 and cuda:0 unless given)."""
        unknown = sorted(set(arg_dict) - set(MODEL_ARGS))
        if unknown:
            raise ValueError(f"Unknown subfit model_args {unknown}; subfit takes {', '.join(MODEL_ARGS)}.")
        flags = {k: v for k, v in (additional_config or {}).items() if v is not None and k in MODEL_ARGS}
        if str(flags.get("device", "")).startswith("cuda") and not torch.cuda.is_available():
            del flags["device"]  # lm-eval's default --device is cuda:0; its hf model falls back the same way
        return cls.load(**{**flags, **arg_dict})

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "SubfitLM":
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    # lm-eval's model interface ------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """Context of an empty-context request and of the first rolling window (BOS, else EOS)."""
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return 256

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        """The tokenizer's own special tokens (BOS), unless the text already starts with BOS."""
        if add_special_tokens is None:
            bos = self.tokenizer.bos_token
            add_special_tokens = not (bos and string.startswith(bos))
        ids = self.tokenizer.encode(string, add_special_tokens=add_special_tokens)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(summed log-likelihood of the continuation, whether it is the greedy continuation) per
        (strings, context ids, continuation ids), longest first in batches; requests sharing all
        but the last continuation token share one row, as in lm-eval's `hf` model."""
        collator = Collator(requests, sort_fn=lambda r: (-len(r[1] + r[2]), tuple(r[1] + r[2])),
                            group_by="contexts", group_fn=lambda r: r[1] + r[2][:-1])
        longest = max((len(cont) for _, _, cont in requests), default=0)
        if longest > self.max_length:
            raise ValueError(f"A continuation of {longest} tokens does not fit max_length={self.max_length}; "
                             "raise max_length in --model_args.")
        results = []
        for chunk in collator.get_batched(n=self.batch_size):
            # The model sees context + continuation minus its last token, left-truncated to max_length.
            rows = [(ctx + cont)[-(self.max_length + 1):][:-1] for _, ctx, cont in chunk]
            width = max(len(cont) for _, _, cont in chunk)
            index = torch.stack([torch.arange(len(row) - width, len(row)).clamp_min(0) for row in rows])
            logp = F.log_softmax(self.executor.score(rows, index), dim=-1)
            for (strings, ctx, cont), row_logp in zip(chunk, logp):
                # One row answers every request of its group (their continuations end its positions).
                for req_strings, req_cont, scored in collator.get_cache(
                        req_str=strings, cxt_toks=ctx, cont_toks=cont, logits=row_logp[width - len(cont):][None]):
                    target = torch.tensor(req_cont, device=scored.device)[None]
                    tail = scored[:, -len(req_cont):]
                    answer = (float(tail.gather(2, target[..., None]).sum()), bool((tail.argmax(-1) == target).all()))
                    results.append(answer)
                    if req_strings is not None:
                        self.cache_hook.add_partial("loglikelihood", req_strings, answer)
        return collator.get_original(results)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts in disjoint windows of max_length tokens, each window
        conditioned on the token before it (the first on the prefix token), as lm-eval's `hf` does."""
        windows, owners = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            for context, target in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, target))
                owners.append(i)
        totals = [0.0] * len(requests)
        for owner, (loglikelihood, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm=True)):
            totals[owner] += loglikelihood
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Generate per request until a stop sequence, an EOS token or max_gen_toks (prompts left-truncated
        to leave room), batched by equal generation settings, longest prompt first."""
        collator = Collator([req.args for req in requests], sort_fn=lambda r: (-len(self.tok_encode(r[0])), r[0]),
                            group_by="gen_kwargs", group_fn=lambda r: r[1])
        eos_text = self.tokenizer.decode([self.eot_token_id]) if self.eot_token_id is not None else None
        results = []
        for chunk in collator.get_batched(n=self.batch_size):
            contexts, settings = zip(*chunk)
            kwargs = normalize_gen_kwargs(settings[0], self.max_gen_toks)
            unsupported = sorted(set(kwargs) - set(GEN_KWARGS))
            if unsupported:
                raise ValueError(f"Generation settings {unsupported} are not supported by subfit; it takes "
                                 f"{', '.join(GEN_KWARGS)} (and lm-eval's aliases of max_gen_toks).")
            until = handle_stop_sequences(kwargs["until"], eos=eos_text)
            max_new = kwargs["max_gen_toks"]
            if max_new >= self.max_length:
                raise ValueError(f"max_gen_toks={max_new} leaves no room for a prompt in max_length={self.max_length}.")
            rows = [self.tok_encode(c, left_truncate_len=self.max_length - max_new) for c in contexts]
            temperature = kwargs["temperature"] if kwargs["do_sample"] else 0.0
            for context, new in zip(contexts, self._generate(rows, max_new, until, temperature, kwargs.get("top_k"),
                                                             kwargs.get("top_p"))):
                text = postprocess_generated_text(self.tok_decode(new), stop=until, think_end_token=None)
                results.append(text)
                self.cache_hook.add_partial("generate_until", (context, settings[0]), text)
        return collator.get_original(results)

    def _generate(self, rows: list[list[int]], max_new: int, until: list[str], temperature: float,
                  top_k: int | None, top_p: float | None) -> list[list[int]]:
        """New tokens per row, stopping a row at a stop token or once its text holds a stop sequence."""
        new: list[list[int]] = [[] for _ in rows]
        done = [False] * len(rows)
        logits = self.executor.prefill(rows)
        for step in range(max_new):
            tokens = sample(logits, temperature, top_k, top_p)
            for b, token in enumerate(tokens.tolist()):
                if done[b]:
                    continue
                if token in self.stop_ids:
                    done[b] = True
                    continue
                new[b].append(token)
                text = self.tok_decode(new[b])
                done[b] = any(stop and stop in text for stop in until)
            if all(done) or step == max_new - 1:
                return new
            logits = self.executor.decode_step(tokens)
        return new


def _positive_int(value: int | str) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number < 1:
        raise ValueError(f"batch_size={value!r}: give a positive number of sequences per forward "
                         "(lm-eval's 'auto' is not supported).")
    return number


# subfit eval --tasks ------------------------------------------------------------------------------
def task_report(results: dict, task: str, samples: list[dict] | None) -> dict:
    """One task of an lm-eval result as `subfit eval` reports tasks: each metric and its standard
    error (filter suffix ',none' dropped), the example count, and per-example outcomes of acc and
    acc_norm for paired comparisons (in document order)."""
    report: dict = {}
    for key, value in results["results"][task].items():
        name, _, filtered = key.partition(",")
        if not filtered:  # "alias", "sample_len": not metrics
            continue
        if not isinstance(value, (int, float)):
            if name.endswith("_stderr"):  # lm-eval writes "N/A" where it has no error estimate
                report[name if filtered == "none" else key] = float("nan")
            continue
        report[name if filtered == "none" else key] = float(value)
    report["n"] = int(results.get("n-samples", {}).get(task, {}).get("effective", len(samples or [])))
    if samples:
        ordered = sorted(samples, key=lambda s: s["doc_id"])
        for metric, outcomes in OUTCOMES.items():
            if metric in ordered[0]:
                report[outcomes] = [int(s[metric]) for s in ordered]
    return report


def task_manager(tasks: list[str], include_path: str | os.PathLike | None):
    """lm-eval's task index: `include_path` alone when it holds every task asked for (indexing
    lm-eval's own thousands of task files takes seconds), else lm-eval's tasks too. A task neither
    holds is refused here, before any model loads."""
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        if not os.path.isdir(include_path):
            raise FileNotFoundError(f"--include-path {include_path} is not a folder; give the folder of task YAMLs, "
                                    "e.g. bench/tasks.")
        local = TaskManager(include_path=str(include_path), include_defaults=False)
        if all(task in local.all_tasks for task in tasks):
            return local
    index = TaskManager(include_path=str(include_path) if include_path is not None else None)
    unknown = [task for task in tasks if task not in index.all_tasks]
    if unknown:
        hint = "" if include_path is not None else "; the offline copies of the development tasks " \
            "(piqa_local, arc_easy_local, ...) need --include-path bench/tasks"
        raise ValueError(f"Unknown lm-eval task(s) {', '.join(unknown)}; see `python -m subfit.harness --tasks list` "
                         f"for the names{hint}.")
    return index


def score_tasks(hf_model, tokenizer, plan: Plan | None, tasks: list[str], *, limit: int | None = None,
                num_fewshot: int | None = None, task_index=None, batch_size: int = 16,
                executor: str | None = None) -> dict:
    """lm-eval `tasks` on a loaded base model with `plan` applied (None: dense), as `subfit eval`
    reports tasks: {task: metrics, standard errors, n and per-example outcomes}."""
    lm = SubfitLM.on(hf_model, tokenizer, plan, executor=executor, batch_size=batch_size)
    results = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                                      task_manager=task_index or task_manager(tasks, None), log_samples=True)
    return {task: task_report(results, task, results["samples"].get(task)) for task in results["results"]}


def paired_differences(plan_tasks: dict, dense_tasks: dict) -> dict:
    """{task: {metric: {"diff", "stderr"}}}: the plan's acc and acc_norm minus the dense model's on
    the same examples, with the standard error of the per-example differences."""
    paired: dict = {}
    for task, result in plan_tasks.items():
        paired[task] = {}
        for metric, outcomes in OUTCOMES.items():
            if outcomes in result and outcomes in dense_tasks.get(task, {}):
                diff, stderr = paired_difference(result, dense_tasks[task], metric)
                paired[task][metric] = {"diff": diff, "stderr": stderr}
    return paired


def main() -> None:
    """lm-eval's command line with the `subfit` model registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    sys.exit(main())
