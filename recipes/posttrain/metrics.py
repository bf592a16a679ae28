"""The JSONL metrics log and the update-variance probe (the paper's Fig. 7).

One JSON object per line, written by rank 0 only. ``kind`` is ``"train"`` (loss averaged over
ranks and the micro-steps since the previous train line), ``"eval"`` (held-out metrics) or
``"update_variance"``. Every line carries ``micro_step`` (micro-batches consumed per rank),
``optimizer_steps``, ``samples`` (examples consumed by all ranks) and ``wall_clock`` (seconds of
training, excluding evaluation and checkpointing, continued across resumes).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import torch


class MetricsError(ValueError):
    """An unreadable line of an existing metrics log; names the file and line."""


class MetricsLog:
    def __init__(self, path: Path, enabled: bool):
        self.path = Path(path)
        self.enabled = enabled

    def truncate_after(self, micro_step: int) -> Optional[str]:
        """On resume: drop lines logged after the checkpoint, so the log continues without duplicates.

        A half-written last line (the run was killed mid-write) is dropped and described in the returned
        note; any other unreadable line is a :class:`MetricsError` naming the file and line."""
        if not self.enabled or not self.path.exists():
            return None
        lines = self.path.read_text(encoding="utf-8", errors="replace").splitlines()
        kept, note = [], None
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                step = row["micro_step"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                if number == len(lines):
                    note = f"{self.path}:{number}: dropped a half-written last line ({line[:40]!r}...)"
                    continue
                raise MetricsError(f"{self.path}:{number}: not a metrics record ({type(exc).__name__}: {exc}); "
                                   f"fix or remove that line, then --resume again") from None
            if step <= micro_step:
                kept.append(line)
        self.path.write_text("".join(line + "\n" for line in kept))
        return note

    def write(self, **record) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()


def read_metrics(path, kind: Optional[str] = None) -> List[dict]:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [r for r in rows if kind is None or r.get("kind") == kind]


class UpdateVariance:
    """Variance of the last layer's update, per element, over a window of equal-data updates.

    To compare optimizers that step at different rates, the update is measured per *period*:
    ``delta_j = theta(jK) - theta((j-1)K)``, the net change of the output layer after every K
    micro-batches, i.e. after the same data for PMA (K small/large steps) and for GA (one step).
    Over a window of ``window`` consecutive deltas we log ``mean_i Var_j(delta_j[i])``, the mean
    squared norm of the deltas, the squared norm of their mean, and the scale-free noise-to-signal
    ratio ``sum_i Var_j(delta_j[i]) / ||mean_j delta_j||^2`` (raw variance grows with the step size, so
    methods that move further per period look noisier by it alone).
    """

    def __init__(self, every: int, window: int):
        if window < 2:
            raise ValueError(f"update-variance window must be >= 2 periods, got {window}")
        self.every = every  # micro-steps per measured update: K, or another K's to compare with its runs
        self.window = window
        self.previous: Optional[torch.Tensor] = None
        self.deltas: List[torch.Tensor] = []

    def due(self, micro_step: int) -> bool:
        """Whether to snapshot after ``micro_step`` micro-steps (every ``every``-th)."""
        return micro_step % self.every == 0

    def observe(self, weight: torch.Tensor) -> Optional[dict]:
        """Feed a snapshot of the last layer at a period boundary; returns stats when a window is full."""
        current = weight.detach().float().flatten().clone()
        if self.previous is not None:
            self.deltas.append(current - self.previous)
        self.previous = current
        if len(self.deltas) < self.window:
            return None
        stacked = torch.stack(self.deltas)
        self.deltas = []
        variance = stacked.var(dim=0, unbiased=True)
        mean_sq_norm = stacked.mean(dim=0).pow(2).sum().item()
        # noise over signal: the spread of the updates per unit of the squared distance their mean moves,
        # which does not change when every update is scaled (a larger lr, or PMA's K small steps per period)
        return {"update_variance": variance.mean().item(),
                "update_sq_norm": stacked.pow(2).sum(dim=1).mean().item(),
                "update_mean_sq_norm": mean_sq_norm,
                "update_noise_to_signal": variance.sum().item() / mean_sq_norm if mean_sq_norm > 0 else float("inf"),
                "window_periods": self.window}


def time_to_target(eval_rows: List[dict], target: float) -> Optional[tuple]:
    """(wall-clock, samples) when eval loss first reaches ``target``, linearly interpolated between
    evaluations; None if it never does."""
    for before, after in zip(eval_rows, eval_rows[1:]):
        if after["eval_loss"] <= target:
            if before["eval_loss"] <= target:
                return before["wall_clock"], before["samples"]
            f = (before["eval_loss"] - target) / (before["eval_loss"] - after["eval_loss"])
            return (before["wall_clock"] + f * (after["wall_clock"] - before["wall_clock"]),
                    before["samples"] + f * (after["samples"] - before["samples"]))
    return None
