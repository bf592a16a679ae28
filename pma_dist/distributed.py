"""Launcher-agnostic helpers for training scripts: who am I, start the process group, end cleanly.

The same script runs under ``deepspeed --num_gpus N``, ``torchrun`` and ``mpirun``:

- torchrun and the deepspeed launcher export ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_*``;
  the deepspeed launcher also appends ``--local_rank=N`` to ``argv`` (:func:`pop_local_rank_arg`).
- mpirun exports only its own variables; :func:`setup_env_from_mpi` translates them (through
  mpi4py when it is installed) *before* DeepSpeed or torch look, so ``MASTER_PORT`` from the
  environment is honoured (DeepSpeed's own MPI discovery always picks port 29500).
- Every process group gets a collective timeout (:func:`collective_timeout`: ``$PMA_DIST_COLLECTIVE_TIMEOUT``
  seconds, default 600 instead of torch's 30 minutes), and :func:`start_watchdog` names a rank that stopped
  (SIGSTOP, a frozen host) within that timeout and ends the job (see :class:`Watchdog`).
- Gloo ranks can abort at interpreter exit ("terminate called without an active exception") when
  the process group is torn down by garbage collection; :func:`shutdown` ends in a fixed order.

Nothing here imports DeepSpeed at module import time, so FSDP scripts can use it too.
"""
from __future__ import annotations

import atexit
import datetime
import json
import os
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch.distributed as dist

__all__ = [
    "RankInfo",
    "rank_info",
    "in_mpi_env",
    "setup_env_from_mpi",
    "pop_local_rank_arg",
    "default_backend",
    "init_distributed",
    "collective_timeout",
    "start_watchdog",
    "Watchdog",
    "configure_accelerate_for_deepspeed",
    "shutdown",
]

_TORCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# (rank, world size, local rank, local world size) variables of Open MPI, then MPICH/Intel MPI (Hydra)
_MPI_ENV = (
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"),
    ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
)
DEFAULT_MASTER_PORT = 29500
TIMEOUT_ENV = "PMA_DIST_COLLECTIVE_TIMEOUT"
# Long enough for any wait a healthy job has (rank 0 hashing a checkpoint while the others wait at a
# barrier, a first JIT build), short enough that a hang costs minutes, not torch's default 30 minutes.
# The same on CPU (gloo) and GPU (NCCL): it bounds waiting for a peer, not the speed of the link.
DEFAULT_COLLECTIVE_TIMEOUT_S = 600.0
HUNG_PEER_EXIT_CODE = 3


@dataclass(frozen=True)
class RankInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int


def _int_env(name: str, default: Optional[int] = None) -> Optional[int]:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def in_mpi_env() -> bool:
    """True when this process was started by mpirun/mpiexec (Open MPI or an MPICH-family launcher)."""
    return any(rank in os.environ and size in os.environ for rank, size, *_ in _MPI_ENV)


def _mpi_env_values() -> Optional[RankInfo]:
    for rank, size, local_rank, local_size in _MPI_ENV:
        if rank in os.environ and size in os.environ:
            return RankInfo(_int_env(rank), _int_env(size), _int_env(local_rank, 0), _int_env(local_size, 1))
    return None


def _this_host_address() -> str:
    """An address other hosts can reach (hostnames often resolve to 127.0.1.1 on Debian-like hosts)."""
    try:
        infos = socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)
        routable = sorted({info[4][0] for info in infos} - {"0.0.0.0"})
        routable = [address for address in routable if not address.startswith("127.")]
        if routable:
            return routable[0]
    except OSError:
        pass
    try:  # the interface of the default route; connecting a UDP socket sends nothing
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("10.255.255.255", 1))
            return probe.getsockname()[0]
    except OSError:
        return "127.0.0.1"


