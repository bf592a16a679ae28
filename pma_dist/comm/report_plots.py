"""PNG plots for the report (matplotlib, headless)."""
from __future__ import annotations

import os
from typing import List


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # rank 0 of a training job has no display
    import matplotlib.pyplot as plt

    return plt


def plot_bytes_per_micro_step(report: dict, path: str) -> None:
    plt = _pyplot()
    runs = [("run: " + report["run"]["optimizer"], report["run"])]
    if "baseline" in report:
        runs.append(("baseline: " + report["baseline"]["optimizer"], report["baseline"]))
    ops = sorted({op for _, r in runs for op in r["collectives"]})
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(runs)
    for i, (label, r) in enumerate(runs):
        values = [r["collectives"].get(op, {}).get("per_micro_step", {}).get("bytes", 0) for op in ops]
        ax.bar([x + i * width for x in range(len(ops))], values, width, label=label)
    ax.set_xticks([x + width * (len(runs) - 1) / 2 for x in range(len(ops))], ops)
    ax.set_ylabel("message bytes per micro-step")
    tallest = max([r["collectives"].get(op, {}).get("per_micro_step", {}).get("bytes", 0)
                   for _, r in runs for op in ops] or [0])
    ax.set_ylim(0, 1.3 * tallest or 1)  # head-room for the legend
    run = report["run"]
    ax.set_title(f"{run['setup']}, K={run['period']}, {run['world_size']} ranks")
    ax.legend(loc="upper center", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_projection(report: dict, path: str) -> None:
    plt = _pyplot()
    projection = report["projection"]
    rows = projection["rows"]
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        mine = [r for r in rows if r["model"] == model]
        xs = range(len(mine))
        ax.bar([x - 0.2 for x in xs], [r["ga"]["comm_s"] for r in mine], 0.4, label="GA")
        ax.bar([x + 0.2 for x in xs], [r["pma"]["comm_s"] for r in mine], 0.4, label="PMA")
        ax.set_xticks(list(xs), [f"{r['setup']}\n{r['overhead_overlapped_pct']:+.1f}%" for r in mine], fontsize=7)
        ax.set_title(model)
        ax.set_ylabel("communication s / period")
    axes[0][0].legend()
    fig.suptitle(f"{projection['topology']['name']}, K={projection['period']} (labels: PMA period-time overhead, "
                 "overlapped)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_plots(report: dict, out_dir: str) -> List[str]:
    """Write the plots next to report.md; returns their file names (relative, for the markdown)."""
    names = []
    for name, plot in (("bytes_per_micro_step.png", plot_bytes_per_micro_step),
                       ("projection.png", plot_projection)):
        plot(report, os.path.join(out_dir, name))
        names.append(name)
    return names
