"""Opt-in start-up hook: ``PMA_DIST_AUTOLOAD=1`` imports pma_dist in every Python process of the environment.

CLI front ends (``accelerate launch``, ``trl sft``, ``llamafactory-cli``, ``swift sft``) never run
``import pma_dist``, so a DeepSpeed JSON with ``"optimizer": {"type": "AdamWPMA"}`` fails there with an
unknown optimizer. Installing pma-dist (``pip install pma-dist`` or ``pip install -e .``) puts
``pma_dist_autoload.pth`` (this folder's copy, placed at the root of the wheel and of the editable
wheel by ``setup.py``) into site-packages. Python runs its one line at start-up: when the variable
is exactly ``"1"`` it imports pma_dist, which registers the optimizer types (DeepSpeed is patched
when it is imported). Unset, the hook costs one environment lookup and imports nothing. Set, every
Python process of the environment imports torch at start-up (about a second), hence opt-in. If
the import fails, Python prints the traceback and starts anyway (``site`` skips a failing line).
"""
from pathlib import Path

ENV_VAR = "PMA_DIST_AUTOLOAD"
PTH_NAME = "pma_dist_autoload.pth"
PTH_FILE = Path(__file__).with_name(PTH_NAME)
