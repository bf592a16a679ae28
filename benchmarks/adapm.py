"""AdaPM vs AdamW: loss curves and optimizer-state memory on two small real tasks (CPU).

Tasks:

* ``pretrain``: a GPT-2-style model built from a config (``GPT2LMHeadModel``, 4 layers, width 160,
  5 heads, context 64, 1.28M parameters, tied embeddings; sized for a shared 2-core CPU) trained from scratch on
  ``../shared/data/text/tinyshakespeare_train.txt`` with a **byte-level** tokenizer (vocabulary 256:
  token = UTF-8 byte). The last 5% of the file is held out for evaluation.
* ``sft``: supervised fine-tuning of the pretrained stories260K Llama
  (``../shared/data/models/stories260K``) on ``../shared/data/sft/alpaca_mix_train.jsonl`` (loss on
  response tokens only, at most 128 tokens per record; ``recipes.posttrain.data`` tokenises, holds
  out 64 records and orders the batches).

Optimizers: ``torch.optim.AdamW`` and ``pma_dist.AdaPM`` (paper settings: rank 5%, T = 100,
update clip 1), and AdaPM-mini, each at a small learning-rate sweep, plus the paper's ablation
``adapm_nocorr`` (no residual correction) at AdaPM's best learning rate; all use betas (0.9, 0.95),
weight decay 0.1, linear warm-up over 5% of the steps then cosine decay to 10%, and global
gradient-norm clipping at 1.0 (the paper's set-up). Every optimizer sees the same batches.

    python benchmarks/adapm.py --out benchmarks/results/adapm                      # everything
    python benchmarks/adapm.py --out benchmarks/results/adapm --tasks pretrain     # one task (run the two
    python benchmarks/adapm.py --out benchmarks/results/adapm --tasks sft          #  side by side: 2 cores)
    python benchmarks/adapm.py --out /tmp/adapm_quick --quick                      # smoke run

Each run is written to ``OUT/<task>/<run>.json`` as soon as it finishes and skipped when present,
so an interrupted benchmark resumes where it stopped. ``OUT/summary.json``, ``OUT/summary.md`` (the
tables) and the plots are rewritten at the end, and the tables with the plots go to the ``OUT``
section of ``docs/bench/adapm.md`` (``--page``; not for ``--quick``). ``--page-only`` re-writes that
section from ``OUT/summary.md`` without running anything.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Dict, List

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.pages import PAGES, link, repo_path, write_section  # noqa: E402
from pma_dist import AdaPM  # noqa: E402
from recipes.posttrain import data as sft_data  # noqa: E402
from recipes.posttrain.losses import sft_loss  # noqa: E402

SHARED = REPO.parent / "shared" / "data"
BETAS, WEIGHT_DECAY, GRAD_CLIP = (0.9, 0.95), 0.1, 1.0


# ---------------------------------------------------------------------------------------------- tasks
class Task:
    name: str
    steps: int
    lrs: Dict[str, List[float]]

    def model(self) -> torch.nn.Module: ...
    def batch(self, step: int) -> dict: ...
    def eval_loss(self, model) -> float: ...
    def loss(self, model, batch) -> torch.Tensor: ...
    num_heads: int = None
    num_kv_heads: int = None


class Pretrain(Task):
    name = "pretrain"
    seq, batch_size, eval_windows = 64, 8, 64
    num_heads = 5

    def __init__(self, steps: int, quick: bool, seed: int = 0):
        self.seed = seed
        path = SHARED / "text" / "tinyshakespeare_train.txt"
        if not path.exists():
            raise SystemExit(f"missing {path}: the benchmark reads the shared data next to the repo")
        ids = torch.tensor(list(path.read_bytes()), dtype=torch.long)
        cut = int(len(ids) * 0.95)
        self.train_ids, self.eval_ids = ids[:cut], ids[cut:]
        self.steps = steps
        self.lrs = {kind: [1e-3, 3e-3, 1e-2] for kind in ("adamw", "adapm", "adapm_mini")}
        self.lrs["adamw"] = [3e-4, 1e-3, 2e-3, 3e-3, 1e-2]  # AdamW's optimum sat between 1e-3 and 3e-3
        self.lrs["adapm_nocorr"] = [3e-3]  # ablation at AdaPM's best lr
        if quick:
            self.lrs = {kind: [3e-3] for kind in self.lrs}
        gen = torch.Generator().manual_seed(1)
        starts = torch.randint(0, len(self.eval_ids) - self.seq - 1, (self.eval_windows,), generator=gen)
        self.eval_batch = torch.stack([self.eval_ids[s:s + self.seq + 1] for s in starts.tolist()])

    def model(self):
        from transformers import GPT2Config, GPT2LMHeadModel
        torch.manual_seed(self.seed)
        cfg = GPT2Config(vocab_size=256, n_positions=self.seq, n_embd=160, n_layer=4, n_head=self.num_heads,
                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
        return GPT2LMHeadModel(cfg)

    def batch(self, step):
        gen = torch.Generator().manual_seed(10_000 + step + 1_000_003 * self.seed)
        starts = torch.randint(0, len(self.train_ids) - self.seq - 1, (self.batch_size,), generator=gen)
        return {"tokens": torch.stack([self.train_ids[s:s + self.seq + 1] for s in starts.tolist()])}

    def loss(self, model, batch):
        tokens = batch["tokens"]
        logits = model(input_ids=tokens[:, :-1]).logits
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))

    @torch.no_grad()
    def eval_loss(self, model):
        return float(self.loss(model, {"tokens": self.eval_batch}))


class SFT(Task):
    name = "sft"
    batch_size, max_length, eval_size = 8, 128, 64
    num_heads, num_kv_heads = 8, 4  # stories260K: grouped-query attention

    def __init__(self, steps: int, quick: bool, seed: int = 0):
        from transformers import AutoTokenizer
        self.seed = seed  # the pretrained model is fixed: the seed only changes the batch order
        self.model_dir = SHARED / "models" / "stories260K"
        source = SHARED / "sft" / "alpaca_mix_train.jsonl"
        for path in (self.model_dir, source):
            if not path.exists():
                raise SystemExit(f"missing {path}: the benchmark reads the shared data next to the repo")
        tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.pad = tokenizer.eos_token_id
        records = sft_data.load_records(str(source), "sft")
        train, evals = sft_data.holdout_split(records, self.eval_size)
        tok = sft_data.Tokeniser(tokenizer, self.max_length)
        self.train = tok.sft(train, source=str(source)).examples
        self.evals = tok.sft(evals, source=str(source)).examples
        self.order = sft_data.MicroBatchOrder(len(self.train), self.batch_size, 1, seed=seed)
        self.steps = steps
        self.lrs = {kind: [1e-3, 3e-3, 1e-2] for kind in ("adamw", "adapm", "adapm_mini")}
        self.lrs["adapm_nocorr"] = [3e-3]  # ablation at AdaPM's best lr
        if quick:
            self.lrs = {kind: [3e-3] for kind in self.lrs}

    def model(self):
        from transformers import AutoModelForCausalLM
        return AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch.float32)

    def batch(self, step):
        return sft_data.pad_batch([self.train[i] for i in self.order.indices(step, 0)], self.pad)

    def loss(self, model, batch):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return sft_loss(logits, batch["labels"])

    @torch.no_grad()
    def eval_loss(self, model):
        total = count = 0.0
        for chunk in sft_data.eval_batches(self.evals, 16, 0, 1):
            b = sft_data.pad_batch(chunk, self.pad)
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            logp = torch.log_softmax(logits[:, :-1].float(), -1)
            targets = b["labels"][:, 1:]
            mask = targets != sft_data.IGNORE_INDEX
            total += float(-(logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0] * mask).sum())
            count += float(mask.sum())
        return total / count


# ---------------------------------------------------------------------------------------------- runs
def make_optimizer(kind: str, model, lr: float, num_heads: int, num_kv_heads: int = None):
    if kind == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, betas=BETAS, weight_decay=WEIGHT_DECAY)
    return AdaPM(model.named_parameters(), lr=lr, betas=BETAS, weight_decay=WEIGHT_DECAY, rank_ratio=0.05,
                 update_interval=100, mini=(kind == "adapm_mini"), num_heads=num_heads, num_kv_heads=num_kv_heads,
                 residual_correction=(kind != "adapm_nocorr"))


def state_memory(kind: str, model, opt) -> dict:
    """Optimizer-state bytes (momentum, second moment) and AdamW's for the same parameters."""
    adamw = sum(p.numel() * 4 for p in model.parameters())
    if kind == "adamw":
        real = sum(t.numel() * t.element_size() for s in opt.state.values() for k, t in s.items() if k != "step")
        return dict(momentum=adamw, second_moment=adamw, adamw_momentum=adamw, adamw_second_moment=adamw,
                    measured_total=real)
    rows = opt.memory_report()
    return dict(momentum=sum(r["momentum_bytes"] for r in rows),
                second_moment=sum(r["second_moment_bytes"] for r in rows),
                adamw_momentum=adamw, adamw_second_moment=adamw, measured_total=sum(opt.state_bytes().values()))


