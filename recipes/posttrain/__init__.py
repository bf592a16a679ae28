"""Post-training (SFT and DPO) building blocks behind ``launch/train.py``.

``data`` loads, validates and tokenises records; ``losses`` holds the SFT and DPO objectives;
``metrics`` writes the JSONL log and measures update variance; ``checkpoints`` guards DeepSpeed
checkpoints; ``plots`` draws the PNGs. See ``docs/training.md``.
"""
