"""pma-dist: periodical moving average (PMA) optimizers for distributed post-training.

``import pma_dist`` makes ``"AdamWPMA"``, ``"LionPMA"`` and ``"AdaPM"`` usable as the ``optimizer.type``
of a DeepSpeed JSON config (see ``docs/deepspeed.md``); DeepSpeed itself is imported only when you do.
"""
from .adapm import AdaPM  # registers "AdaPM" for DeepSpeed JSON configs
from .deepspeed_integration import initialize, register_optimizer
from .optim import AdamWPMA, LionPMA, PMAOptimizer
from .schedule import PMAPhase

__version__ = "0.1.0"

__all__ = ["AdaPM", "AdamWPMA", "LionPMA", "PMAOptimizer", "PMAPhase", "initialize", "register_optimizer",
           "__version__"]
