"""The post-training loop: one micro-batch per micro-step, for PMA and GA alike, under DeepSpeed, FSDP2 or DDP.

``run(cfg)`` does one whole job (``prepare`` -> ``train_loop`` -> ``finish``: load, train, evaluate,
checkpoint, log) and returns a summary;
``launch/train.py`` calls it once, ``benchmarks/post_training.py`` calls it for many runs inside
one launch. All data, config and checkpoint problems are raised before the first training step.
The loop talks to the backend only through :mod:`recipes.posttrain.backends`.
"""
from __future__ import annotations

import copy
import json
import math
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from pma_dist import distributed

from . import checkpoints, data, fallback, lr_schedule, peak_memory, reference, run_dir, sharded_load, token_cache
from .backends import DeepSpeedBackend, build_torch_backend
from .config import FALLBACK, ConfigError, TrainConfig
from .losses import dpo_terms, sequence_logprobs, sft_loss, sft_loss_terms
from .metrics import MetricsLog, UpdateVariance
from .zero_memory import with_zero3_bounds


# ------------------------------------------------------------------------------ setup
def _say(rank: int, message: str) -> None:
    if rank == 0:
        print(message, flush=True)


def training_dtype(cfg: TrainConfig) -> torch.dtype:
    """The dtype the weights are loaded in: the DeepSpeed config's ``bf16`` / ``fp16`` section, else fp32.

    DeepSpeed's bf16/fp16 engines keep their own fp32 master copy in the optimizer, so loading the
    module in fp32 first would only add a transient full-precision copy. FSDP2 and DDP runs train in fp32.
    """
    ds = cfg.ds_config if cfg.settings.backend == "deepspeed" else {}
    if (ds.get("bf16") or {}).get("enabled"):
        return torch.bfloat16
    if (ds.get("fp16") or {}).get("enabled"):
        return torch.float16
    return torch.float32


def zero3_enabled(cfg: TrainConfig) -> bool:
    return cfg.settings.backend == "deepspeed" and int((cfg.ds_config.get("zero_optimization") or {}).get("stage", 0)) == 3


def load_model_and_tokenizer(cfg: TrainConfig):
    """The model in the training dtype, and its tokenizer.

    Under FSDP2 the parameters are created on the meta device and filled shard by shard after
    ``fully_shard`` (:mod:`recipes.posttrain.sharded_load`). Under ZeRO-3 the model is built inside
    ``deepspeed.zero.Init`` (transformers does so while an
    ``HfDeepSpeedConfig`` is alive): every parameter is partitioned as it is created, rank 0 reads the
    checkpoint and each layer is gathered, filled and re-partitioned in turn, so no rank ever holds the
    whole model. The config object lives only for this load: a later job of the same process (a
    benchmark) may not be ZeRO-3.
    """
    if cfg.fallback:
        tokenizer = fallback.char_tokenizer()
        return fallback.tiny_llama(len(tokenizer), cfg.settings.seed), tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    trust = cfg.settings.trust_remote_code
    zero3_config = None
    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.model, trust_remote_code=trust)
        if zero3_enabled(cfg):
            from transformers.integrations import HfDeepSpeedConfig

            # the optimizer section is not needed to partition parameters (and may name a client optimizer)
            zero3_config = HfDeepSpeedConfig(deepspeed_config(cfg, uses_client_optimizer=True))
        if cfg.settings.backend == "fsdp":  # parameters on the meta device; build_backend fills the shards
            model = sharded_load.meta_model(cfg.model, training_dtype(cfg), trust)
        else:
            model = AutoModelForCausalLM.from_pretrained(cfg.model, trust_remote_code=trust, dtype=training_dtype(cfg))
    except Exception as exc:  # bad path, offline hub, remote code refused: all end the run here, clearly
        raise ConfigError(f"could not load model {cfg.model!r}: {type(exc).__name__}: {exc}") from None
    finally:
        del zero3_config  # transformers holds only a weak reference: ZeRO-3 loading ends here
    return model, tokenizer


