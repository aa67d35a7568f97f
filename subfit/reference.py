"""Plain-PyTorch executor of a plan on its base model: the ground truth for kernels and runtime.

It calls the Hugging Face modules themselves for kept units, so the empty plan reproduces the
Hugging Face logits, and adds `h + bypass(norm(h))` for bypassed units.
"""
from __future__ import annotations

import torch
from torch import nn

from subfit.models import Decoder, check_positions, max_positions
from subfit.plan import Plan


class ReferenceModel(nn.Module):
    """`forward(input_ids) -> logits` of the base model with the plan applied (full recompute).

    Inputs may be right-padded: causal attention means padding never changes earlier positions.
    """

    def __init__(self, model: nn.Module, plan: Plan | None = None, *, check_base: bool = True):
        super().__init__()
        self.model = model
        self.decoder = Decoder(model)
        self.plan = plan
        if plan is not None and check_base:
            plan.check_base(self.decoder)

    @property
    def max_positions(self) -> int | None:
        """The longest sequence the base model takes (`models.max_positions`)."""
        return max_positions(self.decoder.config)

    def check_ids(self, input_ids: torch.Tensor) -> None:
        """Refuse what the embedding would fail on with a bare IndexError, or run silently wrong:
        ids that are not integers or lie outside the vocabulary, sequences beyond the model's positions."""
        if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool or input_ids.dim() != 2:
            raise ValueError(f"input_ids must be integer token ids [batch, length], got {input_ids.dtype} "
                             f"{tuple(input_ids.shape)}.")
        vocab = self.decoder.body.embed_tokens.num_embeddings
        if input_ids.numel() and not 0 <= int(input_ids.min()) <= int(input_ids.max()) < vocab:
            bad = input_ids[(input_ids < 0) | (input_ids >= vocab)].unique()[:5].tolist()
            raise ValueError(f"Token ids {bad} are outside the model's vocabulary [0, {vocab}); tokenize with the "
                             "model's own tokenizer.")
        check_positions(self.max_positions, input_ids.shape[1], f"A sequence of {input_ids.shape[1]} tokens")

    def action(self, kind: str, layer: int) -> str:
        return "keep" if self.plan is None else self.plan.actions(kind)[layer]

    @torch.no_grad()
    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        self.check_ids(input_ids)
        dec = self.decoder
        hidden = dec.embed(input_ids)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        rotary = dec.rotary(hidden, positions)
        for layer in range(dec.num_layers):
            for kind in ("attn", "ffn"):
                action = self.action(kind, layer)
                if action == "delete":
                    continue
                normed = dec.norm(kind, layer)(hidden)
                if action == "keep":
                    hidden = hidden + dec.run_unit(kind, layer, normed, rotary)
                else:
                    hidden = hidden + self.plan.bypass(kind, layer)(normed)
        return hidden

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.decoder.head(self.hidden_states(input_ids))

    @torch.no_grad()
    def logits_at(self, input_ids: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Logits at positions `index` [B, K] only: scoring a continuation needs a few positions,
        and the vocabulary projection of every position would cost more than the layers."""
        hidden = self.hidden_states(input_ids)
        picked = hidden.gather(1, index[..., None].expand(-1, -1, hidden.shape[-1]))
        return self.decoder.head(picked)

    @torch.no_grad()
    def greedy(self, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy continuation by full recompute: slow, obviously right."""
        ids = input_ids
        for _ in range(max_new_tokens):
            next_id = self(ids)[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_id], dim=1)
        return ids[:, input_ids.shape[1]:]
