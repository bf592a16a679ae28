"""Bridges to the frameworks post-training users already run (see ``docs/integrations.md``).

Each bridge is its own module and imports its framework only when it is imported, so
``import pma_dist`` never needs transformers, TRL, PEFT or ms-swift:

- :mod:`pma_dist.integrations.hf`: Hugging Face ``Trainer`` and TRL's trainers
  (``optimizer_cls_and_kwargs``, ``PMACallback``);
- :mod:`pma_dist.integrations.autoload`: the opt-in ``PMA_DIST_AUTOLOAD=1`` start-up hook that makes
  the DeepSpeed JSON types ``AdamWPMA`` / ``LionPMA`` work from CLI front ends that never import pma_dist;
- :mod:`pma_dist.integrations.swift`: ms-swift's ``--optimizer adamw_pma --optim_args period=K`` plugin.
"""
