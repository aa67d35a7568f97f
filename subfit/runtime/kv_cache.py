"""The compact KV cache: slots for retained attention units only.

A bypassed or deleted attention never reads or writes keys and values, so it gets no slot. One
static buffer per K and V, `[n_slots, B, Hkv, S_max, D]`, is allocated once; the layer -> slot
map is fixed by the plan. The memory is therefore exactly (retained / all attention units) of
a dense cache, which is what `plan.accounting()["kv_elements_per_token"]` counts.
"""
from __future__ import annotations

import torch
from torch import nn


def slot_map(attn_actions: list[str]) -> list[int | None]:
    """Layer -> slot index for kept attention, None for bypassed/deleted: [keep, bypass, keep] -> [0, None, 1]."""
    slots: list[int | None] = []
    n = 0
    for action in attn_actions:
        slots.append(n if action == "keep" else None)
        n += action == "keep"
    return slots


class CompactKVCache(nn.Module):
    def __init__(self, slots: list[int | None], batch_size: int, n_kv_heads: int, max_seq_len: int, head_dim: int,
                 *, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        self.slots = slots
        self.n_slots = sum(s is not None for s in slots)
        self.batch_size, self.max_seq_len = batch_size, max_seq_len
        shape = (self.n_slots, batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(K, V) of a layer's slot as `[B, Hkv, S_max, D]` views (contiguous: the slot is the outer
        dimension), or None for a layer whose attention was removed."""
        slot = self.slots[index]
        return None if slot is None else (self.k[slot], self.v[slot])

    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes
