"""Worker for tests/test_adapm_fsdp.py: AdaPM on FSDP2 (``fully_shard``) against a single process.

    torchrun --nproc_per_node=2 tests/workers/adapm_fsdp.py OUT_DIR           # parity, memory, ledger, DCP
    torchrun --nproc_per_node=1 tests/workers/adapm_fsdp.py OUT_DIR resume    # the 2-rank checkpoint on 1 rank
    torchrun --nproc_per_node=2 tests/workers/adapm_fsdp.py OUT_DIR resume2   # the 1-rank checkpoint on 2 ranks

Every rank builds the same float64 GPT-2-style model (transformers ``GPT2LMHeadModel`` from a config:
fused Conv1D ``c_attn`` whose q/k slices are low-rank with the weight's rows as the block's *columns*,
MLP blocks low-rank with the rows as the block's rows, value full, embeddings / attention output
none, norms and biases full; odd vocabulary and context sizes so FSDP2's row shards are uneven).
Rank 0 also runs the single-process AdaPM on the same global batch (the mean of the two ranks'
micro-batches) and writes OUT_DIR/results.json with, per case, the per-step max |difference| of every
parameter and the per-step max |update| of the reference; per-rank optimizer-state bytes (FSDP2 AdaPM,
DDP AdaPM, FSDP2 AdamW); AdaPM's ledger-counted messages per step with the model's; and a DCP
checkpoint written mid-period (after step 5 of period 4; step 6 is no refit, so a spurious refit on
resume would show) resumed on the same ranks (bit-identical) and, in the ``resume`` mode, on one rank (OUT_DIR/resume.json; that mode also writes a 1-rank checkpoint at
step 5, which the ``resume2`` mode resumes on 2 ranks: OUT_DIR/resume2.json).
"""
from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from pma_dist.adapm import AdaPM
from pma_dist.distributed import init_distributed, shutdown

VOCAB, CONTEXT, WIDTH, HEADS, LAYERS = 61, 15, 48, 4, 2
MICRO_BATCH, STEPS = 2, 9
BASE = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, rank_ratio=0.1, update_interval=3,
            inner_steps=2)
CASES = {
    "adapm": dict(BASE),
    "adapm_mini": dict(BASE, mini=True, num_heads=HEADS),
    "adapm_pma": dict(BASE, period=4),
    "adapm_mini_pma_gd": dict(BASE, mini=True, num_heads=HEADS, period=4, solver="gd"),
    "adapm_full_rank_fit": dict(BASE, rank_ratio=0.6),  # 2 r >= min(m, n): the range finder's k = min(m, n)
}


def build_model(dtype=torch.float64):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=CONTEXT, n_embd=WIDTH, n_layer=LAYERS, n_head=HEADS,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).to(dtype)


def global_batch(step, world):
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, VOCAB, (world * MICRO_BATCH, CONTEXT), generator=gen)


def loss_of(model, tokens):
    return model(input_ids=tokens, labels=tokens).loss


def shard(model):
    from torch.distributed.fsdp import fully_shard
    for block in model.transformer.h:
        fully_shard(block)
    return fully_shard(model)


def full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def params_of(model):
    return {n: full(p.detach()).clone() for n, p in model.named_parameters()}


def run_reference(opts, world):
    model = build_model()
    opt = AdaPM(model.named_parameters(), **opts)
    history = [params_of(model)]
    for step in range(STEPS):
        opt.zero_grad()
        loss_of(model, global_batch(step, world)).backward()
        opt.step()
        history.append(params_of(model))
    return history


def run_fsdp(opts, rank, world, dtype=torch.float64):
    model = shard(build_model(dtype))
    opt = AdaPM(model.named_parameters(), **opts)
    history = [params_of(model)]
    for step in range(STEPS):
        opt.zero_grad()
        tokens = global_batch(step, world)[rank * MICRO_BATCH:(rank + 1) * MICRO_BATCH]
        loss_of(model, tokens).backward()
        opt.step()
        history.append(params_of(model))
    return history, opt, model


def replicated_state_spread(opt):
    """Max |difference| between ranks of every replicated state (they must be bit-identical)."""
    from torch.distributed.tensor import Replicate
    worst = 0.0
    for state in opt.state.values():
        for key, t in state.items():
            if hasattr(t, "placements") and t.placements == (Replicate(),):
                local = t.to_local().clone()
                ref = local.clone()
                dist.broadcast(ref, src=0)
                worst = max(worst, (local - ref).abs().max().item() if local.numel() else 0.0)
    return worst


