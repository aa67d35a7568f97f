"""subfit: SubFit post-training compression of decoder LLMs (non-contiguous submodule removal
with fitted linear bypasses) and a fast runtime for the compressed model."""
from subfit.plan import Plan, PlanError

__all__ = ["Plan", "PlanError"]
