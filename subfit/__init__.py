"""subfit: SubFit post-training compression of decoder LLMs (non-contiguous submodule removal
with fitted linear bypasses) and a fast runtime for the compressed model."""
import importlib

from subfit.config import DevOptions, SubFitConfig
from subfit.plan import Plan, PlanError

__all__ = ["compress", "compress_levels", "evaluate", "DevOptions", "Plan", "PlanError", "SubFitConfig"]

_LAZY = {"compress": "compression", "compress_levels": "compression", "evaluate": "evaluation"}
SUBPACKAGES = ("runtime",)


def __getattr__(name: str):
    """`subfit.compress`, `subfit.evaluate` and `subfit.runtime` load on first use, so `import subfit.runtime` never
    pulls in the compression machinery (data flows one way). Their modules are named apart
    (`subfit.compression`, `subfit.evaluation`), so importing one never shadows the function."""
    if name in SUBPACKAGES:
        return importlib.import_module(f"subfit.{name}")
    if name in _LAZY:
        function = getattr(importlib.import_module(f"subfit.{_LAZY[name]}"), name)
        globals()[name] = function
        return function
    raise AttributeError(f"module 'subfit' has no attribute {name!r}")
