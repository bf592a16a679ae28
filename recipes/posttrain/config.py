"""Command line and DeepSpeed config of the post-training job, resolved before any work starts.

Precedence, lowest to highest: built-in defaults < the ``--deepspeed`` JSON file < explicit command
line flags. ``--optimizer`` names a training method of :mod:`pma_dist.methods`, which decides the
accumulation: the PMA optimizers step on every micro-batch (``gradient_accumulation_steps = 1``,
``period = K``); the GA baselines accumulate K micro-batches (``gradient_accumulation_steps = K``); the
no-accumulation baselines step on every micro-batch with K = 1. Everything invalid raises :class:`ConfigError` naming the
flag or config key and its value.
"""
from __future__ import annotations

import argparse
import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import torch

from pma_dist import distributed
from pma_dist.comm.profile import CommProfile, parse_comm_profile
from pma_dist.methods import Method, get_method, method_names
from pma_dist.schedule import LR_DECAYS

from .lr_schedule import LR_SCHEDULES

REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = (REPO.parent / "shared" / "data").resolve()
FALLBACK = "builtin-fallback"

DS_TYPES = ("adamwpma", "lionpma", "adamw", "lion")  # optimizer.type values train.py maps onto a method
FAMILY_DEFAULTS = {
    "adamw": {"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0},
    "lion": {"lr": 1e-4, "betas": [0.9, 0.99], "weight_decay": 0.0},
}
DEFAULT_DATA = {"sft": SHARED_DATA / "sft" / "alpaca_mix_train.jsonl",
                "dpo": SHARED_DATA / "dpo" / "hh_rlhf_harmless_base_test_pairs.jsonl"}
DEFAULT_MODEL = SHARED_DATA / "models" / "stories260K"
BASE_DS_CONFIG = {
    "train_micro_batch_size_per_gpu": 4,
    "gradient_accumulation_steps": 1,
    # DeepSpeed's default is 1.0; clipping acts on a K-times noisier gradient under PMA than under
    # GA, so it is off unless asked for, to compare the optimizers and nothing else
    "gradient_clipping": 0.0,
    "zero_optimization": {"stage": 0},
    "steps_per_print": 1_000_000_000,
    "wall_clock_breakdown": False,
}


class ConfigError(ValueError):
    """A bad flag, config key or combination; the message names it and its value."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="SFT / DPO post-training with PMA optimizers or gradient-accumulation baselines "
                    "(DeepSpeed, FSDP2 or DDP; launch with deepspeed, torchrun or mpirun). See docs/training.md.")
    p.add_argument("--task", choices=("sft", "dpo"), default="sft")
    p.add_argument("--model", default=None,
                   help=f"local HF model dir or hub name (default: {DEFAULT_MODEL} if present, "
                        f"else the built-in fallback; '{FALLBACK}' forces it)")
    p.add_argument("--train-data", default=None, help="local .jsonl/.json or hub dataset name")
    p.add_argument("--eval-data", default=None, help="held-out file; default: a fixed split of --train-data")
    p.add_argument("--eval-size", type=int, default=128, help="records held out when --eval-data is not given")
    p.add_argument("--select-size", type=int, default=0,
                   help="records held out of --train-data besides the eval split, scored at the end of the run as "
                        "select_loss: the split to choose hyper-parameters on, so the eval split stays unseen (0: none)")
    p.add_argument("--max-train-records", type=int, default=None, help="use only the first N training records")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--overlong", choices=("truncate", "skip", "error"), default="truncate",
                   help="what to do with records longer than --max-length (always counted and reported)")
    p.add_argument("--max-degenerate-pairs", type=float, default=0.05, metavar="FRACTION",
                   help="DPO: refuse the data when more than this fraction of pairs have chosen == rejected "
                        "(they are counted and reported either way)")
    p.add_argument("--deepspeed", dest="deepspeed_config", default=None,
                   help="DeepSpeed JSON config (--backend deepspeed only)")
    # AdaPM is built from named parameters (torch_parallel.setup, the DeepSpeed JSON type "AdaPM"), not by this job
    p.add_argument("--optimizer", choices=method_names(plain_params=True), default=None,
                   help="training method (pma_dist.methods): PMA, gradient accumulation (_ga) or none (adamw, lion)")
    p.add_argument("--period", type=int, default=None,
                   help="K: PMA period, or the micro-batches adamw_ga/lion_ga accumulate")
    p.add_argument("--lr", type=float, default=None, help="the peak learning rate (see --lr-schedule)")
    p.add_argument("--lr-schedule", choices=LR_SCHEDULES, default="constant",
                   help="the lr as a function of samples seen, the same for every method: constant, or linear "
                        "warm-up over --warmup-fraction of the run then cosine decay to 0 (recipes/posttrain/lr_schedule.py)")
    p.add_argument("--warmup-fraction", type=float, default=0.1,
                   help="--lr-schedule warmup_cosine: the fraction of --micro-steps spent warming up")
    p.add_argument("--lr-decay", choices=LR_DECAYS, default=None,
                   help="PMA optimizers only: none (Algorithm 1, default) or periodic (the paper's text: small step "
                        "tau is scaled by a further 1/(tau+1) within each period; docs/math.md)")
    p.add_argument("--betas", type=float, nargs=2, default=None)
    p.add_argument("--eps", type=float, default=None)
    p.add_argument("--weight-decay", type=float, default=None)
    p.add_argument("--micro-batch-size", type=int, default=None)
    p.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3), default=None, help="--backend deepspeed only")
    p.add_argument("--gradient-clipping", type=float, default=None)
    p.add_argument("--micro-steps", type=int, default=64, help="total micro-batches per rank")
    p.add_argument("--eval-every", type=int, default=32, help="micro-steps between evaluations (0: start/end only)")
    p.add_argument("--eval-batch-size", type=int, default=16)
    p.add_argument("--log-every", type=int, default=None, help="micro-steps between train-loss lines (default K)")
    p.add_argument("--save-every", type=int, default=0, help="micro-steps between checkpoints (0: none)")
    p.add_argument("--keep-checkpoints", type=int, default=2)
    p.add_argument("--output-dir", default="runs/train")
    p.add_argument("--save-model", default=None, metavar="DIR",
                   help="after training, write the final model (and tokenizer) to DIR as a Hugging Face model "
                        "directory, gathered from every backend's shards (e.g. the base of a later DPO run)")
    p.add_argument("--resume", action="store_true", help="continue from the last verified checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="start a new run in an --output-dir that holds one (its files move to replaced-<time>/)")
    p.add_argument("--collective-timeout", type=float, default=None, metavar="SECONDS",
                   help=f"seconds a collective may wait for a peer before the job stops, and the watchdog's bound "
                        f"for naming a hung rank (default: ${distributed.TIMEOUT_ENV} or "
                        f"{distributed.DEFAULT_COLLECTIVE_TIMEOUT_S:.0f})")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow checkpoints to unpickle arbitrary objects (off: torch.load(weights_only=True))")
    p.add_argument("--trust-remote-code", action="store_true", help="let transformers run model code (off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--beta", type=float, default=0.1, help="DPO beta")
    p.add_argument("--dpo-reference", choices=("cached", "copy"), default="cached",
                   help="DPO reference: log-probs of the initial model precomputed once and cached next to the run "
                        "(default), or a frozen full model copy on every rank (recipes/posttrain/reference.py)")
    p.add_argument("--log-update-variance", action="store_true", help="log last-layer update variance")
    p.add_argument("--variance-window", type=int, default=8,
                   help="measured updates (each over K, or --variance-every, micro-steps) per variance window")
    p.add_argument("--variance-every", type=int, default=None,
                   help="micro-steps per measured update (default K); set it to compare with a run of another K")
    p.add_argument("--comm-profile", default=None, help="write the communication ledger to this directory")
    p.add_argument("--backend", choices=("deepspeed", "fsdp", "ddp"), default="deepspeed",
                   help="deepspeed (ZeRO 0-3, --deepspeed CONFIG), fsdp (FSDP2 fully_shard) or ddp (DDP "
                        "no_sync for GA); fsdp/ddp take no --deepspeed/--zero-stage and write DCP checkpoints")
    p.add_argument("--nonfinite", choices=("skip", "stop"), default=None,
                   help="a NaN/inf gradient: skip that optimizer step on every rank, counted in the metrics (default "
                        "for the PMA optimizers, not under ZeRO-3), or stop (a non-finite train loss always stops "
                        "the run once no micro-batch of a log interval is finite)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on rank 0")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # the deepspeed launcher's
    return p


@dataclass(frozen=True)
class JobSettings:
    """The job's own settings, typed, as the flags gave them (the optimizer's and DeepSpeed's are resolved into
    :class:`TrainConfig`'s fields instead). Built by :func:`resolve`; a flag without a field here is an error
    there, so the two cannot drift apart."""

    task: str
    backend: str
    seed: int
    micro_steps: int
    eval_size: int
    select_size: int
    max_train_records: Optional[int]
    max_length: int
    overlong: str
    max_degenerate_pairs: float
    eval_every: int
    eval_batch_size: int
    save_every: int
    keep_checkpoints: int
    output_dir: str
    save_model: Optional[str]
    lr_schedule: str
    warmup_fraction: float
    resume: bool
    overwrite: bool
    collective_timeout: Optional[float]
    trust_checkpoint: bool
    trust_remote_code: bool
    beta: float
    dpo_reference: str  # "cached" (precomputed log-probs) or "copy" (a frozen model on every rank)
    log_update_variance: bool
    variance_window: int
    variance_every: Optional[int]
    comm_profile: Optional[str]  # the --comm-profile flag (the parsed section is TrainConfig.comm_profile)
    no_progress: bool

    #: flags resolved into TrainConfig's fields (or the launcher's), not kept here
    RESOLVED = ("model", "train_data", "eval_data", "deepspeed_config", "optimizer", "period", "lr", "lr_decay", "betas", "eps",
                "weight_decay", "micro_batch_size", "zero_stage", "gradient_clipping", "log_every", "nonfinite",
                "local_rank")

    @classmethod
    def from_namespace(cls, args: argparse.Namespace) -> "JobSettings":
        names = {f for f in cls.__dataclass_fields__}
        given = {k: v for k, v in vars(args).items() if k not in cls.RESOLVED}
        unknown = sorted(set(given) - names)
        if unknown:  # a programming error: a new flag must be given a field (or be listed as resolved)
            raise TypeError(f"JobSettings has no field for flag(s) {unknown}")
        return cls(**given)


@dataclass
class TrainConfig:
    settings: JobSettings
    optimizer: str
    period: int
    optimizer_params: dict
    ds_config: Optional[dict]  # the DeepSpeed config: --backend deepspeed only (None for fsdp/ddp)
    model: str
    train_data: str
    eval_data: Optional[str]
    fallback: bool
    log_every: int
    micro_batch_size: int = 4
    gradient_clipping: float = 0.0
    comm_profile: Optional[CommProfile] = None
    nonfinite: str = "stop"  # "skip": the PMA optimizers' skip_nonfinite guard is on

    @property
    def method(self) -> Method:
        return get_method(self.optimizer)

    @property
    def schedule(self):
        return self.method.schedule(self.period)

    @property
    def is_pma(self) -> bool:
        return self.method.is_pma

    @property
    def dpo_reference(self) -> str:
        return self.settings.dpo_reference

    @property
    def checkpoint_format(self) -> str:
        return "deepspeed" if self.settings.backend == "deepspeed" else "dcp"  # FSDP2 and DDP share DCP's

    def identity(self) -> dict:
        """What a checkpoint must agree with to be resumed by this run: everything that changes the math
        (method and variant, K, betas, eps, DPO beta) or the data stream (data, its length policy, the
        micro batch, the seed). The settings of :meth:`reapplied` may change on resume instead."""
        args = self.settings
        return {"checkpoint_format": self.checkpoint_format, "task": args.task,
                "optimizer": self.optimizer, "period": self.period,
                "micro_batch_size": self.micro_batch_size, "seed": args.seed, "model": self.model,
                "train_data": self.train_data, "eval_data": self.eval_data, "eval_size": args.eval_size,
                "select_size": args.select_size, "lr_schedule": args.lr_schedule,
                "warmup_fraction": args.warmup_fraction if args.lr_schedule != "constant" else None,
                "lr_decay": self.optimizer_params.get("lr_decay"),
                "max_train_records": args.max_train_records, "max_length": args.max_length,
                "overlong": args.overlong, "betas": list(self.optimizer_params["betas"]),
                "eps": self.optimizer_params.get("eps"), "dpo_beta": args.beta if args.task == "dpo" else None}

    def reapplied(self) -> dict:
        """Settings a resumed run takes from its own command line, not from the checkpoint (and logs if changed):
        lowering the learning rate or the clipping after a spike is what a resume is often for."""
        return {"lr": self.optimizer_params["lr"], "weight_decay": self.optimizer_params.get("weight_decay", 0.0),
                "gradient_clipping": self.gradient_clipping}


def _positive(name: str, value, minimum: int = 1) -> None:
    if value is not None and value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")


def _load_json(path: str) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"--deepspeed config not found: {path}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--deepspeed config {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--deepspeed config {path} must hold a JSON object")
    return data


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _check_torch_backend_flags(args: argparse.Namespace) -> None:
    """Flags that mean something only to DeepSpeed, or that FSDP2/DDP checkpoints cannot honour."""
    for flag, value in (("--deepspeed", args.deepspeed_config), ("--zero-stage", args.zero_stage)):
        if value is not None:
            raise ConfigError(f"{flag} {value} is a DeepSpeed setting, but --backend is {args.backend}: "
                              f"drop it, or use --backend deepspeed (the settings it would carry have flags: "
                              f"--micro-batch-size, --gradient-clipping, --lr, ...)")
    if args.resume and not args.trust_checkpoint:
        raise ConfigError(f"--resume with --backend {args.backend} needs --trust-checkpoint: its checkpoints are "
                          f"torch.distributed.checkpoint directories, whose reader unpickles .metadata and "
                          f"non-tensor entries (it can run code from the files); pass --trust-checkpoint only "
                          f"for checkpoints you wrote")


# DeepSpeed optimizer types train.py maps onto a method without a registered class, and the keys they take
_PLAIN_JSON_KEYS = {"adamw": {"lr", "betas", "eps", "weight_decay", "torch_adam", "adam_w_mode", "amsgrad"},
                    "lion": {"lr", "betas", "weight_decay"}}


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_json_values(user: dict, source: str) -> None:
    """The DeepSpeed keys train.py reads, typed as DeepSpeed would need them: a bad one names key and file."""
    def bad(key, value, expected):
        raise ConfigError(f"{key}={value!r} in {source} must be {expected}")

    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        value = user.get(key)
        if value is None or (key == "gradient_accumulation_steps" and value == "auto"):
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            bad(key, value, "a positive integer" + (' or "auto"' if key == "gradient_accumulation_steps" else ""))
    clipping = user.get("gradient_clipping")
    if clipping is not None and not (_is_number(clipping) and clipping >= 0):
        bad("gradient_clipping", clipping, "a number >= 0 (0 disables clipping)")
    zero = user.get("zero_optimization")
    if zero is not None:
        if not isinstance(zero, dict):
            bad("zero_optimization", zero, 'an object such as {"stage": 2}')
        stage = zero.get("stage", 0)
        if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
            bad("zero_optimization.stage", stage, "0, 1, 2 or 3")
    block = user.get("optimizer")
    if block is None:
        return
    if not isinstance(block, dict) or not isinstance(block.get("type"), str):
        bad("optimizer", block, 'an object with a "type" string, such as {"type": "AdamWPMA", "params": {...}}')
    params = block.get("params") or {}
    if not isinstance(params, dict):
        bad("optimizer.params", params, "an object")
    ds_type = block["type"].lower()
    if ds_type in _PLAIN_JSON_KEYS:
        unknown = sorted(set(params) - _PLAIN_JSON_KEYS[ds_type])
        if unknown:
            raise ConfigError(f"optimizer.params key(s) {', '.join(map(repr, unknown))} in {source} are not taken "
                              f"by optimizer type {block['type']!r} (valid: {', '.join(sorted(_PLAIN_JSON_KEYS[ds_type]))})")
        for key in ("lr", "eps", "weight_decay"):
            if key in params and not _is_number(params[key]):
                bad(f"optimizer.params.{key}", params[key], "a number")
        betas = params.get("betas")
        if betas is not None and not (isinstance(betas, list) and len(betas) == 2 and all(map(_is_number, betas))):
            bad("optimizer.params.betas", betas, "a list of two numbers")
        return
    # a registered PMA type: the optimizer's own constructor checks (the very checks deepspeed.initialize runs)
    from pma_dist.deepspeed_integration import check_optimizer_params

    try:
        check_optimizer_params(block["type"], params, source=source)
    except (TypeError, ValueError) as exc:
        raise ConfigError(str(exc)) from None


def _check_optimizer(method: Method, period: int, params: dict, source: str) -> None:
    """The final optimizer settings (defaults < JSON < flags) through the method's own constructor, before any
    model loads: a bad beta, eps, lr or weight decay stops the run here, not after the engine is built."""
    stand_in = [torch.nn.Parameter(torch.zeros(1))]
    try:
        method.build(stand_in, period, **dict(params, betas=tuple(params["betas"])))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"--optimizer {method.name} with {params} (flags over {source}): {exc}") from None


def _method_of_json(ds_type: str, params: dict, gradient_accumulation: Optional[int]) -> Method:
    """The training method a DeepSpeed ``optimizer`` block describes."""
    if ds_type == "adamwpma":
        return get_method("adamw_pma_reference" if params.get("variant") == "reference" else "adamw_pma")
    if ds_type == "lionpma" and params.get("period", 8) != 1:
        return get_method("lion_pma")
    family = "lion" if ds_type in ("lionpma", "lion") else "adamw"
    return get_method(f"{family}_ga" if gradient_accumulation else family)


def resolve(argv: Optional[List[str]] = None) -> TrainConfig:
    args = build_parser().parse_args(argv)
    for name in ("micro_steps", "eval_size", "max_length", "eval_batch_size", "variance_window"):
        _positive("--" + name.replace("_", "-"), getattr(args, name))
    for name in ("period", "micro_batch_size", "log_every", "max_train_records", "variance_every"):
        _positive("--" + name.replace("_", "-"), getattr(args, name))
    for name in ("eval_every", "save_every", "keep_checkpoints", "select_size"):
        _positive("--" + name.replace("_", "-"), getattr(args, name), minimum=0)
    if not 0 <= args.warmup_fraction < 1:
        raise ConfigError(f"--warmup-fraction must be in [0, 1), got {args.warmup_fraction}")
    if not 0 <= args.max_degenerate_pairs <= 1:
        raise ConfigError(f"--max-degenerate-pairs must be a fraction in [0, 1], got {args.max_degenerate_pairs}")
    if args.resume and args.overwrite:
        raise ConfigError("--resume and --overwrite contradict each other: --resume continues the run in "
                          "--output-dir, --overwrite starts a new one; pass one of them")
    if args.collective_timeout is not None and not args.collective_timeout > 0:
        raise ConfigError(f"--collective-timeout must be > 0 seconds, got {args.collective_timeout}")
    if args.beta <= 0:
        raise ConfigError(f"--beta (DPO) must be > 0, got {args.beta}")
    if args.backend != "deepspeed":
        _check_torch_backend_flags(args)

    user = _load_json(args.deepspeed_config) if args.deepspeed_config else {}
    source = args.deepspeed_config or "the built-in defaults"
    ds = _merge(BASE_DS_CONFIG, user)
    ds.pop("train_batch_size", None)  # derived: micro batch x accumulation x ranks

    user_opt = user.get("optimizer", {}) or {}
    user_type = str(user_opt.get("type", "")).lower() if isinstance(user_opt, dict) else ""
    if user_type and user_type not in DS_TYPES:
        raise ConfigError(f"optimizer type {user_opt['type']!r} in {source} is not supported by train.py "
                          f"(expected AdamWPMA, LionPMA, AdamW or Lion)")
    _check_json_values(user, source)
    json_params = dict(user_opt.get("params") or {})
    user_ga = user.get("gradient_accumulation_steps")
    json_ga = user_ga if user_ga not in (None, "auto") and user_ga > 1 else None
    json_method = _method_of_json(user_type, json_params, json_ga) if user_type else None
    method = get_method(args.optimizer) if args.optimizer else (json_method or get_method("adamw_pma"))
    optimizer = method.name
    from_json = json_params if json_method is not None and json_method.family == method.family else {}

    json_period = json_params.get("period")
    # K keeps its meaning when --optimizer switches a GA config to PMA or back
    if method.accumulation == "plain":
        if args.period not in (None, 1):
            raise ConfigError(f"--period {args.period} with --optimizer {optimizer}: it steps on every micro-batch "
                              f"(no accumulation); for gradient accumulation over {args.period} micro-batches use "
                              f"--optimizer {method.family}_ga")
        period = 1
    elif args.period is not None:
        period = args.period
    elif method.is_pma:
        period = int(json_period or json_ga or 8)
    else:
        period = int(json_ga or json_period or 8)
    _positive("period K", period)
    if method.is_pma and args.optimizer is None and user_ga not in (None, "auto", 1):
        raise ConfigError(f"gradient_accumulation_steps={user_ga} in {source} with a PMA optimizer: PMA steps on "
                          f"every micro-batch; set it to 1 and give the period K as optimizer.params.period "
                          f"or --period")
    ds["gradient_accumulation_steps"] = method.schedule(period).accumulation

    params = dict(FAMILY_DEFAULTS[method.family])
    params.update({k: v for k, v in from_json.items() if k not in ("period", "variant", "torch_adam")})
    for key, value in (("lr", args.lr), ("betas", args.betas), ("eps", args.eps),
                       ("weight_decay", args.weight_decay)):
        if value is not None:
            params[key] = list(value) if key == "betas" else value
    if method.family == "lion":
        params.pop("eps", None)
    if args.lr_decay is not None:
        if not method.is_pma and args.lr_decay != "none":
            raise ConfigError(f"--lr-decay {args.lr_decay} with --optimizer {optimizer}: the periodic decay acts on "
                              f"PMA's small steps within a period; use a PMA method (adamw_pma, adamw_pma_reference, "
                              f"lion_pma) or drop the flag")
        if method.is_pma:
            params["lr_decay"] = args.lr_decay
    if not float(params["lr"]) > 0:
        raise ConfigError(f"learning rate must be > 0, got lr={params['lr']}")
    _check_optimizer(method, period, params, source)

    if args.micro_batch_size is not None:
        ds["train_micro_batch_size_per_gpu"] = args.micro_batch_size
    if args.zero_stage is not None:
        ds.setdefault("zero_optimization", {})["stage"] = args.zero_stage
    if args.gradient_clipping is not None:
        ds["gradient_clipping"] = args.gradient_clipping
    if args.comm_profile:
        ds["comm_profile"] = {"enabled": True, "output_dir": args.comm_profile}
    try:
        comm_profile = parse_comm_profile(ds.get("comm_profile"))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: {exc}") from None
    _positive("train_micro_batch_size_per_gpu", ds["train_micro_batch_size_per_gpu"])

    stage3 = ds.get("zero_optimization", {}).get("stage", 0) == 3 and args.backend == "deepspeed"
    if args.nonfinite == "skip" and stage3:
        raise ConfigError("--nonfinite skip needs one optimizer step() per rank and micro-step; ZeRO-3 steps once per "
                          "sub-group: use --nonfinite stop or ZeRO stage 0-2")
    guard_applies = method.deepspeed_type != "AdamW"  # torch.optim.AdamW (adamw, adamw_ga) has no guard
    if args.nonfinite == "skip" and not guard_applies:
        raise ConfigError(f"--nonfinite skip: --optimizer {optimizer} is torch.optim.AdamW, which has no non-finite "
                          f"guard; use --nonfinite stop")
    nonfinite = args.nonfinite or ("skip" if guard_applies and not stage3 else "stop")

    log_every = args.log_every or period
    schedule = method.schedule(period)
    if schedule.accumulation > 1:
        # a GA run can only stop, save or be compared at an optimizer-step boundary
        for flag, value in (("--micro-steps", args.micro_steps), ("--save-every", args.save_every)):
            if not schedule.is_step_boundary(value):
                raise ConfigError(f"{flag} {value} is not a multiple of K={period}: the {optimizer} baseline "
                                  f"steps once per {period} micro-batches")
    if args.save_every and args.save_every % log_every:
        raise ConfigError(f"--save-every {args.save_every} must be a multiple of the train-log interval "
                          f"{log_every} so a resumed run continues the same metrics")

    model = args.model
    fallback = model == FALLBACK
    if model is None:
        fallback = not DEFAULT_MODEL.exists()
        model = FALLBACK if fallback else str(DEFAULT_MODEL)
    train_data = args.train_data
    if train_data is None:
        train_data = str(DEFAULT_DATA[args.task]) if not fallback and DEFAULT_DATA[args.task].exists() else FALLBACK
    if fallback and args.model is None and args.train_data is not None:
        raise ConfigError(f"--train-data {train_data} given but no model: pass --model (the fallback model has "
                          f"a character tokenizer meant only for the built-in synthetic task)")
    # the backend-independent settings are typed fields; the DeepSpeed dict exists only for DeepSpeed
    return TrainConfig(settings=JobSettings.from_namespace(args), optimizer=optimizer, period=period, optimizer_params=params,
                       ds_config=ds if args.backend == "deepspeed" else None,
                       micro_batch_size=int(ds["train_micro_batch_size_per_gpu"]),
                       gradient_clipping=float(ds.get("gradient_clipping", 0.0)),
                       model=model, train_data=train_data, eval_data=args.eval_data, fallback=fallback,
                       log_every=log_every, comm_profile=comm_profile, nonfinite=nonfinite)
