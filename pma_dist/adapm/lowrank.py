"""Debiased low-rank momentum (AdaPM paper, Algorithm 1 lines 4-8), as pure functions on matrices.

The momentum of an (m, n) block is stored as ``L @ R`` with ``L: (m, r)``, ``R: (r, n)``. Each step

    m_t   = decay * L R + weight * (1 - beta1) * g          (Alg. 1 line 4; decay = beta1, weight = 1
                                                              outside PMA)
    L, R  ~ argmin ||L R - m_t||_F^2                         (line 5; see below)
    r_t   = L R - m_t                                        (eq. 3: the residual the factors drop)
    m^c_t = m_t - r_t / (1 - beta1)                          (eq. 4: the debiased momentum)

Sign of the residual: eq. (3) defines ``r_t = L_t R_t - m_t``; Algorithm 1 line 6 prints
``m_t - L_t R_t``. With line 6's sign, eq. (4) would push the momentum *away* from ``m_t`` by ten
times the dropped part (beta1 = 0.9); with eq. (3)'s sign it restores the dropped part,
accumulated over the EMA horizon, which is the paper's stated intent ("restores the discarded
descent directions"), so we follow eq. (3).

Line 5 is solved the way the paper describes: warm-started gradient descent from the previous
factors, ``inner_steps`` alternating steps per optimizer step. The default solver preconditions
each factor's gradient with the inverse Gram matrix of the other factor (scaled gradient descent);
with step size 1 a step is an exact least-squares solve for that factor, so it converges in a few
iterations whatever the scale of the momentum and, when the rank equals the matrix's smaller
dimension, reproduces ``m_t`` exactly. ``solver="gd"`` is plain gradient descent with the safe
step ``1 / sigma_max(other factor)^2``. Gradient descent cannot leave ``L = R = 0`` (the paper's
initialisation: its gradient is zero), so the factors are (re)fitted by a truncated SVD of
``m_t`` at their first step and every ``update_interval`` steps -- the paper's ``T``.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

SOLVERS = ("scaled_gd", "gd")

# Tikhonov term of the Gram solves, relative to the Gram's mean eigenvalue: keeps a rank-deficient
# momentum (e.g. a block whose gradient has rank < r) from producing inf/nan factors.
_RIDGE = 1e-12


def fit_factors(m: Tensor, L: Tensor, R: Tensor, seed: int = 0) -> None:
    """Best rank-r approximation of ``m`` (truncated SVD), written into ``L`` and ``R``.

    Small ranks use a randomized range finder with two power iterations (Halko et al.) seeded by
    ``seed``, not the global RNG, so a resumed run refits exactly like an uninterrupted one.
    """
    rank = L.shape[1]
    if rank * 2 < min(m.shape):
        generator = torch.Generator(device=m.device).manual_seed(seed)
        probe = torch.randn(m.shape[1], min(rank + 8, min(m.shape)), generator=generator, dtype=m.dtype,
                            device=m.device)
        Q = torch.linalg.qr(m @ probe).Q
        for _ in range(2):
            Q = torch.linalg.qr(m @ torch.linalg.qr(m.mT @ Q).Q).Q
        U, S, Vh = torch.linalg.svd(Q.mT @ m, full_matrices=False)
        U = Q @ U
    else:
        U, S, Vh = torch.linalg.svd(m, full_matrices=False)
    root = S[:rank].sqrt()
    L.copy_(U[:, :rank] * root)
    R.copy_(root[:, None] * Vh[:rank])


def _ridge_solve_right(A: Tensor, gram: Tensor) -> Tensor:
    """``A @ (gram + ridge)^-1`` for a symmetric positive semi-definite ``gram``."""
    ridge = _RIDGE * gram.diagonal().mean().clamp_min(torch.finfo(gram.dtype).tiny)
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return torch.linalg.solve(gram + ridge * eye, A, left=False)


def refine_factors(m: Tensor, L: Tensor, R: Tensor, steps: int, solver: str) -> None:
    """``steps`` alternating warm-started descent steps on ``||L R - m||_F^2``, in place.

    ``scaled_gd`` takes the unit step preconditioned by the other factor's Gram matrix,
    ``L <- L - (L R - m) R^T (R R^T)^-1`` (algebraically ``m R^T (R R^T)^-1``, an exact solve for
    ``L``; the correction form is kept because it loses less to the Gram's conditioning).
    """
    for _ in range(steps):
        grad_L = (L @ R - m) @ R.mT
        if solver == "scaled_gd":
            L.sub_(_ridge_solve_right(grad_L, R @ R.mT))
        else:
            L.sub_(grad_L, alpha=1.0 / _sigma_max_sq(R))
        grad_R = L.mT @ (L @ R - m)
        if solver == "scaled_gd":
            R.sub_(_ridge_solve_right(grad_R.mT, L.mT @ L).mT)
        else:
            R.sub_(grad_R, alpha=1.0 / _sigma_max_sq(L))


def _sigma_max_sq(F: Tensor) -> float:
    gram = F.mT @ F if F.shape[0] >= F.shape[1] else F @ F.mT
    return max(float(torch.linalg.eigvalsh(gram)[-1]), torch.finfo(F.dtype).tiny)


def debiased_lowrank_momentum(
    grad: Tensor,
    L: Tensor,
    R: Tensor,
    *,
    beta1: float,
    decay: float,
    grad_weight: float,
    refit: bool,
    inner_steps: int,
    solver: str,
    seed: int = 0,
) -> Tuple[Tensor, Tensor]:
    """Update the factors in place; return ``(m_c, r)``: the debiased momentum and the residual."""
    m = torch.addmm(grad, L, R, beta=(1 - beta1) * grad_weight, alpha=decay)
    if refit:
        fit_factors(m, L, R, seed)
    else:
        refine_factors(m, L, R, inner_steps, solver)
    residual = L @ R - m
    corrected = m.sub_(residual, alpha=1.0 / (1 - beta1))
    return corrected, residual