def lr_at(step: int, steps: int, peak: float) -> float:
    warm = max(1, steps // 20)
    if step < warm:
        return peak * (step + 1) / warm
    progress = (step - warm) / max(1, steps - warm)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def run_one(task: Task, kind: str, lr: float) -> dict:
    model = task.model()
    model.train()
    opt = make_optimizer(kind, model, lr, task.num_heads, task.num_kv_heads)
    losses, started = [], time.perf_counter()
    for step in range(task.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, task.steps, lr)
        opt.zero_grad(set_to_none=True)
        loss = task.loss(model, task.batch(step))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        opt.step()
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            break
    seconds = time.perf_counter() - started
    model.eval()
    eval_loss = task.eval_loss(model) if math.isfinite(losses[-1]) else float("nan")
    tail = losses[-max(1, task.steps // 10):]
    return dict(task=task.name, optimizer=kind, lr=lr, steps=task.steps, seed=task.seed, losses=losses, eval_loss=eval_loss,
                final_train_loss=sum(tail) / len(tail), seconds=seconds,
                params=sum(p.numel() for p in model.parameters()), memory=state_memory(kind, model, opt))


# ---------------------------------------------------------------------------------------------- report
def best_runs(runs: List[dict]) -> Dict[str, dict]:
    best = {}
    for r in runs:
        if math.isfinite(r["eval_loss"]) and (r["optimizer"] not in best
                                               or r["eval_loss"] < best[r["optimizer"]]["eval_loss"]):
            best[r["optimizer"]] = r
    return best


PAPER_SCALE = {  # GPT-2 sizes of the paper (Table 2 / Fig. 3), built on the meta device: shapes only
    "GPT-2 124M": dict(n_embd=768, n_layer=12, n_head=12),
    "GPT-2 355M": dict(n_embd=1024, n_layer=24, n_head=16),
    "GPT-2 1.5B": dict(n_embd=1600, n_layer=48, n_head=25),
}


def memory_at_scale() -> List[dict]:
    """State bytes of AdaPM / AdaPM-mini vs AdamW for the paper's GPT-2 sizes (no training)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    rows = []
    for label, dims in PAPER_SCALE.items():
        with torch.device("meta"):
            model = GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_positions=1024, **dims))
        for mini in (False, True):
            report = AdaPM(model.named_parameters(), rank_ratio=0.05, mini=mini,
                           num_heads=dims["n_head"]).memory_report()
            total = lambda key: sum(r[key] for r in report)  # noqa: E731
            rows.append(dict(model=label, optimizer="adapm_mini" if mini else "adapm",
                             params=sum(p.numel() for p in model.parameters()),
                             momentum=total("momentum_bytes"), adamw_momentum=total("adamw_momentum_bytes"),
                             state=total("momentum_bytes") + total("second_moment_bytes"),
                             adamw_state=total("adamw_momentum_bytes") + total("adamw_second_moment_bytes")))
    return rows


def scale_table(rows: List[dict]) -> str:
    lines = ["| model (fp32 state, rank 5%) | optimizer | momentum GB | vs AdamW | all state GB | vs AdamW |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} ({r['params'] / 1e6:.0f}M params) | {r['optimizer']} | {r['momentum'] / 1e9:.3f} "
                     f"(AdamW {r['adamw_momentum'] / 1e9:.3f}) | {(1 - r['momentum'] / r['adamw_momentum']) * 100:.1f}% less "
                     f"| {r['state'] / 1e9:.3f} (AdamW {r['adamw_state'] / 1e9:.3f}) | "
                     f"{(1 - r['state'] / r['adamw_state']) * 100:.1f}% less |")
    return "\n".join(lines) + "\n"


def seeds_table(results: Dict[str, List[dict]], extra: List[dict]) -> str:
    """Eval loss of (task, optimizer, lr) runs repeated with other seeds: the spread behind the ratios."""
    lines = ["| task | optimizer | lr | eval loss per seed | mean | mean vs AdamW mean |", "|---|---|---|---|---|---|"]
    groups: Dict[tuple, Dict[int, float]] = {}
    for run in extra:
        groups.setdefault((run["task"], run["optimizer"], run["lr"]), {})[run["seed"]] = run["eval_loss"]
    for (task, kind, lr), by_seed in groups.items():
        for run in results.get(task, []):
            if run["optimizer"] == kind and run["lr"] == lr:
                by_seed[0] = run["eval_loss"]
    means = {key: sum(v.values()) / len(v) for key, v in groups.items()}
    for (task, kind, lr), by_seed in sorted(groups.items()):
        base = [m for (t, k, _), m in means.items() if t == task and k == "adamw"]
        rel = f"{(means[(task, kind, lr)] / base[0] - 1) * 100:+.2f}%" if base else "-"
        seeds = ", ".join(f"{seed}: {loss:.4f}" for seed, loss in sorted(by_seed.items()))
        lines.append(f"| {task} | {kind} | {lr:g} | {seeds} | {means[(task, kind, lr)]:.4f} | {rel} |")
    return "\n".join(lines) + "\n" if groups else ""


def summarise(results: Dict[str, List[dict]], command: str) -> str:
    lines = [f"Command: `{command}`", "",
             "| task | optimizer | lr sweep: eval loss | best lr | eval loss | vs AdamW | final train loss | "
             "momentum bytes | vs AdamW | all state bytes | vs AdamW | s/run |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for task, runs in results.items():
        best = best_runs(runs)
        base = best.get("adamw")
        for kind in ("adamw", "adapm", "adapm_mini", "adapm_nocorr"):
            sweep = sorted((r for r in runs if r["optimizer"] == kind), key=lambda r: r["lr"])
            if not sweep or kind not in best:
                continue
            b, m = best[kind], best[kind]["memory"]
            sweep_text = ", ".join(f"{r['lr']:g}: {r['eval_loss']:.4f}" for r in sweep)
            rel = f"{(b['eval_loss'] / base['eval_loss'] - 1) * 100:+.2f}%" if base else "-"
            state = m["momentum"] + m["second_moment"]
            adamw_state = m["adamw_momentum"] + m["adamw_second_moment"]
            lines.append(
                f"| {task} ({b['params'] / 1e6:.2f}M params, {b['steps']} steps) | {kind} | {sweep_text} | {b['lr']:g} "
                f"| {b['eval_loss']:.4f} | {rel} | {b['final_train_loss']:.4f} | {m['momentum']:,} | "
                f"{(1 - m['momentum'] / m['adamw_momentum']) * 100:.1f}% less | {state:,} | "
                f"{(1 - state / adamw_state) * 100:.1f}% less | {b['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def plot_curves(results: Dict[str, List[dict]], out: Path) -> List[Path]:
    """Training loss (moving average over 10 steps) of each optimizer's best learning rate, per task."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    written = []
    for task, runs in results.items():
        fig, ax = plt.subplots(figsize=(6, 4))
        for kind, run in sorted(best_runs(runs).items()):
            losses = torch.tensor(run["losses"])
            smooth = torch.nn.functional.avg_pool1d(losses[None, None], 10, 1)[0, 0] if len(losses) >= 10 else losses
            ax.plot(range(len(losses) - len(smooth) + 1, len(losses) + 1), smooth.tolist(),
                    label=f"{kind} lr={run['lr']:g} (eval {run['eval_loss']:.3f})")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (10-step mean)")
        ax.set_title(f"{task}: best learning rate of each optimizer")
        ax.legend()
        fig.tight_layout()
        path = out / f"{task}_loss.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="results directory (resumable)")
    parser.add_argument("--tasks", default="pretrain,sft", help="comma-separated: pretrain, sft")
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--sft-steps", type=int, default=200)
    parser.add_argument("--quick", action="store_true", help="one lr per optimizer, 20 steps: a smoke run")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0,
                        help="model init (pretrain) and batch order; the main table uses seed 0")
    parser.add_argument("--runs", default=None,
                        help="only these optimizer:lr pairs, e.g. adamw:0.002,adapm:0.003 (for extra seeds)")
    parser.add_argument("--page", type=Path, default=PAGES / "adapm.md", help="the detail page the tables go to")
    parser.add_argument("--page-only", action="store_true",
                        help="only re-write the OUT section of --page from OUT/summary.md (runs nothing)")
    args = parser.parse_args(argv)
    if args.page_only:
        return write_page(args.out, args.page)
    torch.set_num_threads(args.threads)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = sorted(set(tasks) - {"pretrain", "sft"})
    if unknown:
        parser.error(f"unknown task(s) {unknown} in --tasks={args.tasks!r}; expected pretrain and/or sft")
    for name in ("pretrain_steps", "sft_steps", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.quick:
        args.pretrain_steps = args.sft_steps = 20

    only = None
    if args.runs:
        try:
            only = [(k, float(lr)) for k, lr in (item.split(":") for item in args.runs.split(","))]
        except ValueError:
            parser.error(f"--runs={args.runs!r}: expected optimizer:lr pairs such as adamw:0.002,adapm:0.003")
        bad = sorted({k for k, _ in only} - {"adamw", "adapm", "adapm_mini", "adapm_nocorr"})
        if bad:
            parser.error(f"--runs={args.runs!r}: unknown optimizer(s) {bad}")
    steps = {"pretrain": args.pretrain_steps, "sft": args.sft_steps}
    command = "python benchmarks/adapm.py " + " ".join(sys.argv[1:] if argv is None else argv)
    results: Dict[str, List[dict]] = {}
    print(f"$ {command}", flush=True)
    for name in tasks:
        task = (Pretrain if name == "pretrain" else SFT)(steps[name], args.quick, args.seed)
        folder = args.out / name
        folder.mkdir(parents=True, exist_ok=True)
        results[name] = []
        pairs = [(k, lr) for k, lrs in task.lrs.items() for lr in lrs] if only is None else only
        for kind, lr in pairs:
            path = folder / (f"{kind}_lr{lr:g}_steps{task.steps}" + (f"_seed{args.seed}" if args.seed else "")
                             + ".json")
            if path.exists():
                run = json.loads(path.read_text())
                print(f"[{name}] {kind} lr={lr:g}: cached eval {run['eval_loss']:.4f}", flush=True)
            else:
                run = run_one(task, kind, lr)
                path.write_text(json.dumps(run))
                print(f"[{name}] {kind} lr={lr:g}: eval {run['eval_loss']:.4f} train {run['final_train_loss']:.4f} "
                      f"({run['seconds']:.0f}s)", flush=True)
            results[name].append(run)
    # the summary covers every task with results on disk for these step counts (tasks may run apart)
    results, extra_seeds = {}, []
    for path in sorted(args.out.glob("*/*.json")):
        run = json.loads(path.read_text())
        if run.get("steps") == steps.get(run.get("task")):
            (results.setdefault(run["task"], []) if not run.get("seed") else extra_seeds).append(run)
    table = summarise(results, "python benchmarks/adapm.py --out " + str(args.out)
                      + (" --quick" if args.quick else "") + " [--tasks pretrain | --tasks sft]")
    table += "\n" + seeds_table(results, extra_seeds)
    scale = memory_at_scale()
    table += "\n" + scale_table(scale)
    print(table)
    (args.out / "summary.md").write_text(table)
    plot_curves(results, args.out)
    (args.out / "summary.json").write_text(json.dumps({
        "command": command, "machine": platform.platform(), "threads": args.threads, "torch": torch.__version__,
        "memory_at_paper_scale": scale,
        "best": {t: {k: {kk: vv for kk, vv in r.items() if kk != "losses"} for k, r in best_runs(rs).items()}
                 for t, rs in results.items()}}, indent=1))
    if not args.quick:
        write_page(args.out, args.page)


def write_page(out: Path, page: Path) -> None:
    """The ``out`` section of the detail page: the tables of ``out/summary.md`` and the loss plots."""
    summary = out / "summary.md"
    if not summary.exists():
        raise SystemExit(f"--page-only: {summary} does not exist (run the benchmark with --out {out} first)")
    images = [f"![{path.stem}]({link(page, path)})" for path in sorted(out.glob("*_loss.png"))]
    body = "\n".join([f"Generated by `python benchmarks/adapm.py --out {repo_path(out)} --page-only` from "
                      f"[`summary.md`]({link(page, summary)}); do not edit by hand.", "", summary.read_text().strip(),
                      *(["", "Training loss of each optimizer's best learning rate:", "", *images] if images else [])])
    write_section(page, f"adapm {out.name}", body, "AdaPM vs AdamW: every table (`benchmarks/adapm.py`)")


if __name__ == "__main__":
    main()
