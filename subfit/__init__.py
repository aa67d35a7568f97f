"""subfit: SubFit post-training compression of decoder LLMs (non-contiguous submodule removal
with fitted linear bypasses) and a fast runtime for the compressed model."""
import importlib

from subfit.plan import Plan, PlanError

__all__ = ["compress", "compress_levels", "evaluate", "Plan", "PlanError"]


def __getattr__(name: str):
    """`subfit.compress` / `subfit.evaluate` load on first use, so `import subfit.runtime` never
    pulls in the compression machinery (data flows one way)."""
    if name in ("compress", "compress_levels", "evaluate"):
        module = "compress" if name == "compress_levels" else name
        return getattr(importlib.import_module(f"subfit.{module}"), name)
    raise AttributeError(f"module 'subfit' has no attribute {name!r}")