def compare(case, rank, world):
    opts = CASES[case]
    history, opt, _ = run_fsdp(opts, rank, world)
    spread = replicated_state_spread(opt)
    if rank != 0:
        return None
    ref = run_reference(opts, world)
    diffs = [max((history[t][n] - ref[t][n]).abs().max().item() for n in ref[t]) for t in range(1, STEPS + 1)]
    updates = [max((ref[t][n] - ref[t - 1][n]).abs().max().item() for n in ref[t]) for t in range(1, STEPS + 1)]
    lowrank = sorted({r["name"] for r in opt.memory_report() if "lowrank" in r["policy"]})
    return {"diffs": diffs, "updates": updates, "replicated_spread": spread, "lowrank_params": lowrank}


def local_bytes(t):
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


def one_step(model, opt, rank, world):
    tokens = global_batch(0, world)[rank * MICRO_BATCH:(rank + 1) * MICRO_BATCH]
    opt.zero_grad()
    loss_of(model, tokens).backward()
    opt.step()


def memory(rank, world):
    """This rank's optimizer-state bytes (``step`` counters excluded) after one step."""
    model = shard(build_model())
    opt = AdaPM(model.named_parameters(), **CASES["adapm"])
    one_step(model, opt, rank, world)
    report = opt.memory_report()
    fsdp_adapm = sum(opt.state_bytes().values())
    out = {"fsdp2_adapm": fsdp_adapm,
           "fsdp2_adapm_report": sum(r["momentum_bytes"] + r["second_moment_bytes"] for r in report),
           "fsdp2_adapm_replicated": sum(r["replicated_bytes"] for r in report)}
    mini = AdaPM(shard(build_model()).named_parameters(), **CASES["adapm_mini"])
    out["fsdp2_adapm_mini_report"] = sum(r["momentum_bytes"] + r["second_moment_bytes"]
                                         for r in mini.memory_report())
    out["fsdp2_adapm_mini_replicated"] = sum(r["replicated_bytes"] for r in mini.memory_report())
    net = build_model()
    ddp = torch.nn.parallel.DistributedDataParallel(net)
    opt = AdaPM(ddp.named_parameters(), **CASES["adapm"])
    one_step(ddp, opt, rank, world)
    out["ddp_adapm"] = sum(opt.state_bytes().values())
    model = shard(build_model())
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-3)
    one_step(model, adamw, rank, world)
    out["fsdp2_adamw"] = sum(local_bytes(t) for st in adamw.state.values() for k, t in st.items() if k != "step")
    gathered = [None] * world
    dist.all_gather_object(gathered, out)
    return gathered


def ledger_counts(case, rank, world, out_dir):
    """AdaPM's messages per step as the comm ledger counted them (phase "adapm") and as modelled."""
    from pma_dist.comm import CommLedger
    from pma_dist.comm import adapm_model
    opts = CASES[case]
    model = shard(build_model())
    opt = AdaPM(model.named_parameters(), **opts)
    ledger = CommLedger(str(out_dir / f"ledger_{case}"), {"period": 1}).install()
    try:
        for step in range(STEPS):
            ledger.begin_micro_step(step, "none")
            tokens = global_batch(step, world)[rank * MICRO_BATCH:(rank + 1) * MICRO_BATCH]
            opt.zero_grad()
            loss_of(model, tokens).backward()
            opt.step()
            ledger.end_micro_step()
    finally:
        ledger.close()
    measured, modelled = [], []
    for step in range(STEPS):
        count = sum(v[0] for (i, _, phase, op, *_), v in ledger.totals.items() if i == step and phase == "adapm")
        nbytes = sum(v[1] for (i, _, phase, op, *_), v in ledger.totals.items() if i == step and phase == "adapm")
        ops = sorted({op for (i, _, phase, op, *_) in ledger.totals if i == step and phase == "adapm"})
        measured.append([ops, count, nbytes])
        model_totals = adapm_model.totals(adapm_model.step_messages(opt.sharded_blocks(), step + 1))
        modelled.append([sorted(model_totals), sum(c for c, _ in model_totals.values()),
                         sum(b for _, b in model_totals.values())])
    return {"measured": measured, "modelled": modelled}


