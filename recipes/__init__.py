"""Training applications built on pma_dist (not part of the installed package).

``recipes.posttrain`` is the SFT/DPO job behind ``launch/train.py`` and the pretraining recipe behind
``launch/pretrain_base.py``; ``launch/``, ``benchmarks/`` and ``tests/`` import it from the repository root.
"""
