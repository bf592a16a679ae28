"""Ledger checks on real process groups: every spelling of every collective counted once, exact bytes.

Usage: comm_ledger_checks.py OUT_JSON RUN_DIR. Rank 0 writes OUT_JSON with one entry per check:
{"<check>": {"records": [...], ...}}; the test module asserts on it.
"""
import json
import os
import sys

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

import deepspeed
import deepspeed.comm as ds_comm

from pma_dist.comm import CommLedger, active_ledger


def ops(ledger: CommLedger):
    return [(r["phase"], r["op"], r["count"], r["bytes"]) for r in ledger.to_dict()["records"]]


def main():
    out_path, run_dir = sys.argv[1], sys.argv[2]
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {"world_size": world}
    originals = {name: getattr(dist, name) for name in ("all_reduce", "all_gather_single", "reduce_scatter_tensor")}

    # 1. torch spellings, each once; sizes chosen so every op's byte rule gives a distinct number.
    ledger = CommLedger(os.path.join(run_dir, "torch"), meta={"backend": "torch"}).install()
    results["patched_while_installed"] = dist.all_reduce is not originals["all_reduce"]
    shard = torch.ones(3)  # 12 bytes per rank
    full = torch.empty(3 * world)
    with ledger.in_phase("forward"):
        dist.all_reduce(torch.ones(5))                                  # 20
        c10d.all_reduce(torch.ones(2, dtype=torch.bfloat16))            # 4
        dist.all_gather_into_tensor(full, shard)                        # 12 * world (output)
        dist.all_gather_single(full, shard)                             # 12 * world
        c10d._all_gather_base(full, shard)                              # 12 * world
        dist.all_gather([torch.empty(3) for _ in range(world)], shard)  # 12 * world
    with ledger.in_phase("backward"):
        dist.reduce_scatter_tensor(shard.clone(), torch.ones(3 * world))  # 12 * world (input)
        dist.reduce_scatter_single(shard.clone(), torch.ones(3 * world))  # 12 * world
        dist.broadcast(torch.ones(7, dtype=torch.float64), src=0)         # 56
        work = dist.all_reduce(torch.ones(4), async_op=True)              # 16
        work.wait()
        dist.barrier()                                                    # 0
    results["torch"] = {"records": ops(ledger)}
    ledger.close()
    results["restored_after_close"] = all(getattr(dist, n) is f for n, f in originals.items()) and \
        c10d.all_reduce is originals["all_reduce"] and active_ledger() is None

    # 2. deepspeed.comm -> torch.distributed: counted once, under deepspeed's own names too.
    ledger = CommLedger(os.path.join(run_dir, "ds"), meta={"backend": "deepspeed.comm"}).install()
    with ledger.in_phase("step"):
        ds_comm.all_reduce(torch.ones(6))                                           # 24
        ds_comm.all_gather_into_tensor(torch.empty(2 * world), torch.ones(2))       # 8 * world
        ds_comm.reduce_scatter_tensor(torch.empty(2), torch.ones(2 * world))        # 8 * world
        ds_comm.broadcast(torch.ones(3), src=0)                                     # 12
    results["deepspeed_comm"] = {"records": ops(ledger)}
    ledger.close()

    # 3. DDP's reducer is C++: the ledger's comm hook makes its bucket all-reduces visible (and correct).
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))  # 15 + 8 = 23 params
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    ledger = CommLedger(os.path.join(run_dir, "ddp"), meta={"backend": "ddp"}).install()
    ddp.register_comm_hook(None, ledger.ddp_comm_hook())
    torch.manual_seed(10 + rank)
    x = torch.randn(2, 4)
    ledger.begin_micro_step(0, "large")
    with ledger.in_phase("forward"):
        loss = ddp(x).pow(2).sum()
    loss.backward()  # phase stays "forward" on purpose: the hook itself marks "backward"
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    reference = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    reference.load_state_dict(model.state_dict())
    total = None
    for r in range(world):  # the averaged gradient, computed locally from every rank's batch
        torch.manual_seed(10 + r)
        reference.zero_grad()
        reference(torch.randn(2, 4)).pow(2).sum().backward()
        g = torch.cat([p.grad.flatten() for p in reference.parameters()])
        total = g if total is None else total + g
    results["ddp"] = {"records": ops(ledger), "grad_error": (grads - total / world).abs().max().item()}
    ledger.end_micro_step()
    ledger.close()

    # 4. Periodic writes: with write_every=2 the file exists after two micro-steps, before close.
    ledger = CommLedger(os.path.join(run_dir, "periodic"), meta={"period": 2}).install()
    written = []
    for i in range(4):
        ledger.begin_micro_step(i, "small" if i % 2 == 0 else "large")
        dist.all_reduce(torch.ones(1))
        ledger.end_micro_step()
        written.append(json.load(open(ledger.path))["meta"]["micro_steps"] if os.path.exists(ledger.path) else 0)
    ledger.close()
    results["periodic"] = {"written": written}

    # 5. Routing for the link attribution: a sub-group's global ranks and a broadcast's / reduce's root are
    # recorded; a group of every rank (DeepSpeed's data-parallel group) is written as the world (no "group").
    last = dist.new_group([world - 1])
    everyone = dist.new_group(list(range(world)))
    ledger = CommLedger(os.path.join(run_dir, "routing"), meta={"backend": "torch"}).install()
    with ledger.in_phase("step"):
        if rank == world - 1:
            dist.all_reduce(torch.ones(2), group=last)                    # 8, group [world-1]
            dist.broadcast(torch.ones(1), group=last, group_src=0)         # 4, root world-1
        dist.all_reduce(torch.ones(3), group=everyone)                    # 12, the world
        dist.broadcast(torch.ones(5), world - 1)                          # 20, root world-1 (positional)
        dist.reduce(torch.ones(6), dst=0)                                 # 24, root 0
        ds_comm.all_reduce(torch.ones(1), group=everyone)                 # 4, the world
    ledger.close()
    dist.barrier()
    results["routing"] = {
        "ranks": [json.load(open(os.path.join(run_dir, "routing", f"comm_rank{r}.json")))["records"]
                  for r in range(world)]}

    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