def setup_env_from_mpi(master_port: Optional[int] = None) -> Optional[RankInfo]:
    """Export torch's rendezvous variables from the MPI launch; a no-op outside mpirun.

    With mpi4py the rank, world size and local rank come from ``MPI.COMM_WORLD`` and rank 0's
    address is broadcast; without it the launcher's environment variables are used and
    ``MASTER_ADDR`` must be set (``mpirun -x MASTER_ADDR=...``). Rank and sizes always come from
    MPI; an explicit ``-x MASTER_ADDR=...`` / ``-x MASTER_PORT=...`` is kept.
    """
    if not in_mpi_env():
        return None
    try:
        from mpi4py import MPI
    except ImportError:
        MPI = None
    if MPI is not None:
        comm = MPI.COMM_WORLD
        rank, world = comm.Get_rank(), comm.Get_size()
        hosts = comm.allgather(MPI.Get_processor_name())
        local_rank = hosts[:rank].count(hosts[rank])
        local_world = hosts.count(hosts[rank])
        master_addr = comm.bcast(_this_host_address() if rank == 0 else None, root=0)
        if len(set(hosts)) == 1:
            master_addr = "127.0.0.1"
        info = RankInfo(rank, world, local_rank, local_world)
    else:
        info = _mpi_env_values()
        master_addr = os.environ.get("MASTER_ADDR")
        if master_addr is None:
            if info.world_size != info.local_world_size:
                raise RuntimeError(
                    "launched by mpirun across several hosts without mpi4py: set MASTER_ADDR to rank 0's "
                    "address (mpirun -x MASTER_ADDR=<host>) or install mpi4py")
            master_addr = "127.0.0.1"
    # MPI's own placement wins over anything inherited (a RANK left in the shell would give two ranks
    # the same number and hang the rendezvous); an explicit MASTER_ADDR/PORT is kept.
    os.environ["RANK"] = str(info.rank)
    os.environ["WORLD_SIZE"] = str(info.world_size)
    os.environ["LOCAL_RANK"] = str(info.local_rank)
    os.environ["LOCAL_WORLD_SIZE"] = str(info.local_world_size)
    os.environ.setdefault("MASTER_ADDR", master_addr)
    os.environ.setdefault("MASTER_PORT", str(master_port or DEFAULT_MASTER_PORT))
    return info


def rank_info() -> RankInfo:
    """This process's place in the job, whichever launcher started it (single process: 0 of 1)."""
    if "RANK" not in os.environ and in_mpi_env():
        setup_env_from_mpi()
    world = _int_env("WORLD_SIZE", 1)
    return RankInfo(rank=_int_env("RANK", 0), world_size=world, local_rank=_int_env("LOCAL_RANK", 0),
                    local_world_size=_int_env("LOCAL_WORLD_SIZE", world))


def pop_local_rank_arg(argv: Optional[List[str]] = None) -> Optional[int]:
    """Remove ``--local_rank=N`` / ``--local_rank N`` (added by the deepspeed launcher) from ``argv``.

    Returns N, or None when absent. Scripts with strict argument parsers call this first.
    """
    argv = sys.argv if argv is None else argv
    for i, arg in enumerate(argv):
        for flag in ("--local_rank", "--local-rank"):
            if arg.startswith(flag + "="):
                del argv[i]
                return int(arg.split("=", 1)[1])
            if arg == flag and i + 1 < len(argv):
                value = argv[i + 1]
                del argv[i:i + 2]
                return int(value)
    return None


def default_backend() -> Optional[str]:
    """The accelerator's collective backend (nccl on CUDA, gloo on CPU, ...); None without DeepSpeed,
    which lets ``torch.distributed`` pick per device."""
    try:
        from deepspeed.accelerator import get_accelerator
    except ImportError:
        return None
    return get_accelerator().communication_backend_name()


def collective_timeout(seconds: Optional[float] = None) -> datetime.timedelta:
    """The collective timeout: ``seconds``, else ``$PMA_DIST_COLLECTIVE_TIMEOUT``, else 600 s."""
    source = "collective timeout"
    if seconds is None:
        raw = os.environ.get(TIMEOUT_ENV)
        if raw in (None, ""):
            return datetime.timedelta(seconds=DEFAULT_COLLECTIVE_TIMEOUT_S)
        source = f"environment variable {TIMEOUT_ENV}"
        try:
            seconds = float(raw)
        except ValueError:
            raise ValueError(f"{source}={raw!r} is not a number of seconds") from None
    if not seconds > 0:
        raise ValueError(f"{source} must be > 0 seconds, got {seconds!r}")
    return datetime.timedelta(seconds=float(seconds))


def init_distributed(backend: Optional[str] = None, timeout: Optional[float] = None) -> RankInfo:
    """Start torch.distributed from whichever launcher ran us (no-op if already started), with
    :func:`collective_timeout` (``timeout`` seconds, else the environment's or the default)."""
    info = rank_info()
    missing = [name for name in _TORCH_ENV if name not in os.environ]
    if info.world_size > 1 and missing:
        raise RuntimeError(f"cannot start a {info.world_size}-rank process group: environment variables "
                           f"{', '.join(missing)} are not set (launch with torchrun, deepspeed or mpirun)")
    if not dist.is_initialized():
        if info.world_size == 1:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(DEFAULT_MASTER_PORT))
            os.environ.setdefault("RANK", "0")
            os.environ.setdefault("WORLD_SIZE", "1")
        dist.init_process_group(backend=backend or default_backend(), rank=info.rank, world_size=info.world_size,
                                timeout=collective_timeout(timeout))
    return info