CKPT_CASE, CKPT_AT = "adapm_mini_pma_gd", 5  # period 4: step 5 opens the 2nd period; refits at 1, 4, 7 (not 6)


def full_state(opt, model):
    names = {p: n for n, p in model.named_parameters()}
    return {f"{names[p]}/{k}": full(t).clone() for p, st in opt.state.items() for k, t in st.items()}


def train(model, opt, rank, world, steps, ranks_batch=True):
    for step in steps:
        tokens = global_batch(step, world)
        if ranks_batch:
            tokens = tokens[rank * MICRO_BATCH:(rank + 1) * MICRO_BATCH]
        opt.zero_grad()
        loss_of(model, tokens).backward()
        opt.step()


def checkpoint(rank, world, out_dir):
    """Uninterrupted 9 steps vs 6 steps, DCP save, fresh model + optimizer, DCP load, 3 more steps."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    opts = CASES[CKPT_CASE]
    model = shard(build_model())
    opt = AdaPM(model.named_parameters(), **opts)
    train(model, opt, rank, world, range(STEPS))
    straight = (params_of(model), full_state(opt, model))
    model = shard(build_model())
    opt = AdaPM(model.named_parameters(), **opts)
    train(model, opt, rank, world, range(CKPT_AT))
    with opt.setup_steps():
        model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(out_dir / "ckpt"))
    model = shard(build_model())
    opt = AdaPM(model.named_parameters(), **opts)
    load_checkpoint(model, opt, out_dir / "ckpt")
    train(model, opt, rank, world, range(CKPT_AT, STEPS))
    resumed = (params_of(model), full_state(opt, model))
    if rank == 0:
        torch.save(straight, out_dir / "straight.pt")
    return {"params_bitwise_equal": all(torch.equal(straight[0][n], resumed[0][n]) for n in straight[0]),
            "state_keys_equal": sorted(straight[1]) == sorted(resumed[1]),
            "state_bitwise_equal": all(torch.equal(straight[1][k], resumed[1][k]) for k in straight[1]),
            "factor_keys": sum(1 for k in straight[1] if "exp_avg_L" in k or "exp_avg_R" in k),
            "group_step": opt.param_groups[0]["step"]}


def load_checkpoint(model, opt, path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    with opt.setup_steps():
        model_sd, optim_sd = get_state_dict(model, opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path))
    with opt.setup_steps():
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])


def resume_on_one_rank(out_dir):
    """The 2-rank checkpoint resumed by one rank (whole global batch), against the 2-rank straight run;
    then a 1-rank run to step 5 saved for ``resume2``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    opts = CASES[CKPT_CASE]
    model = shard(build_model())
    opt = AdaPM(model.named_parameters(), **opts)
    load_checkpoint(model, opt, out_dir / "ckpt")
    train(model, opt, 0, 2, range(CKPT_AT, STEPS), ranks_batch=False)
    result = against_straight(model, opt, out_dir)
    model = shard(build_model())
    opt = AdaPM(model.named_parameters(), **opts)
    train(model, opt, 0, 2, range(CKPT_AT), ranks_batch=False)
    with opt.setup_steps():
        model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(out_dir / "ckpt_one_rank"))
    return result


def resume_on_two_ranks(rank, world, out_dir):
    """The 1-rank checkpoint resumed by 2 ranks, against the 2-rank straight run."""
    model = shard(build_model())
    opt = AdaPM(model.named_parameters(), **CASES[CKPT_CASE])
    load_checkpoint(model, opt, out_dir / "ckpt_one_rank")
    train(model, opt, rank, world, range(CKPT_AT, STEPS))
    return against_straight(model, opt, out_dir)


def against_straight(model, opt, out_dir):
    params, state = torch.load(out_dir / "straight.pt")
    mine = params_of(model)
    mine_state = full_state(opt, model)
    return {"param_diff": max((mine[n] - params[n]).abs().max().item() for n in params),
            "state_keys_equal": sorted(state) == sorted(mine_state),
            "step": opt.param_groups[0]["step"]}