def pad_id(tokenizer) -> int:
    # models like stories260K define no pad token; padded positions are masked out of attention
    # and loss, so any id works: use pad, else eos, else unk
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id):
        if candidate is not None:
            return candidate
    return 0


@dataclass
class Datasets:
    train: data.TokenisedSet
    eval: data.TokenisedSet
    select: Optional[data.TokenisedSet] = None  # --select-size: the split hyper-parameters are chosen on

    def splits(self) -> dict:
        """The sets by split name, those that exist (the token cache's layout)."""
        return {name: tset for name, tset in vars(self).items() if tset is not None}


_DATASETS: dict = {}  # a benchmark runs many jobs in one process: tokenise each data set once


def load_datasets(cfg: TrainConfig, tokenizer) -> Datasets:
    """The tokenised train, eval (and select) sets: from this process's memory, else tokenised once per run
    (rank 0; the other ranks read its cache file, see :mod:`recipes.posttrain.token_cache`). Collective."""
    args = cfg.settings
    key = (cfg.model, cfg.train_data, cfg.eval_data, args.task, args.eval_size, args.select_size, args.max_train_records,
           args.max_length, args.overlong, args.max_degenerate_pairs)
    if key not in _DATASETS:
        _DATASETS.clear()
        rank = dist.get_rank() if dist.is_initialized() else 0

        def build() -> dict:
            return _load_datasets(cfg, tokenizer).splits()

        sets = token_cache.load_once(build, Path(args.output_dir) / token_cache.FILE,
                                     token_cache.fingerprint(cfg, tokenizer), distributed.rank_info().local_rank,
                                     say=lambda message: _say(rank, message))
        _DATASETS[key] = Datasets(train=sets["train"], eval=sets["eval"], select=sets.get("select"))
    return _DATASETS[key]


def _load_datasets(cfg: TrainConfig, tokenizer) -> Datasets:
    args = cfg.settings
    if cfg.train_data == FALLBACK:
        records = fallback.synthetic_records(args.task, 4096 + args.eval_size + args.select_size, seed=1234)
        source = "built-in synthetic fallback task"
    else:
        records = data.load_records(cfg.train_data, args.task)
        source = cfg.train_data
    select_records = []
    if cfg.eval_data:
        train_records, eval_records = records, data.load_records(cfg.eval_data, args.task)
        eval_source = cfg.eval_data
        if args.select_size:
            train_records, select_records = data.holdout_split(records, args.select_size)
    else:
        train_records, eval_records, select_records = data.holdout_splits(records, args.eval_size, args.select_size)
        eval_source = f"{source} (held-out {args.eval_size})"
    if args.max_train_records:
        train_records = train_records[: args.max_train_records]
    tok = data.Tokeniser(tokenizer, args.max_length, args.overlong, args.max_degenerate_pairs)
    encode = tok.sft if args.task == "sft" else tok.dpo
    select = encode(select_records, f"{source} (select split, held-out {args.select_size})") if select_records else None
    return Datasets(train=encode(train_records, source), eval=encode(eval_records, eval_source), select=select)


def make_client_optimizer(cfg: TrainConfig, parameters):
    """The optimizer object handed to ``deepspeed.initialize``, or None when the config names it.

    Every method's DeepSpeed ``optimizer`` block comes from the method table; the PMA types resolve
    through ``pma_dist.deepspeed_integration``'s registration when it is installed, else they are built here.
    """
    if cfg.method.deepspeed_type == "AdamW" or _config_knows_pma():
        return None
    params = dict(cfg.optimizer_params, betas=tuple(cfg.optimizer_params["betas"]))
    return cfg.method.build(parameters, cfg.period, **params)


def _config_knows_pma() -> bool:
    try:
        import pma_dist.deepspeed_integration  # noqa: F401  (registers the config types)
    except ImportError:
        return False
    return True


