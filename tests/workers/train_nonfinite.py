"""Worker: two ranks, AdamW-PMA with skip_nonfinite; only rank 1's gradient is NaN at step 3 (as when ZeRO or
FSDP give each rank its own shard): both ranks must skip it, so the phase and the parameters stay identical."""
import torch
import torch.distributed as dist

from pma_dist import distributed
from pma_dist.optim import AdamWPMA


def main() -> None:
    distributed.init_distributed("gloo", timeout=60)
    rank = dist.get_rank()
    p = torch.nn.Parameter(torch.ones(4))
    opt = AdamWPMA([p], lr=1e-2, period=4)
    opt.skip_nonfinite = True
    for step in range(1, 9):
        p.grad = torch.full((4,), 0.1 * step)  # the same on both ranks, so their parameters can be compared
        if step == 3 and rank == 1:
            p.grad[2] = float("nan")
        opt.step()
    gathered = [torch.zeros(4) for _ in range(2)]
    dist.all_gather(gathered, p.detach())
    clocks = [None, None]
    dist.all_gather_object(clocks, (opt.param_groups[0]["step"], opt.nonfinite_steps_skipped))
    if rank == 0:
        assert torch.equal(gathered[0], gathered[1]), gathered
        assert clocks == [(7, 1), (7, 1)], clocks
        print("agreed", clocks, flush=True)


if __name__ == "__main__":
    distributed.run_rank(main)
