"""Pretrain a small Llama base model on plain text, so that SFT/DPO benchmarks start from a base model.

stories260K (the only real pretrained LM in ``../shared/data``) has seen nothing but children's
stories, so fine-tuning it on instructions is closer to domain adaptation than to post-training.
This recipe trains a few-million-parameter Llama (the stories260K tokenizer, 512 pieces) on the
English text in ``../shared/data/text`` (Wikipedia articles and Shakespeare) with AdamW, warm-up
and cosine decay under DeepSpeed ZeRO-0, and writes a Hugging Face model directory that
``launch/train.py --model`` and ``benchmarks/post_training.py --base`` read.

    deepspeed --num_gpus 2 launch/pretrain_base.py --output-dir runs/base_3m

The text is tokenised per document (one line of the Wikipedia file is an article; the Shakespeare
file is one document), each document ends with EOS, and the stream is cut into ``--seq-len``
chunks. The last ``--val-fraction`` of every file's tokens is held out; the held-out loss is
logged to ``pretrain_log.jsonl`` and the final numbers to ``pretrain_summary.json`` next to the model.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import List, Optional, Sequence

import torch
import torch.distributed as dist

from .config import SHARED_DATA, ConfigError

DEFAULT_TEXT = [SHARED_DATA / "text" / "wiki_demo_train.txt", SHARED_DATA / "text" / "tinyshakespeare_train.txt"]
DEFAULT_TOKENIZER = SHARED_DATA / "models" / "stories260K"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Pretrain a small Llama base model on plain text (see docs/training.md).")
    p.add_argument("--text", nargs="+", default=[str(f) for f in DEFAULT_TEXT],
                   help="UTF-8 text files; in a file with many lines each non-empty line is a document")
    p.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER), help="HF tokenizer dir or hub name")
    p.add_argument("--output-dir", default="runs/base_3m")
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--intermediate-size", type=int, default=688)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--micro-batch-size", type=int, default=8, help="sequences per rank per step")
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine decays to lr x this")
    p.add_argument("--warmup-steps", type=int, default=50)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--gradient-clipping", type=float, default=1.0)
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--eval-every", type=int, default=100, help="optimizer steps between held-out evaluations")
    p.add_argument("--max-chars", type=int, default=None, help="read only the first N characters of each file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def check_args(args: argparse.Namespace) -> None:
    for name in ("hidden_size", "layers", "heads", "kv_heads", "intermediate_size", "seq_len",
                 "micro_batch_size", "warmup_steps", "eval_every"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.hidden_size % args.heads:
        raise ConfigError(f"--hidden-size {args.hidden_size} is not a multiple of --heads {args.heads}")
    if args.heads % args.kv_heads:
        raise ConfigError(f"--heads {args.heads} is not a multiple of --kv-heads {args.kv_heads}")
    if not args.epochs > 0:
        raise ConfigError(f"--epochs must be > 0, got {args.epochs}")
    if args.max_steps is not None and args.max_steps < 1:
        raise ConfigError(f"--max-steps must be >= 1, got {args.max_steps}")
    if not args.lr > 0:
        raise ConfigError(f"--lr must be > 0, got {args.lr}")
    if not 0 <= args.min_lr_ratio <= 1:
        raise ConfigError(f"--min-lr-ratio must be in [0, 1], got {args.min_lr_ratio}")
    if not 0 < args.val_fraction < 0.5:
        raise ConfigError(f"--val-fraction must be in (0, 0.5), got {args.val_fraction}")
    if args.max_chars is not None and args.max_chars < 1:
        raise ConfigError(f"--max-chars must be >= 1, got {args.max_chars}")
    for path in args.text:
        if not Path(path).is_file():
            raise ConfigError(f"--text file not found: {path}")


def documents(path: Path, max_chars: Optional[int]) -> List[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"--text file {path} is not UTF-8 text: {exc}") from None
    text = text[:max_chars] if max_chars else text
    lines = [line for line in text.split("\n") if line.strip()]
    # a file of long lines is one document per line (wiki_demo); verse or prose wrapped at ~60
    # characters is one document (tinyshakespeare)
    per_line = lines and sum(map(len, lines)) / len(lines) > 500
    docs = lines if per_line else ([text] if text.strip() else [])
    if not docs:
        raise ConfigError(f"--text file {path} holds no text")
    return docs


def token_streams(args, tokenizer) -> tuple:
    """(train ids, val ids): every file's documents joined with EOS; the last val-fraction of each held out."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError(f"tokenizer {args.tokenizer} defines no EOS token to separate documents")
    train, val = [], []
    for path in map(Path, args.text):
        ids: List[int] = []
        for doc in documents(path, args.max_chars):
            ids += tokenizer(doc, add_special_tokens=False)["input_ids"] + [eos]
        cut = int(len(ids) * (1 - args.val_fraction))
        if len(ids) - cut < args.seq_len + 1:
            raise ConfigError(f"--text file {path} has {len(ids)} tokens: too few to hold out one "
                              f"--seq-len {args.seq_len} chunk ({args.val_fraction:.0%}); use a longer file "
                              f"or a shorter --seq-len")
        train += ids[:cut]
        val += ids[cut:]
    return torch.tensor(train, dtype=torch.long), torch.tensor(val, dtype=torch.long)


def chunks(ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    n = len(ids) // seq_len
    return ids[: n * seq_len].view(n, seq_len)


def model_config(args, tokenizer):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=args.hidden_size,
                       intermediate_size=args.intermediate_size, num_hidden_layers=args.layers,
                       num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                       max_position_embeddings=max(512, args.seq_len), tie_word_embeddings=True,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)