class Watchdog:
    """Every rank's heartbeat through the rendezvous store; a rank whose heartbeat stops is named and the job ends.

    A daemon thread on each rank writes ``(beat, host, pid, progress)`` under its rank every ``interval``
    seconds and reads every other rank's. A peer whose beat has not changed for ``stale_after`` seconds
    (half the collective timeout, measured on this rank's clock, so clocks of other hosts do not matter)
    is reported as ``rank R (host H, pid P)`` with its last progress, and this rank exits with
    :data:`HUNG_PEER_EXIT_CODE`; the launcher then stops the rest. A heartbeat thread keeps beating while
    its rank computes, saves or waits in a collective, so it catches stopped or frozen processes and lost
    hosts; a rank alive but deadlocked is caught by the collective timeout itself. If the store (hosted by
    rank 0 under the deepspeed launcher and mpirun, by the agent under torchrun) stops answering, that is
    reported the same way. Cost: one small store write and ``world - 1`` reads per interval, off the
    training thread.
    """

    def __init__(self, timeout_s: float, rank: int, world_size: int, store=None, interval: Optional[float] = None):
        self.stale_after = timeout_s / 2
        self.interval = interval or min(5.0, self.stale_after / 4)
        self.rank, self.world_size = rank, world_size
        self.progress: object = None  # what the job was doing, shown when a peer reports this rank
        self._store = store if store is not None else self._connect(self.stale_after)
        self._beat = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pma_dist-watchdog", daemon=True)

    @staticmethod
    def _connect(timeout_s: float):
        address, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        store = dist.TCPStore(address, port, is_master=False, timeout=datetime.timedelta(seconds=timeout_s),
                              wait_for_workers=False)
        return dist.PrefixStore("pma_dist_watchdog", store)

    def start(self) -> "Watchdog":
        self._send()
        self._thread.start()
        return self

    def stop(self) -> None:
        """This rank is leaving on purpose: peers stop watching it."""
        if self._stop.is_set():
            return
        self._stop.set()
        try:
            self._send(done=True)
        except Exception:  # the store may already be gone at exit; peers then see the job ending anyway
            pass

    def _send(self, done: bool = False) -> None:
        self._beat += 1
        self._store.set(f"rank{self.rank}", json.dumps({"beat": self._beat, "host": socket.gethostname(),
                                                        "pid": os.getpid(), "progress": self.progress,
                                                        "done": done}))

    def _run(self) -> None:
        seen = {}  # rank -> (last beat record, this rank's monotonic time when it last changed)
        began = time.monotonic()
        while not self._stop.wait(self.interval):
            try:
                self._send()
                now = time.monotonic()
                for peer in range(self.world_size):
                    if peer == self.rank:
                        continue
                    key = f"rank{peer}"
                    record = json.loads(self._store.get(key)) if self._store.check([key]) else None
                    last, changed = seen.get(peer, (None, began))
                    if record is not None and record["done"]:
                        continue
                    if record != last:
                        seen[peer] = (record, now)
                    elif now - changed > self.stale_after:
                        self._end(self._describe(peer, record, now - changed))
            except Exception as exc:  # the store itself stopped answering (or broke): as fatal as a hung peer
                if self._stop.is_set():
                    return
                address = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
                self._end(f"the rendezvous store at {address} did not answer within {self.stale_after:.0f} s "
                          f"({type(exc).__name__}); under the deepspeed launcher and mpirun it lives in rank 0, "
                          f"so rank 0 is likely stopped or hung")

    def _describe(self, peer: int, record: Optional[dict], silent: float) -> str:
        if record is None:
            return f"rank {peer} sent no heartbeat in {silent:.1f} s since this rank's watchdog started"
        progress = f", last at {record['progress']}" if record.get("progress") is not None else ""
        return (f"rank {peer} (host {record['host']}, pid {record['pid']}) sent no heartbeat for {silent:.1f} s"
                f"{progress}: it is stopped or hung")

    def _end(self, reason: str) -> None:
        print(f"pma_dist watchdog on rank {self.rank}: {reason}; ending the job with exit code {HUNG_PEER_EXIT_CODE} "
              f"(a peer silent for half the collective timeout of {2 * self.stale_after:g} s is reported)",
              file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(HUNG_PEER_EXIT_CODE)


_WATCHDOG: Optional[Watchdog] = None


def start_watchdog(timeout: Optional[float] = None) -> Optional[Watchdog]:
    """Start this process's :class:`Watchdog` once (a no-op for one rank, or if one runs); returns it."""
    global _WATCHDOG
    if _WATCHDOG is None and dist.is_initialized() and dist.get_world_size() > 1:
        seconds = collective_timeout(timeout).total_seconds()
        _WATCHDOG = Watchdog(seconds, dist.get_rank(), dist.get_world_size()).start()
    return _WATCHDOG


def configure_accelerate_for_deepspeed(backend: Optional[str] = None):
    """Pre-build accelerate's process state for a DeepSpeed run whose backend accelerate cannot guess.

    accelerate 1.15 hands no backend to its process state when DeepSpeed is used, so on a machine
    without CUDA it counts one process and the Trainer fills ``train_batch_size`` for world size 1
    (DeepSpeed then fails its batch-size assertion). Call this first on such machines (CPU runs),
    then create ``TrainingArguments(..., accelerator_config={"use_configured_state": True})``.
    Returns the ``PartialState``.
    """
    from accelerate.state import PartialState

    backend = backend or default_backend() or "gloo"
    previous = os.environ.get("ACCELERATE_USE_DEEPSPEED")
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"  # makes accelerate start DeepSpeed's comm layer
    try:
        return PartialState(backend=backend)
    finally:
        if previous is None:
            del os.environ["ACCELERATE_USE_DEEPSPEED"]
        else:
            os.environ["ACCELERATE_USE_DEEPSPEED"] = previous


def release_deepspeed_shm() -> Optional[str]:
    """Unlink this rank's segment of DeepSpeed's CPU shared-memory all-reduce; the name unlinked, or None.

    On the CPU accelerator, when every rank is on one host (``LOCAL_SIZE`` equals the world size),
    ``deepspeed.comm`` creates a ~69 MB POSIX shared-memory segment per rank
    (``deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>``, ``shm.cpp``) and never
    unlinks it, so every such job left one per rank in ``/dev/shm`` (RAM) for good: a test suite's
    worth filled half the machine's memory. The peers opened it at initialisation, and an unlinked
    segment stays mapped where it is open, so unlinking at the end of the run is safe."""
    comm = sys.modules.get("deepspeed.comm.comm")
    backend = getattr(comm, "cdb", None) if comm is not None else None
    if getattr(backend, "shm_comm_op", None) is None or not (dist.is_available() and dist.is_initialized()):
        return None
    if os.environ.get("LOCAL_SIZE") != str(dist.get_world_size()):
        return None  # DeepSpeed did not create one (ranks on several hosts)
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{dist.get_rank()}")
    try:
        import _posixshmem  # CPython's binding of shm_unlink (multiprocessing.shared_memory uses it)

        _posixshmem.shm_unlink("/" + name)
    except FileNotFoundError:
        return None
    except (ImportError, OSError):
        return None
    return name


# a job that ends by returning (an HF Trainer script, say) rather than through shutdown() unlinks it too,
# if its process group is still up at interpreter exit
atexit.register(release_deepspeed_shm)


def shutdown(code: int = 0) -> None:
    """End the process without gloo's exit-time abort: barrier, destroy the group, finalize MPI, _exit.

    Never returns. Output is flushed first because ``os._exit`` skips interpreter clean-up.
    """
    try:
        if _WATCHDOG is not None:
            _WATCHDOG.stop()  # peers leave at different moments: a finished rank is not a hung one
        ledger = sys.modules.get("pma_dist.comm.ledger")
        if ledger is not None:  # os._exit skips atexit: write the last partial period of any open ledger
            ledger.close_all()
        if dist.is_available() and dist.is_initialized():
            if code == 0:  # a failing rank must not wait for peers that may never arrive
                dist.barrier()
            release_deepspeed_shm()  # os._exit would leave DeepSpeed's segment in /dev/shm for good
            dist.destroy_process_group()
        mpi = sys.modules.get("mpi4py.MPI")
        if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
            mpi.Finalize()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def run_rank(main: Callable[[], object]) -> None:
    """Run one rank's ``main`` and end the process through :func:`shutdown` (never returns): exit 0
    when it returns, 2 for a ``SystemExit`` with a message (argparse-style), 1 with the traceback on
    any other error, so one failing rank never hangs at gloo's exit-time abort."""
    try:
        main()
    except SystemExit as stop:
        if stop.code in (None, 0):
            shutdown(0)
        print(stop, file=sys.stderr)
        shutdown(stop.code if isinstance(stop.code, int) else 2)
    except BaseException:
        traceback.print_exc()
        shutdown(1)
    shutdown(0)
