"""pma-dist: periodical moving average (PMA) optimizers for distributed post-training.

``import pma_dist`` makes ``"AdamWPMA"`` and ``"LionPMA"`` usable as the ``optimizer.type`` of a
DeepSpeed JSON config (see ``docs/deepspeed.md``).
"""
from .optim import AdamWPMA, LionPMA, PMAOptimizer
from .schedule import PMAPhase

__version__ = "0.1.0"

__all__ = ["AdamWPMA", "LionPMA", "PMAOptimizer", "PMAPhase", "__version__"]
from .deepspeed_integration import initialize, register_optimizer  # noqa: E402
from .adapm import AdaPM  # noqa: E402,F401  (registers "AdaPM" for DeepSpeed JSON configs)
