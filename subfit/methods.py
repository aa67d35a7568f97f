"""The one registry of compression methods: SubFit and the baselines it is compared with.

Torch-free, so the command line lists the methods without loading torch; `subfit.baselines`
implements each baseline under its name here, `subfit.compress` is SubFit itself.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    name: str
    removes: str  # "layer" | "unit"
    contiguous: bool  # removes one contiguous block
    fitted: bool  # replaces what it removes by a fitted map
    description: str


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("subfit", "unit", False, True, "SubFit: units, non-contiguous, fitted bypasses"),
    Method("shortgpt", "layer", False, False, "ShortGPT: layers of lowest Block Influence, deleted"),
    Method("uidl", "layer", True, False, "UIDL: contiguous block of least angular distance, deleted"),
    Method("replaceme", "layer", True, True, "ReplaceMe (LS): UIDL's block replaced by a fitted linear map"),
    Method("llm-drop", "unit", False, False, "LLM-Drop: units of highest input/output cosine, deleted"),
)}
BASELINES = tuple(name for name in METHODS if name != "subfit")
