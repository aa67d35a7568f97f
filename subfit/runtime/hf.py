"""Drop-in for code that calls a Hugging Face model's `generate`: switching is one line,

    model = subfit.runtime.load("plans/smollm2-25").as_hf()   # was AutoModelForCausalLM.from_pretrained(...)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=50, do_sample=False)
"""
from __future__ import annotations

import torch

SUPPORTED = ("input_ids", "attention_mask", "max_new_tokens", "do_sample", "temperature", "top_k", "top_p",
             "eos_token_id", "pad_token_id", "use_cache")


class HFGenerate:
    """The subset of `transformers.GenerationMixin.generate` that existing code uses, on a `Runtime`."""

    def __init__(self, runtime):
        self.runtime = runtime
        self.config = runtime.model.config
        self.device = runtime.device

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, max_new_tokens: int = 20,
                 do_sample: bool = False, temperature: float = 1.0, top_k: int | None = 50, top_p: float = 1.0,
                 eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
                 use_cache: bool = True, **unsupported) -> torch.Tensor:
        """Like Hugging Face: returns [B, prompt + new] ids, the prompt as given (left padding kept), sequences
        that stopped early padded with `pad_token_id` (default: the first EOS id). `use_cache` is always on."""
        if unsupported:
            raise TypeError(f"generate() got unsupported arguments {sorted(unsupported)}; the subfit runtime "
                            f"supports {', '.join(SUPPORTED)}.")
        ids = input_ids if input_ids.dim() == 2 else input_ids[None]
        mask = torch.ones_like(ids) if attention_mask is None else attention_mask.view_as(ids)
        rows = [row[keep.bool()].tolist() for row, keep in zip(ids.cpu(), mask.cpu())]
        eos = self.runtime.eos if eos_token_id is None else ([eos_token_id] if isinstance(eos_token_id, int)
                                                             else list(eos_token_id))
        if pad_token_id is None:
            pad_token_id = eos[0] if eos else 0
        out = self.runtime.generate(rows, max_new_tokens, temperature=temperature if do_sample else 0.0,
                                    top_k=top_k, top_p=top_p, eos=eos)
        width = max(len(new) for new in out.ids)
        new = torch.full((len(rows), width), pad_token_id, dtype=ids.dtype)
        for b, tokens in enumerate(out.ids):
            new[b, : len(tokens)] = torch.tensor(tokens, dtype=ids.dtype)
        return torch.cat([ids, new.to(ids.device)], dim=1)