def deepspeed_config(cfg: TrainConfig, uses_client_optimizer: bool) -> dict:
    ds = with_zero3_bounds(cfg.ds_config)  # a copy
    if uses_client_optimizer:
        ds.pop("optimizer", None)
    else:
        ds.update(cfg.method.deepspeed_config(cfg.period, cfg.optimizer_params))
    return ds


def optimizer_step_count(opt) -> int:
    """Optimizer steps as the optimizer itself counted them (independent of the backend's counter)."""
    steps = [g["step"] for g in opt.param_groups if isinstance(g.get("step"), int)]
    if steps:
        return max(steps)
    counts = [int(s["step"]) for s in opt.state.values() if "step" in s]
    return max(counts) if counts else 0


def last_layer(model) -> torch.nn.Parameter:
    head = model.get_output_embeddings()
    return head.weight if head is not None else list(model.parameters())[-1]


def _full_weight(param) -> torch.Tensor:
    if hasattr(param, "full_tensor"):  # an FSDP2 DTensor shard: all-gather (every rank calls it)
        return param.detach().full_tensor()
    if hasattr(param, "ds_id"):  # ZeRO-3 partitions it: gather (a collective, every rank calls it)
        from deepspeed.utils import safe_get_full_fp32_param

        return safe_get_full_fp32_param(param)
    return param.detach()


# ------------------------------------------------------------------------------ loop pieces
class Objective:
    """Loss of a batch for the task; for DPO, ``reference`` gives the frozen reference's log-probabilities
    (:mod:`recipes.posttrain.reference`: cached ones by default, or a model copy)."""

    def __init__(self, task: str, beta: float, reference=None):
        self.task, self.beta, self.reference = task, beta, reference

    def loss(self, engine, batch):
        logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        if self.task == "sft":
            return sft_loss(logits, batch["labels"])
        return self._dpo(logits, batch).loss.mean()

    def _dpo(self, logits, batch):
        logp = sequence_logprobs(logits, batch["labels"])
        ref = self.reference.logprobs(batch).to(logp.dtype)
        n = logp.shape[0] // 2
        return dpo_terms(logp[:n], logp[n:], ref[:n], ref[n:], self.beta)

    @torch.no_grad()
    def eval_sums(self, module, batch) -> torch.Tensor:
        """Summable eval statistics: SFT (nll sum, tokens); DPO (loss sum, pairs, logp acc, reward acc)."""
        logits = module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        if self.task == "sft":
            total, count = sft_loss_terms(logits, batch["labels"])
            return torch.stack([total.double(), count.double()])
        t = self._dpo(logits, batch)
        return torch.stack([t.loss.sum().double(), torch.tensor(float(t.loss.numel()), dtype=torch.float64),
                            t.logp_accuracy.sum().double(), t.reward_accuracy.sum().double()])


def _to_device(batch, device):
    return {k: v.to(device) for k, v in batch.items()}