def ds_config(args, total_steps: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": args.micro_batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": args.gradient_clipping,
        "zero_optimization": {"stage": 0},
        "optimizer": {"type": "AdamW", "params": {"lr": args.lr, "betas": [0.9, 0.95], "eps": 1e-8,
                                                  "weight_decay": args.weight_decay, "torch_adam": True}},
        "scheduler": {"type": "WarmupCosineLR",
                      "params": {"total_num_steps": total_steps, "warmup_num_steps": min(args.warmup_steps, total_steps),
                                 "warmup_type": "linear", "warmup_min_ratio": 0.0,
                                 "cos_min_ratio": args.min_lr_ratio}},
        "steps_per_print": 1_000_000_000,
    }


@torch.no_grad()
def held_out_loss(module, val: torch.Tensor, batch: int, device) -> float:
    """Mean next-token loss over every held-out chunk, split across ranks."""
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = val[rank::world]
    sums = torch.zeros(2, dtype=torch.float64)
    module.eval()
    for start in range(0, len(mine), batch):
        x = mine[start: start + batch].to(device)
        logits = module(input_ids=x).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                                reduction="sum")
        sums += torch.tensor([nll.item(), float(x[:, 1:].numel())], dtype=torch.float64)
    module.train()
    if world > 1:
        dist.all_reduce(sums)
    return (sums[0] / sums[1]).item()


def run(argv: Optional[Sequence[str]] = None) -> dict:
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    from transformers import AutoTokenizer, LlamaForCausalLM

    args = build_parser().parse_args(argv)
    check_args(args)
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
        tokenizer.model_max_length = 1 << 30  # whole documents are tokenised, then cut into --seq-len chunks
    except Exception as exc:
        raise ConfigError(f"could not load tokenizer {args.tokenizer!r}: {type(exc).__name__}: {exc}") from None
    train_ids, val_ids = token_streams(args, tokenizer)
    train, val = chunks(train_ids, args.seq_len), chunks(val_ids, args.seq_len)

    deepspeed.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    per_epoch = len(train) // (args.micro_batch_size * world)
    if per_epoch < 1:
        raise ConfigError(f"{len(train)} training chunks of {args.seq_len} tokens are fewer than one global batch "
                          f"({args.micro_batch_size} x {world} ranks)")
    total = math.ceil(per_epoch * args.epochs)
    total = min(total, args.max_steps) if args.max_steps else total

    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(model_config(args, tokenizer))
    n_params = sum(p.numel() for p in model.parameters())
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                           config=ds_config(args, total))
    device = torch.device(get_accelerator().current_device_name())
    out = Path(args.output_dir)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        print(f"pretrain: {n_params:,} parameters; {len(train_ids):,} train / {len(val_ids):,} held-out tokens; "
              f"{total} steps of {args.micro_batch_size * world * args.seq_len:,} tokens ({args.epochs:g} epochs)",
              flush=True)
    log = (out / "pretrain_log.jsonl").open("w") if rank == 0 else None

    def record(**row) -> None:
        if log is not None:
            log.write(json.dumps(row) + "\n")
            log.flush()

    first_val = held_out_loss(engine.module, val, args.micro_batch_size, device)
    record(step=0, tokens=0, val_loss=first_val, wall_clock=0.0)
    progress = None
    if rank == 0 and not args.no_progress:
        from tqdm import tqdm

        progress = tqdm(total=total, desc="pretrain", unit="step", mininterval=2.0, dynamic_ncols=True)
    generator = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(train), generator=generator)
    wall, cursor, val_loss, train_loss = 0.0, 0, first_val, float("nan")
    global_batch = args.micro_batch_size * world
    for step in range(1, total + 1):
        if cursor + global_batch > len(order):  # next epoch: a fresh permutation, same on every rank
            order, cursor = torch.randperm(len(train), generator=generator), 0
        picked = order[cursor: cursor + global_batch][rank::world]
        cursor += global_batch
        began = time.perf_counter()
        x = train[picked].to(device)
        loss = engine(input_ids=x, labels=x).loss
        engine.backward(loss)
        engine.step()
        wall += time.perf_counter() - began
        train_loss = loss.item()
        if not math.isfinite(train_loss):
            raise FloatingPointError(f"pretraining loss is {train_loss} at step {step}: lower --lr")
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{train_loss:.3f}", refresh=False)
        if step % args.eval_every == 0 or step == total:
            val_loss = held_out_loss(engine.module, val, args.micro_batch_size, device)
            record(step=step, tokens=step * global_batch * args.seq_len, train_loss=train_loss, val_loss=val_loss,
                   lr=engine.get_lr()[0], wall_clock=round(wall, 2))
    if progress is not None:
        progress.close()
    summary = {"parameters": n_params, "steps": total, "epochs": round(total / per_epoch, 3),
               "tokens_seen": total * global_batch * args.seq_len, "train_tokens": len(train_ids),
               "val_tokens": len(val_ids), "val_loss_start": first_val, "val_loss": val_loss,
               "train_loss_last": train_loss, "wall_clock": wall, "world_size": world,
               "text": [str(Path(t).resolve()) for t in args.text], "tokenizer": args.tokenizer,
               "args": {k: v for k, v in vars(args).items() if k not in ("local_rank", "text")}}
    if rank == 0:
        engine.module.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        (out / "pretrain_summary.json").write_text(json.dumps(summary, indent=1))
        log.close()
        print(f"pretrain: held-out loss {first_val:.3f} -> {val_loss:.3f} in {wall:.0f} s; model written to {out}",
              flush=True)
    dist.barrier()
    return summary
