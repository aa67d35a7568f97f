"""The sweep's variants: every method of `subfit.methods` plus SubFit's ablations, each with
its description and plot style (one registry; report and run read it)."""
from __future__ import annotations

from subfit.methods import METHODS

# name -> (method, DevOptions changes): SubFit, its three ablations, the baselines.
VARIANTS: dict[str, tuple[str, dict]] = {
    "subfit": ("subfit", {}),
    "subfit-layer": ("subfit", {"granularity": "layer"}),
    "subfit-contiguous": ("subfit", {"contiguous": True}),
    "subfit-delete": ("subfit", {"bypass": False}),
    **{name: (name, {}) for name in METHODS if name != "subfit"},
}
DESCRIPTIONS = {
    **{name: method.description for name, method in METHODS.items()},
    "subfit-layer": "SubFit ablation: whole layers only",
    "subfit-contiguous": "SubFit ablation: one contiguous run of units",
    "subfit-delete": "SubFit ablation: SubFit's selection, units deleted (no bypass)",
}
STYLE = {  # colour, line style, marker
    "subfit": ("#d62728", "-", "o"),
    "subfit-layer": ("#ff9896", "--", "s"),
    "subfit-contiguous": ("#e377c2", "--", "^"),
    "subfit-delete": ("#8c564b", "--", "v"),
    "shortgpt": ("#1f77b4", ":", "D"),
    "uidl": ("#2ca02c", ":", "P"),
    "replaceme": ("#17becf", ":", "X"),
    "llm-drop": ("#9467bd", ":", "*"),
}
DELETION_OF_SUBFIT = "subfit-delete"
TASKS = ("piqa", "arc_easy", "arc_challenge", "winogrande", "lambada_openai")
# On small models WinoGrande sits at chance even when dense and LAMBADA collapses with perplexity:
# the core retention leaves them out, so the mean is read with and without them.
SECONDARY_TASKS = ("winogrande", "lambada_openai")
