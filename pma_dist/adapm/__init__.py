"""AdaPM (adaptive partial momentum) and AdaPM-mini; see ``docs/adapm.md``.

Importing this package registers ``"AdaPM"`` as a DeepSpeed JSON ``optimizer.type``.
"""
from ..deepspeed_integration import register_optimizer
from .optimizer import AdaPM
from .policy import KINDS, ParamPlan, Segment, plan_param

register_optimizer("AdaPM", AdaPM)

__all__ = ["AdaPM", "KINDS", "ParamPlan", "Segment", "plan_param"]
