"""Worker: two ranks all-reduce in a loop; rank 1 stops itself (SIGSTOP) at step 3; the watchdog must name it."""
import os
import signal
import sys
import time

import torch
import torch.distributed as dist

from pma_dist import distributed


def main() -> None:
    timeout = float(sys.argv[1])
    distributed.init_distributed("gloo", timeout=timeout)
    watchdog = distributed.start_watchdog(timeout)
    rank = dist.get_rank()
    for step in range(1000):
        watchdog.progress = f"step {step}"
        value = torch.ones(1)
        dist.all_reduce(value)
        if step == 3 and rank == 1:
            print(f"rank 1 pid {os.getpid()} stops at {time.time():.3f}", flush=True)
            time.sleep(2 * watchdog.interval)  # let the last progress reach the store
            os.kill(os.getpid(), signal.SIGSTOP)
        time.sleep(0.05)
    print("not reached: the job must have ended", flush=True)


if __name__ == "__main__":
    distributed.run_rank(main)
