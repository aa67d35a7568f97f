"""subfit: SubFit post-training compression of decoder LLMs (non-contiguous submodule removal
with fitted linear bypasses) and a fast runtime for the compressed model."""
from subfit.compress import compress
from subfit.evaluate import evaluate
from subfit.plan import Plan, PlanError

__all__ = ["compress", "evaluate", "Plan", "PlanError"]
