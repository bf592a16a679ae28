"""PNG plots from metrics JSONL files: loss vs wall-clock (and vs samples), update variance."""
from __future__ import annotations

from pathlib import Path
from typing import Dict

from .metrics import read_metrics


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_loss_vs_time(runs: Dict[str, Path], out_png: Path, title: str = "") -> Path:
    """Left: eval loss vs training wall-clock; right: eval loss vs samples. One line per run."""
    plt = _pyplot()
    fig, (ax_time, ax_samples) = plt.subplots(1, 2, figsize=(11, 4))
    for label, path in runs.items():
        rows = read_metrics(path, "eval")
        if not rows:
            continue
        loss = [r["eval_loss"] for r in rows]
        ax_time.plot([r["wall_clock"] for r in rows], loss, marker="o", ms=3, label=label)
        ax_samples.plot([r["samples"] for r in rows], loss, marker="o", ms=3, label=label)
    ax_time.set_xlabel("training wall-clock (s, excluding eval)")
    ax_samples.set_xlabel("training samples (all ranks)")
    for ax in (ax_time, ax_samples):
        ax.set_ylabel("held-out eval loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title or "eval loss")
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def plot_update_variance(runs: Dict[str, Path], out_png: Path, title: str = "") -> Path:
    """The paper's Fig. 7: last-layer update variance vs train loss (left) and vs wall-clock (right)."""
    plt = _pyplot()
    fig, (ax_loss, ax_time) = plt.subplots(1, 2, figsize=(11, 4))
    for label, path in runs.items():
        rows = read_metrics(path, "update_variance")
        if not rows:
            continue
        variance = [r["update_variance"] for r in rows]
        ax_loss.plot([r["train_loss"] for r in rows], variance, marker="o", ms=3, label=label)
        ax_time.plot([r["wall_clock"] for r in rows], variance, marker="o", ms=3, label=label)
    ax_loss.set_xlabel("train loss (window mean)")
    ax_loss.invert_xaxis()
    ax_time.set_xlabel("training wall-clock (s)")
    for ax in (ax_loss, ax_time):
        ax.set_ylabel("last-layer update variance per period")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title or "update variance (per K micro-batches)")
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
