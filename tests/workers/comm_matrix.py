"""Run many tiny DeepSpeed configurations in one launch, each under a CommLedger; rank 0 writes JSON.

Usage: comm_matrix.py OUT_JSON RUN_ROOT [--stages 0,1,2,3] [--dtypes fp32,bf16] [--kinds pma,ga]
       [--period K] [--periods P] [--clip C] [--keep-calls] [--json-config] [--extra SPEC ...]
       [--persistence-threshold N] [--width W]

For each (stage, dtype, kind) — plus each ``--extra stage:dtype:kind:K[:json]`` — it builds an engine on a small MLP whose sizes do not divide by the world
size (so partition padding shows), attaches a ledger, runs P periods of K micro-steps, destroys the
engine (which writes comm_rank{r}.json) and collects every rank's ledger through the files.
``--json-config`` goes through the DeepSpeed JSON path (optimizer.type "AdamWPMA" + "comm_profile")
instead of a client optimizer and an explicit ``attach_to_engine``.
"""
import argparse
import json
import os
import sys

import torch

import deepspeed
import torch.distributed as dist

from pma_dist.comm import attach_to_engine
from pma_dist.methods import get_method

# the matrix's two kinds; any other kind is a method name of pma_dist.methods
KIND_METHODS = {"pma": "adamw_pma", "ga": "adamw_ga"}


def method_of(kind: str):
    return get_method(KIND_METHODS.get(kind, kind))


def tiny_model(seed: int = 0, width: int = 7) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, width), torch.nn.Tanh(), torch.nn.Linear(width, 3),
                               torch.nn.Tanh(), torch.nn.Linear(3, 1, bias=False))


def ds_config(stage: int, dtype: str, kind: str, period: int, world: int, clip: float,
              persistence_threshold=None) -> dict:
    gas = method_of(kind).schedule(period).accumulation
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": gas,
        "train_batch_size": 2 * gas * world,
        "gradient_clipping": clip,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if stage == 3 and persistence_threshold is not None:
        config["zero_optimization"]["stage3_param_persistence_threshold"] = persistence_threshold
    if dtype == "bf16":
        config["bf16"] = {"enabled": True}
    return config


def make_engine(args, stage, dtype, kind, world, run_dir, period, json_config):
    keep_calls = args.keep_calls
    model = tiny_model(width=args.width)
    config = ds_config(stage, dtype, kind, period, world, args.clip, args.persistence_threshold)
    # The JSON path also lets rank 0 write the run report when the engine is destroyed.
    profile = {"enabled": True, "output_dir": run_dir, "keep_calls": keep_calls, "report": json_config}
    method = method_of(kind)
    if json_config:
        config.update(method.deepspeed_config(period, {"lr": 1e-3, "weight_decay": 0.0}))
        config["comm_profile"] = profile
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
        ledger = getattr(engine, "comm_ledger", None)
        if ledger is None:  # integration present but not attaching: do it here so the run still counts
            ledger = attach_to_engine(engine, profile)
        return engine, ledger
    optimizer = method.build(model.parameters(), period, lr=1e-3, weight_decay=0.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine, attach_to_engine(engine, profile)


def run_one(args, stage, dtype, kind, world, period, json_config=False):
    name = f"z{stage}_{dtype}_{kind}" + (f"_k{period}" if period != args.period else "") + \
        ("_json" if json_config else "")
    run_dir = os.path.join(args.run_root, name)
    engine, ledger = make_engine(args, stage, dtype, kind, world, run_dir, period, json_config)
    attached_by_config = json_config and getattr(engine, "comm_ledger", None) is ledger
    torch.manual_seed(100 + dist.get_rank())
    model_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    def evaluate():
        # an evaluation pass is no micro-step (stages 0-2 send nothing in forward, so the model
        # comparison stays exact; the tests' micro_steps == periods * K proves it was not counted)
        if stage < 3:
            engine.eval()
            with torch.no_grad():
                engine(torch.randn(2, 5, dtype=model_dtype))
            engine.train()

    for micro_step in range(args.periods * period):
        x = torch.randn(2, 5, dtype=model_dtype)
        if micro_step == period:
            evaluate()
        loss = engine(x).float().pow(2).mean()
        engine.backward(loss)
        engine.step()
    evaluate()
    # The file must already be on disk before the engine is destroyed (written once per period).
    written_before_destroy = json.load(open(ledger.path))["meta"]["micro_steps"]
    engine.destroy()
    dist.barrier()
    ledgers = [json.load(open(os.path.join(run_dir, f"comm_rank{r}.json"))) for r in range(world)]
    return name, {"stage": stage, "dtype": dtype, "kind": kind, "period": period, "json_config": json_config,
                  "attached_by_config": attached_by_config, "written_before_destroy": written_before_destroy,
                  "report_written": os.path.exists(os.path.join(run_dir, "report.json")),
                  "run_dir": run_dir, "ledgers": ledgers}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("run_root")
    parser.add_argument("--stages", default="0,1,2,3")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--kinds", default="pma,ga")
    parser.add_argument("--period", type=int, default=2)
    parser.add_argument("--periods", type=int, default=2)
    parser.add_argument("--clip", type=float, default=0.0)
    parser.add_argument("--persistence-threshold", type=int, default=None)
    parser.add_argument("--width", type=int, default=7,
                        help="hidden width: 25013 puts a 125,065-element weight above ZeRO-3's default persistence "
                             "threshold (1e5), so it is partitioned and gathered in forward")
    parser.add_argument("--keep-calls", action="store_true")
    parser.add_argument("--json-config", action="store_true")
    parser.add_argument("--extra", action="append", default=[], help="stage:dtype:kind:K[:json]")
    args = parser.parse_args()

    deepspeed.init_distributed(dist_backend="gloo")
    world = dist.get_world_size()
    results = {}
    specs = [(int(stage), dtype, kind, args.period, args.json_config)
             for stage in args.stages.split(",") if stage
             for dtype in args.dtypes.split(",") for kind in args.kinds.split(",")]
    for extra in args.extra:
        stage, dtype, kind, period, *json_flag = extra.split(":")
        specs.append((int(stage), dtype, kind, int(period), json_flag == ["json"]))
    for stage, dtype, kind, period, json_config in specs:
        name, result = run_one(args, stage, dtype, kind, world, period, json_config)
        results[name] = result
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump({"world_size": world, "period": args.period, "periods": args.periods,
                       "clip": args.clip, "results": results}, f)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
