"""Communication accounting: count every collective, attribute it, compare it with the byte model.

- :class:`CommLedger` (``ledger.py``): the one accounting layer under DeepSpeed, FSDP2, DDP and user code.
- :func:`attach_to_engine` (``deepspeed_attach.py``): a ledger driven by a DeepSpeed engine and its
  ``"comm_profile"`` config section.
- ``model.py``: the analytical model of the bytes each ZeRO stage sends, PMA vs gradient accumulation.

See ``docs/comm_accounting.md``.
"""
from .deepspeed_attach import attach_to_engine, engine_meta, parse_comm_profile
from .ledger import CommLedger, active_ledger, close_all

__all__ = ["CommLedger", "active_ledger", "attach_to_engine", "close_all", "engine_meta", "parse_comm_profile"]