def trainer_path(rank, world, out_dir):
    """pma_dist.torch_parallel.setup(optimizer="adapm", period=4): the same bits as AdaPM on a model
    sharded by hand, also across trainer.save / trainer.load after step 5 (mid-period). float32: the
    comm model (pma_dist.comm.model) covers float32/bf16/fp16 runs."""
    from pma_dist.torch_parallel import setup
    opts = dict(CASES["adapm_pma"])
    period = opts.pop("period")
    direct, _, _ = run_fsdp(CASES["adapm_pma"], rank, world, torch.float32)

    def micro_steps(trainer, steps):
        for step in steps:
            tokens = global_batch(step, world)[rank * MICRO_BATCH:(rank + 1) * MICRO_BATCH]
            trainer.micro_step(lambda model: loss_of(model, tokens))

    trainer = setup(build_model(torch.float32), backend="fsdp", optimizer="adapm", optimizer_kwargs=opts, period=period,
                    comm_profile={"enabled": True, "output_dir": str(out_dir / "trainer_comm")})
    micro_steps(trainer, range(CKPT_AT))
    trainer.close()
    trainer.save(out_dir / "trainer_ckpt")
    trainer = setup(build_model(torch.float32), backend="fsdp", optimizer="adapm", optimizer_kwargs=opts, period=period)
    trainer.load(out_dir / "trainer_ckpt")
    micro_steps(trainer, range(CKPT_AT, STEPS))
    final = params_of(trainer.model)
    from pma_dist.comm import adapm_model
    ledger_file = json.loads((out_dir / "trainer_comm" / f"comm_rank{rank}.json").read_text())
    phases = sorted({r["phase"] for r in ledger_file["records"]})
    return {"optimizer": type(trainer.optimizer).__name__,
            "bitwise_equal": all(torch.equal(final[n], direct[-1][n]) for n in final),
            "ledger_phases": phases, "ledger_problems": adapm_model.compare(ledger_file),
            "ledger_micro_steps": sorted({r["micro_step"] for r in ledger_file["records"]}),
            "run_report_model": run_report_model(out_dir / "trainer_comm") if rank == 0 else None}


def run_report_model(run_dir):
    """The run report's model check (rank 0 wrote report.json when the trainer closed)."""
    report = json.loads((run_dir / "report.json").read_text())
    model = report["model"]
    return {"available": model.get("available"), "agree": model.get("agree"), "reason": model.get("reason"),
            "mismatches": model.get("micro_step_mismatches")}


def refused_fused_rows():
    """A fused QKV stored (3d, d) (nn.Linear) would be cut by the row shards: refused, named."""
    from torch import nn
    from torch.distributed.fsdp import fully_shard
    net = nn.Module()
    net.qkv_proj = nn.Linear(8, 24, bias=False)
    fully_shard(net)
    try:
        AdaPM(net.named_parameters())
    except ValueError as err:
        return {"error": str(err)}
    return {"error": None}


def main():
    out = Path(sys.argv[1])
    info = init_distributed()
    rank, world = info.rank, info.world_size
    if sys.argv[2:] == ["resume"]:
        result = resume_on_one_rank(out)
        (out / "resume.json").write_text(json.dumps(result))
        shutdown(0)
        return
    if sys.argv[2:] == ["resume2"]:
        result = resume_on_two_ranks(rank, world, out)
        if rank == 0:
            (out / "resume2.json").write_text(json.dumps(result))
        shutdown(0)
        return
    results = {}
    checks = [(case, lambda case=case: compare(case, rank, world)) for case in CASES]
    checks += [("memory", lambda: memory(rank, world)),
               ("ledger_adapm", lambda: ledger_counts("adapm", rank, world, out)),
               ("ledger_adapm_mini_pma_gd", lambda: ledger_counts("adapm_mini_pma_gd", rank, world, out)),
               ("checkpoint", lambda: checkpoint(rank, world, out)),
               ("trainer", lambda: trainer_path(rank, world, out)),
               ("refused_fused_rows", refused_fused_rows)]
    for name, check in checks:
        try:
            results[name] = check()
        except Exception:  # noqa: BLE001 - report, the test fails with the traceback
            results[name] = {"crash": traceback.format_exc()}
        dist.barrier()
    if rank == 0:
        (out / "results.json").write_text(json.dumps(results, indent=1))
    shutdown(0)


if __name__ == "__main__":
    main()
