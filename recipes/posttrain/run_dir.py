"""The output directory of a run: refused when it holds another run, never emptied behind the user's back.

A directory *holds a run* when it has any of ``metrics.jsonl``, ``summary.json`` or a non-empty
``checkpoints/``. A new run there needs ``--resume`` (continue it) or ``--overwrite`` (start anew);
with ``--overwrite``, and with ``--resume`` when no verified checkpoint exists, the old run's files
are moved into ``replaced-<UTC time>/`` inside the directory, not deleted. Checkpoint rotation
(:func:`recipes.posttrain.checkpoints.publish`) deletes only checkpoints of the same run lineage.
The caches a run leaves next to these (``tokenized_data.pt``, ``reference_logprobs/``) are not part of
it: they stay in place and are reused by the next run there only when their key matches.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import List, Optional

from pma_dist.output_paths import OutputPathError, check_writable_dir

from .config import ConfigError

RUN_FILES = ("metrics.jsonl", "summary.json", "checkpoints")


def held_run(out: Path) -> List[str]:
    """The names in ``out`` that belong to a run (empty if none)."""
    found = []
    for name in RUN_FILES:
        path = out / name
        if (path.is_dir() and any(path.iterdir())) or path.is_file():
            found.append(name)
    return found


def check(cfg) -> None:
    """Every output location writable, and no other run in ``--output-dir`` unless told; before any work."""
    args = cfg.settings
    try:
        out = check_writable_dir(args.output_dir, "--output-dir")
        profile = cfg.comm_profile
        if profile is not None:
            check_writable_dir(profile.output_dir, "--comm-profile" if args.comm_profile else "comm_profile.output_dir")
        if args.save_model:
            saved = check_writable_dir(args.save_model, "--save-model")
            if (saved / "config.json").exists() and not args.overwrite:
                raise ConfigError(f"--save-model {saved} already holds a model (config.json): pass --overwrite to "
                                  f"replace it, or pick another directory")
    except OutputPathError as exc:
        raise ConfigError(str(exc)) from None
    held = held_run(out)
    if held and not (args.resume or args.overwrite):
        raise ConfigError(f"--output-dir {out} already holds a run ({', '.join(held)}): pass --resume to continue "
                          f"it, --overwrite to start a new run there (the old files move to "
                          f"{out}/replaced-<time>/), or pick another --output-dir")


def set_aside(out: Path) -> Optional[Path]:
    """Move the run files of ``out`` into a fresh ``replaced-<UTC time>`` folder; its path, or None if none."""
    held = held_run(out)
    if not held:
        return None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = out / f"replaced-{stamp}"
    suffix = 1
    while target.exists():
        suffix += 1
        target = out / f"replaced-{stamp}-{suffix}"
    target.mkdir()
    for name in held:
        (out / name).rename(target / name)
    return target
