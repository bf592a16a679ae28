"""The front door of communication accounting: the ``comm_profile`` section, the run record, the ledger.

Every backend goes through these three, so the same section means the same on DeepSpeed, FSDP2 and DDP:

- :func:`parse_comm_profile` validates the section (a dict, or a whole config holding one) and returns
  :class:`CommProfile` or None when profiling is off. Anything else (a string, an unknown key such as a
  misspelt ``"enabld"``) is an error naming the value.
- :class:`RunMeta` is the typed description of a run the analytical model needs, built from plain facts
  (method schedule, backend, sizes) by the integration that knows them; it becomes the ledger's ``meta``.
- :func:`open_ledger` creates and installs the :class:`~pma_dist.comm.ledger.CommLedger`, and has it write
  the run report (rank 0, after a barrier) when it is closed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from ..output_paths import check_writable_dir
from ..schedule import MicroStepSchedule
from .ledger import CommLedger

__all__ = ["CONFIG_KEYS", "CommProfile", "RunMeta", "open_ledger", "parse_comm_profile", "dtype_name"]

SECTION = "comm_profile"
CONFIG_KEYS = {"enabled", "output_dir", "keep_calls", "write_every", "report"}


@dataclass(frozen=True)
class CommProfile:
    """A validated, enabled ``comm_profile`` section."""

    output_dir: str
    keep_calls: bool = False
    write_every: Optional[int] = None
    report: bool = True


def parse_comm_profile(cfg) -> Optional[CommProfile]:
    """Validate a ``comm_profile`` section (or a whole config holding one); None when absent or off."""
    if cfg is None:
        return None
    if not isinstance(cfg, dict):
        raise TypeError(f"comm_profile must be a dict such as {{\"enabled\": true, \"output_dir\": \"runs/comm\"}}, "
                        f"got {type(cfg).__name__}: {cfg!r}")
    if SECTION in cfg:
        return parse_comm_profile(cfg[SECTION])
    unknown = sorted(set(cfg) - CONFIG_KEYS)
    if unknown:
        raise ValueError(f"unknown comm_profile key(s) {unknown}; expected some of {sorted(CONFIG_KEYS)}")
    enabled = cfg.get("enabled", False)
    if not isinstance(enabled, bool):
        raise ValueError(f"comm_profile.enabled must be true or false, got {enabled!r}")
    if not enabled:
        return None
    output_dir = cfg.get("output_dir")
    if not isinstance(output_dir, str) or not output_dir:
        raise ValueError(f"comm_profile.output_dir must be a non-empty path when enabled, got {output_dir!r}")
    for key in ("keep_calls", "report"):
        if key in cfg and not isinstance(cfg[key], bool):
            raise ValueError(f"comm_profile.{key} must be true or false, got {cfg[key]!r}")
    write_every = cfg.get("write_every")
    if write_every is not None and (isinstance(write_every, bool) or not isinstance(write_every, int)
                                    or write_every < 1):
        raise ValueError(f"comm_profile.write_every must be a positive int, got {write_every!r}")
    return CommProfile(output_dir=output_dir, keep_calls=cfg.get("keep_calls", False), write_every=write_every,
                       report=cfg.get("report", True))


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


@dataclass(frozen=True)
class RunMeta:
    """What :mod:`pma_dist.comm.model` needs to predict a run's traffic; written as the ledger's ``meta``.

    ``backend_options`` holds the backend's own traffic-relevant settings under their ledger keys
    (ZeRO bucket sizes, FSDP2 units, DDP buckets), as :meth:`~pma_dist.comm.model.Setup.from_meta` reads them.
    """

    backend: str  # "deepspeed" | "fsdp2" | "ddp"
    optimizer: str  # the optimizer class, as the report shows it
    schedule: MicroStepSchedule
    world_size: int
    dp_world_size: int
    dtype: str
    param_numels: Sequence[int]
    param_bytes: int
    gradient_clipping: float
    zero_stage: Optional[int] = None
    backend_options: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        meta = {
            "backend": self.backend,
            "optimizer": self.optimizer,
            # the file format's pair: PMA with a period of `period` micro-steps, or GA over `period`
            "pma": self.schedule.is_pma,
            "period": self.schedule.cycle,
            "gradient_accumulation_steps": self.schedule.accumulation,
            "zero_stage": self.zero_stage,
            "world_size": self.world_size,
            "dp_world_size": self.dp_world_size,
            "dtype": self.dtype,
            "param_count": int(sum(self.param_numels)),
            "param_bytes": int(self.param_bytes),
            "param_numels": [int(n) for n in self.param_numels],
            "gradient_clipping": float(self.gradient_clipping),
        }
        meta.update(self.backend_options)
        return meta


def open_ledger(profile: CommProfile, meta: RunMeta) -> CommLedger:
    """A ledger for this run, installed; closing it writes the files and (unless ``report`` is off) the report.

    ``output_dir`` is created and proven writable here, when the engine or trainer is built, so a bad path
    stops the run before its first step instead of at the first write (the end of a period, or the end
    of the training)."""
    check_writable_dir(profile.output_dir, "comm_profile.output_dir")
    ledger = CommLedger(profile.output_dir, meta.to_json(), keep_calls=profile.keep_calls,
                        write_every=profile.write_every)
    if profile.report:
        ledger.on_close(_write_run_report)
    return ledger.install()


def _write_run_report(ledger: CommLedger) -> None:
    """Rank 0 turns all ranks' files into the run report, once every rank has written its file."""
    if dist.is_initialized():
        dist.barrier()  # the ledger is uninstalled by now: this barrier is not counted
    if ledger.rank != 0:
        return
    from .report import write_run_report

    write_run_report(ledger.output_dir)
