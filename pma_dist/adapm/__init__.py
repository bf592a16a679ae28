"""AdaPM (adaptive partial momentum) and AdaPM-mini; see ``docs/adapm.md``."""
from .optimizer import AdaPM
from .policy import KINDS, ParamPlan, Segment, plan_param

__all__ = ["AdaPM", "KINDS", "ParamPlan", "Segment", "plan_param"]
