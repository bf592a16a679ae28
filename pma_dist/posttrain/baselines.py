"""The Lion baseline for gradient-accumulation runs (Chen et al. 2023, "Symbolic Discovery").

DeepSpeed's own Lion is GPU-only (``FusedLion``) or needs ZeRO CPU offload (``DeepSpeedCPULion``),
and ``LionPMA(period=1)`` (which is Lion algebraically) is refused with gradient accumulation by
the PMA integration, rightly: it is a PMA optimizer. So the Lion-K baseline is this plain Lion,
checked against ``LionPMA(period=1)`` in ``tests/test_posttrain_losses.py``.
"""
from __future__ import annotations

import torch


class Lion(torch.optim.Optimizer):
    """``c = b1*m + (1-b1)*g; p -= lr*(sign(c) + wd*p); m = b2*m + (1-b2)*g``."""

    def __init__(self, params, lr: float = 1e-4, betas=(0.9, 0.99), weight_decay: float = 0.0):
        if not lr > 0:
            raise ValueError(f"Invalid learning rate: lr={lr!r} (must be > 0)")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"Invalid betas: {betas!r} (each must be in [0, 1))")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p)
                exp_avg = state["exp_avg"]
                p.mul_(1 - group["lr"] * group["weight_decay"])
                direction = exp_avg.mul(beta1).add_(p.grad, alpha=1 - beta1).sign_()
                p.add_(direction, alpha=-group["lr"])
                exp_avg.mul_(beta2).add_(p.grad, alpha=1 - beta2)
                state["step"] += 1
        return loss
