"""Plain-PyTorch executor of a plan on its base model: the ground truth for kernels and runtime.

It calls the Hugging Face modules themselves for kept units, so the empty plan reproduces the
Hugging Face logits, and adds `h + bypass(norm(h))` for bypassed units.
"""
from __future__ import annotations

import torch
from torch import nn

from subfit.models import Decoder
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
        """The longest sequence the base model takes: `evaluate` checks its window against it."""
        return self.decoder.max_positions

    def action(self, kind: str, layer: int) -> str:
        return "keep" if self.plan is None else self.plan.actions(kind)[layer]

    @torch.no_grad()
    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
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