def _all_reduce_sum(values: torch.Tensor, device) -> torch.Tensor:
    # plain torch.distributed, so metric traffic is not billed to the training's comm ledger
    values = values.to(device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(values)
    return values.cpu()


def evaluate(engine, objective: Objective, examples, cfg: TrainConfig, pad: int, device) -> dict:
    engine.eval()
    rank, world = dist.get_rank(), dist.get_world_size()
    width = 2 if cfg.settings.task == "sft" else 4
    sums = torch.zeros(width, dtype=torch.float64)
    for chunk, counts in data.lockstep_eval_batches(examples, cfg.settings.eval_batch_size, rank, world):
        # the bare module, not engine(): evaluation is not a training micro-step (the comm ledger
        # and DeepSpeed's own counters start one per engine forward); ZeRO-3's and FSDP2's gather
        # hooks live on the module, so this works for every backend
        result = objective.eval_sums(engine.module, _to_device(data.collate(chunk, cfg.settings.task, pad), device)).cpu()
        if counts:
            sums += result
    sums = _all_reduce_sum(sums, device)
    engine.train()
    if cfg.settings.task == "sft":
        return {"eval_loss": (sums[0] / sums[1]).item(), "eval_tokens": int(sums[1])}
    return {"eval_loss": (sums[0] / sums[1]).item(), "eval_accuracy": (sums[2] / sums[1]).item(),
            "eval_reward_accuracy": (sums[3] / sums[1]).item(), "eval_pairs": int(sums[1])}


# ------------------------------------------------------------------------------ the job
def run(cfg: TrainConfig) -> dict:
    """One whole job: :func:`prepare` (every input checked, model and backend built), :func:`train_loop`,
    :func:`finish` (final evaluation, ``summary.json``, backend released)."""
    job = prepare(cfg)
    return finish(job, train_loop(job))


@dataclass
class Job:
    """A prepared run: its inputs, its backend, where it starts, and how it writes metrics and checkpoints."""

    cfg: TrainConfig
    rank: int
    world: int
    out: Path
    ckpt_dir: Path
    resume_tag: Optional[str]
    sets: Datasets
    order: data.MicroBatchOrder
    pad: int
    engine: object  # a recipes.posttrain.backends backend
    device: torch.device
    objective: "Objective"
    metrics: MetricsLog
    variance: Optional[UpdateVariance]
    head: Optional[torch.nn.Parameter] = None  # the layer whose update variance is measured
    start: int = 0
    wall: float = 0.0
    lineage: str = ""  # one run and its resumptions: checkpoint rotation deletes only this lineage's tags
    watchdog: Optional[distributed.Watchdog] = None
    tokenizer: object = None  # --save-model writes it beside the weights

    @property
    def common(self) -> dict:
        args = self.cfg.settings
        return dict(task=args.task, optimizer=self.cfg.optimizer, period=self.cfg.period, fallback=self.cfg.fallback,
                    backend=args.backend)

    @property
    def skipped_steps(self) -> int:
        """Optimizer steps the non-finite guard skipped, all runs of the lineage together."""
        return int(getattr(self.engine.optimizer, "nonfinite_steps_skipped", 0))

    @property
    def samples_per_micro(self) -> int:
        return self.cfg.micro_batch_size * self.world

    def stamp(self, micro_step: int) -> dict:
        return dict(micro_step=micro_step, optimizer_steps=self.engine.global_steps,
                    samples=micro_step * self.samples_per_micro, wall_clock=round(self.wall, 4), **self.common)

    def evaluate(self, micro_step: int) -> dict:
        result = evaluate(self.engine, self.objective, self.sets.eval.examples, self.cfg, self.pad, self.device)
        # the select split chooses hyper-parameters by the final loss: it is scored at the end only
        if self.sets.select is not None and micro_step == self.cfg.settings.micro_steps:
            selected = evaluate(self.engine, self.objective, self.sets.select.examples, self.cfg, self.pad, self.device)
            result.update({"select_" + key.removeprefix("eval_"): value for key, value in selected.items()})
        self.metrics.write(kind="eval", **self.stamp(micro_step), **result)
        return result

    def save(self, micro_step: int) -> None:
        tag = f"micro{micro_step:08d}"
        state = {"micro_step": micro_step, "wall_clock": self.wall, "identity": self.cfg.identity(),
                 "reapplied": self.cfg.reapplied(), "lineage": self.lineage,
                 "nonfinite_steps_skipped": self.skipped_steps}
        self.engine.save(self.ckpt_dir, tag, state)
        dist.barrier()
        checkpoints.write_manifest(self.ckpt_dir / tag, state, collective=True)  # each rank hashes its share
        if self.rank == 0:
            checkpoints.publish(self.ckpt_dir, tag, self.cfg.settings.keep_checkpoints, self.lineage)
        dist.barrier()


def _join_process_group(backend: str, timeout_s: Optional[float]) -> None:
    if dist.is_initialized():
        return
    if backend == "deepspeed":
        import deepspeed

        deepspeed.init_distributed(timeout=distributed.collective_timeout(timeout_s))
    else:
        from pma_dist.torch_parallel import init_process_group

        init_process_group(timeout=timeout_s)


def _checked_resume_point(cfg: TrainConfig, ckpt_dir: Path, rank: int):
    """(tag, manifest state) of the checkpoint to resume, verified against this run; (None, {}) to start anew."""
    if not cfg.settings.resume:
        return None, {}
    tag = checkpoints.latest_tag(ckpt_dir) if ckpt_dir.exists() else None
    if tag is None:
        _say(rank, f"--resume: no verified checkpoint in {ckpt_dir}; starting from scratch")
        return None, {}
    try:  # collective: each rank checks its share of the files, all raise the same error
        state = checkpoints.verify(ckpt_dir / tag, collective=True)
    except checkpoints.CheckpointError as exc:
        hint = checkpoints.older_intact_hint(ckpt_dir, tag, collective=True)
        raise checkpoints.CheckpointError(f"{exc}{hint}") from None
    # checkpoints from before the FSDP/DDP backends carry no format: they are DeepSpeed's; keys added to the
    # identity later are compared only where the checkpoint has them
    saved = dict({"checkpoint_format": "deepspeed"}, **state.get("identity", {}))
    differ = [f"{key}={saved[key]!r} (this run: {value!r})" for key, value in cfg.identity().items()
              if key in saved and saved[key] != value]
    if differ:
        raise checkpoints.CheckpointError(
            f"checkpoint {ckpt_dir / tag} was written with {', '.join(differ)}: these change the math or the data, "
            f"so --resume needs the checkpoint's values; to train with the new ones start a new run "
            f"(--overwrite, or another --output-dir)")
    return tag, state


def _reapply_after_load(job: Job, saved: dict) -> None:
    """The resumed run trains with its own lr / weight decay (the loaded param groups carry the old ones)."""
    now = job.cfg.reapplied()
    for group in job.engine.optimizer.param_groups:
        group["lr"] = now["lr"]
        if "weight_decay" in group:
            group["weight_decay"] = now["weight_decay"]
    for key, value in now.items():
        if key in saved and saved[key] != value:
            _say(job.rank, f"--resume: {key} {saved[key]!r} -> {value!r} (this run's value applied; the "
                           f"checkpoint was trained with {saved[key]!r})")


def prepare(cfg: TrainConfig) -> Job:
    """Everything before the first training step; every problem with the inputs is raised here."""
    from deepspeed.accelerator import get_accelerator

    args = cfg.settings
    run_dir.check(cfg)  # outputs writable, no other run in --output-dir: before any process group or model
    try:
        distributed.collective_timeout(args.collective_timeout)
    except ValueError as exc:  # a bad $PMA_DIST_COLLECTIVE_TIMEOUT
        raise ConfigError(str(exc)) from None
    if get_accelerator().device_name() == "cpu":
        peak_memory.bound_host_allocator()  # host RSS then tracks live tensors (see peak_memory)
    _join_process_group(args.backend, args.collective_timeout)
    watchdog = distributed.start_watchdog(args.collective_timeout)
    rank, world = dist.get_rank(), dist.get_world_size()
    out = Path(args.output_dir)
    ckpt_dir = out / "checkpoints"
    if cfg.fallback or cfg.train_data == FALLBACK:
        _say(rank, fallback.FALLBACK_BANNER)

    resume_tag, resume_state = _checked_resume_point(cfg, ckpt_dir, rank)
    if resume_tag is None and rank == 0:  # --overwrite, or --resume with nothing to resume: keep the old files
        moved = run_dir.set_aside(out)
        if moved is not None:
            _say(rank, f"the previous run's files in {out} moved to {moved}")
    dist.barrier()
    torch.manual_seed(args.seed)
    model, tokenizer = load_model_and_tokenizer(cfg)
    sets = load_datasets(cfg, tokenizer)
    _say(rank, sets.train.report())
    _say(rank, sets.eval.report())
    if sets.select is not None:
        _say(rank, sets.select.report())
    order = data.MicroBatchOrder(len(sets.train.examples), cfg.micro_batch_size, world, args.seed)

    copied = None
    if args.task == "dpo" and cfg.dpo_reference == "copy":
        if zero3_enabled(cfg) or args.backend == "fsdp":
            raise ConfigError(f"--dpo-reference copy with {'ZeRO-3' if zero3_enabled(cfg) else '--backend fsdp'}: "
                              f"the model is loaded sharded, so a copy would hold placeholders, not weights; use "
                              f"--dpo-reference cached (the default)")
        copied = copy.deepcopy(model).eval().requires_grad_(False)
    engine = build_backend(cfg, model)
    if cfg.nonfinite == "skip":
        engine.optimizer.skip_nonfinite = True  # a PMAOptimizer: resolve() refused the others
    device = torch.device(get_accelerator().current_device_name())
    ref_source = dpo_reference(cfg, engine.module, copied, sets, order, rank, world, pad_id(tokenizer), device, out)

    job = Job(cfg=cfg, rank=rank, world=world, out=out, ckpt_dir=ckpt_dir, resume_tag=resume_tag, sets=sets,
              order=order, pad=pad_id(tokenizer), engine=engine, device=device,
              objective=Objective(args.task, args.beta, ref_source),
              metrics=MetricsLog(out / "metrics.jsonl", enabled=rank == 0),
              variance=(UpdateVariance(args.variance_every or cfg.period, args.variance_window)
                        if args.log_update_variance else None),
              lineage=resume_state.get("lineage") or uuid.uuid4().hex, watchdog=watchdog, tokenizer=tokenizer)
    if resume_tag is not None:
        note = job.metrics.truncate_after(int(resume_state["micro_step"]))  # before loading: a bad log fails fast
        engine.load(ckpt_dir, resume_tag)
        job.start, job.wall = int(resume_state["micro_step"]), float(resume_state["wall_clock"])
        _reapply_after_load(job, resume_state.get("reapplied", {}))
        if cfg.nonfinite == "skip":
            engine.optimizer.nonfinite_steps_skipped = int(resume_state.get("nonfinite_steps_skipped", 0))
        if note:
            _say(rank, note)
        _say(rank, f"resumed from {ckpt_dir / resume_tag} at micro-step {job.start}")
    job.head = last_layer(engine.module)
    if job.variance is not None:
        job.variance.observe(_full_weight(job.head))
    return job


def dpo_reference(cfg: TrainConfig, module, copied, sets: Datasets, order, rank: int, world: int, pad: int,
                  device, out: Path):
    """The DPO reference (None for SFT): ``copied`` moved to the device, or the initial policy ``module``'s
    log-probabilities over every batch the run will score, cached under ``out`` (before any checkpoint
    is loaded, so it is the initial model even on ``--resume``)."""
    if cfg.settings.task != "dpo":
        return None
    if copied is not None:
        return reference.ModelReference(copied.to(device))
    args = cfg.settings

    def batches():
        yield from reference.training_batches(sets.train.examples, order, args.micro_steps, rank, pad)
        yield from reference.eval_batches(sets.eval.examples, args.eval_batch_size, rank, world, pad)
        if sets.select is not None:
            yield from reference.eval_batches(sets.select.examples, args.eval_batch_size, rank, world, pad)

    dtype = next(module.parameters()).dtype
    key = reference.fingerprint(cfg.model, dtype, world=world, micro_batch_size=cfg.micro_batch_size,
                                eval_batch_size=args.eval_batch_size, seed=args.seed, max_length=args.max_length,
                                overlong=args.overlong, backend=args.backend)
    return reference.precompute(module, batches, device, out / "reference_logprobs" / f"rank{rank}.pt", key)


def train_loop(job: Job) -> Optional[dict]:
    """Micro-steps ``job.start .. --micro-steps``: train, log, evaluate and save on schedule; the last eval."""
    cfg, args, engine = job.cfg, job.cfg.settings, job.engine
    last_eval = job.evaluate(job.start) if job.start == 0 else None
    progress = None
    if job.rank == 0 and not args.no_progress:
        from tqdm import tqdm

        progress = tqdm(total=args.micro_steps, initial=job.start, desc=f"{args.task} {cfg.optimizer} K={cfg.period}",
                        unit="micro", mininterval=2.0, dynamic_ncols=True)
    # the window's losses stay on the device ([sum of finite losses, their count, non-finite count]): reading
    # a loss to the host every micro-step would synchronise an accelerator that often; it is read at log time
    window = torch.zeros(3, dtype=torch.float64, device=job.device)
    engine.train()
    peak_lr, warmup = cfg.optimizer_params["lr"], lr_schedule.warmup_steps(args.micro_steps, args.warmup_fraction)
    for micro in range(job.start, args.micro_steps):
        began = time.perf_counter()
        if args.lr_schedule != "constant":
            lr_schedule.apply(engine.optimizer, peak_lr, args.lr_schedule, micro, args.micro_steps, warmup)
        chunk = [job.sets.train.examples[i] for i in job.order.indices(micro, job.rank)]
        batch = _to_device(data.collate(chunk, args.task, job.pad), job.device)
        if job.watchdog is not None:
            job.watchdog.progress = f"micro-step {micro}"
        loss = engine.micro_step(lambda model: job.objective.loss(model, batch))
        job.wall += time.perf_counter() - began
        # a non-finite loss was skipped by the guard (--nonfinite skip), or stops the run at the log line
        finite = torch.isfinite(loss.detach()).to(torch.float64)
        window += torch.stack([torch.nan_to_num(loss.detach().to(torch.float64)) * finite, finite, 1 - finite])
        done = micro + 1
        if progress is not None:
            progress.update(1)
        if job.variance is not None and job.variance.due(done):
            stats = job.variance.observe(_full_weight(job.head))
            if stats is not None:
                local_sum, local_n, _ = window.tolist()
                job.metrics.write(kind="update_variance", **job.stamp(done),
                                  train_loss=local_sum / max(local_n, 1), **stats)
        if done % cfg.log_every == 0 or done == args.micro_steps:
            local_nonfinite = int(window[2].item())
            if local_nonfinite and cfg.nonfinite == "stop":
                raise FloatingPointError(f"train loss was not finite in {local_nonfinite} micro-step(s) up to "
                                         f"micro-step {done} on rank {job.rank}: lower --lr (or pass --nonfinite "
                                         f"skip to skip such steps)")
            mean = _all_reduce_sum(window[:2].clone(), job.device)
            train_loss = (mean[0] / mean[1]).item() if mean[1] > 0 else float("nan")
            if not math.isfinite(train_loss):
                raise FloatingPointError(f"train loss is {train_loss} at micro-step {done} (no finite micro-batch "
                                         f"loss since the last log line): lower --lr")
            job.metrics.write(kind="train", **job.stamp(done), train_loss=train_loss,
                              lr=engine.optimizer.param_groups[0]["lr"], nonfinite_steps_skipped=job.skipped_steps)
            if progress is not None:
                progress.set_postfix(loss=f"{train_loss:.3f}", refresh=False)
            window.zero_()
        if (args.eval_every and done % args.eval_every == 0) or done == args.micro_steps:
            last_eval = job.evaluate(done)
        if args.save_every and (done % args.save_every == 0 or done == args.micro_steps):
            job.save(done)
    if progress is not None:
        progress.close()
    return last_eval


def finish(job: Job, last_eval: Optional[dict]) -> dict:
    """The final evaluation if the loop ran none, ``summary.json`` (rank 0), and the backend released."""
    cfg, args = job.cfg, job.cfg.settings
    if last_eval is None:
        last_eval = job.evaluate(args.micro_steps)
    summary = dict(job.common, micro_steps=args.micro_steps, optimizer_steps=optimizer_step_count(job.engine.optimizer),
                   engine_global_steps=job.engine.global_steps, world_size=job.world,
                   micro_batch_size=cfg.micro_batch_size, samples=args.micro_steps * job.samples_per_micro,
                   wall_clock=job.wall, seed=args.seed, **ran_with(job), model=cfg.model, train_data=cfg.train_data,
                   train_records=len(job.sets.train.examples), truncated=job.sets.train.truncated,
                   skipped=job.sets.train.skipped, resumed_from=job.resume_tag, nonfinite=cfg.nonfinite,
                   nonfinite_steps_skipped=job.skipped_steps, **last_eval, **peak_memory.peak_per_rank(job.device))
    if job.rank == 0:
        (job.out / "summary.json").write_text(json.dumps(summary, indent=1))
    if args.save_model:
        save_model(job)
    job.engine.release()
    return summary


def save_model(job: Job) -> None:
    """``--save-model``: the final weights as a Hugging Face model directory (rank 0 writes it)."""
    target = Path(job.cfg.settings.save_model)
    state = job.engine.full_state_dict()  # collective: every rank takes part
    if job.rank == 0:
        target.mkdir(parents=True, exist_ok=True)
        module = job.engine.module
        module = getattr(module, "module", module)  # DDP wraps the model
        module.save_pretrained(target, state_dict=state, safe_serialization=True)
        job.tokenizer.save_pretrained(target)
        _say(job.rank, f"final model written to {target}")
    dist.barrier()


def ran_with(job: Job) -> dict:
    """The hyper-parameters the optimizer actually stepped with (read from it, not from the flags)."""
    group = job.engine.optimizer.param_groups[0]
    betas = group.get("betas")
    args = job.cfg.settings
    # under a schedule the group holds the last step's rate; the run's lr is the schedule's peak
    lr = group["lr"] if args.lr_schedule == "constant" else job.cfg.optimizer_params["lr"]
    schedule = dict(lr_schedule=args.lr_schedule, last_lr=group["lr"], lr_decay=group.get("lr_decay"),
                    warmup_fraction=args.warmup_fraction if args.lr_schedule != "constant" else None)
    return dict(lr=lr, **schedule, betas=list(betas) if betas is not None else None, eps=group.get("eps"),
                weight_decay=group.get("weight_decay"), variant=group.get("variant", job.cfg.method.variant),
                optimizer_period=group.get("period"),
                gradient_clipping=job.cfg.reapplied()["gradient_clipping"])


def build_backend(cfg: TrainConfig, model):
    """The model wrapped for ``--backend``, with its optimizer (see :mod:`recipes.posttrain.backends`)."""
    if cfg.settings.backend != "deepspeed":
        meta = sharded_load.is_meta(model)
        backend = build_torch_backend(cfg, model)
        if meta:
            from deepspeed.accelerator import get_accelerator

            sharded_load.fill_from_checkpoint(backend.module, cfg.model,
                                              torch.device(get_accelerator().current_device_name()))
        return backend
    import deepspeed

    client = make_client_optimizer(cfg, [p for p in model.parameters() if p.requires_grad])
    ds_config = deepspeed_config(cfg, client is not None)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=client, config=ds_config,
                                           model_parameters=[p for p in model.parameters() if p.requires_grad])
    return DeepSpeedBackend(engine, trust_checkpoint=cfg.settings.trust_checkpoint)
