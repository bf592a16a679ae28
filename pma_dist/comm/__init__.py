"""Communication accounting: count every collective, attribute it, compare it with the byte model.

- ``profile.py``: the front door shared by every backend: :func:`parse_comm_profile` (the
  ``"comm_profile"`` section), :class:`RunMeta` (what the model needs to know of a run) and :func:`open_ledger`.
- :class:`CommLedger` (``ledger.py``): the one accounting layer under DeepSpeed, FSDP2, DDP and user code.
- :func:`attach_to_engine` (``deepspeed_attach.py``): a ledger driven by a DeepSpeed engine and its
  ``"comm_profile"`` config section.
- ``model.py``: the analytical model of the bytes each ZeRO stage sends, PMA vs gradient accumulation.

See ``docs/comm_accounting.md``.
"""
from .deepspeed_attach import attach_to_engine, engine_meta
from .ledger import CommLedger, active_ledger, close_all
from .profile import CommProfile, RunMeta, open_ledger, parse_comm_profile

__all__ = ["CommLedger", "CommProfile", "RunMeta", "active_ledger", "attach_to_engine", "close_all", "engine_meta",
           "open_ledger", "parse_comm_profile"]
