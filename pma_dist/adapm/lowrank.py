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

Sharding. Every function takes a :class:`BlockLayout`: the block may be split over ranks along its
rows or its columns (FSDP2 gives each rank a slice of a weight's first axis, which is a block's rows
or, for a transposed fused-QKV slice, its columns). The factor along the split axis is split with
it, the other is replicated, and every product that contracts over the split axis is a partial sum
the layout's ``sum_rows`` / ``sum_cols`` completes (one all-reduce of small matrices). Everything
else is local. A single process uses :data:`local_layout`, whose sums are the identity, so the
single-process and the sharded optimizer run one algorithm: the refit's orthonormalisations are
Gram-based (Cholesky-QR's rank-revealing form, :func:`gram_qr`), which needs only a k x k Gram sum,
where Householder QR would need the whole tall matrix on one rank.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Tuple

import torch
from torch import Tensor

SOLVERS = ("scaled_gd", "gd")

# Tikhonov term of the Gram solves, relative to the Gram's mean eigenvalue: keeps a rank-deficient
# momentum (e.g. a block whose gradient has rank < r) from producing inf/nan factors.
_RIDGE = 1e-12
# Columns the range finder samples beyond the rank (Halko et al.'s oversampling p).
_OVERSAMPLE = 8

Sum = Callable[..., Tuple[Tensor, ...]]


def _no_sum(*tensors: Tensor) -> Tuple[Tensor, ...]:
    return tensors


@dataclass(frozen=True)
class BlockLayout:
    """How one (m, n) block is split over ranks.

    ``shape`` is the whole block's; ``sum_rows(*partials)`` completes products contracted over the
    block's rows (identity unless the rows are split), ``sum_cols`` the same for columns;
    ``col_start`` is the global index of this rank's first column (it picks the rows of the seeded
    random probe).
    """

    shape: Tuple[int, int]
    sum_rows: Sum = _no_sum
    sum_cols: Sum = _no_sum
    col_start: int = 0


def local_layout(m: Tensor) -> BlockLayout:
    return BlockLayout(tuple(m.shape))


def gram_qr(X: Tensor, sum_rows: Sum = _no_sum) -> Tuple[Tensor, Tensor]:
    """``X ~ Q R`` with ``Q``'s columns orthonormal or zero (rows split like ``X``'s) and ``R`` k x k.

    Cholesky-QR in its rank-revealing form (SVQR, Stathopoulos & Wu 2002): the k x k Gram
    ``X^T X = V diag(lam) V^T`` (one summed message), ``Q = X V diag(lam)^-1/2``, ``R = diag(lam)^1/2 V^T``,
    done twice so the second pass repairs the first's loss of orthogonality (~ u cond(X)^2), like
    CholeskyQR2. Plain Cholesky has no factor when ``X`` is rank-deficient (a momentum of rank < k,
    a zero gradient), which Householder QR never minded; here directions with ``lam`` below
    ``k u lam_max`` are dropped as zero columns (their part of ``X`` is below rounding), so ``Q Q^T``
    stays an exact projector onto the rest. The Gram and its solve are float64 whatever the state
    dtype (a float32 Gram would bury directions below ~1e-3 of the largest in rounding).
    """
    work = X.to(torch.float64)
    k = X.shape[-1]
    R = torch.eye(k, dtype=work.dtype, device=X.device)
    for _ in range(2):
        (gram,) = sum_rows(work.mT @ work)
        lam, V = torch.linalg.eigh(gram)
        keep = lam > k * torch.finfo(work.dtype).eps * lam[-1].clamp_min(torch.finfo(work.dtype).tiny)
        root = torch.where(keep, lam.clamp_min(0).sqrt(), torch.zeros_like(lam))
        work = work @ (V * torch.where(keep, 1 / root.clamp_min(torch.finfo(work.dtype).tiny), root))
        R = (V * root).mT @ R
    return work.to(X.dtype), R.to(X.dtype)


def fit_factors(m: Tensor, L: Tensor, R: Tensor, seed: int = 0, layout: BlockLayout = None) -> None:
    """Best rank-r approximation of ``m`` (truncated SVD), written into ``L`` and ``R``.

    A randomized range finder (Halko et al.) seeded by ``seed``, not the global RNG, so a resumed run
    refits exactly like an uninterrupted one: ``k = min(r + 8, min(m, n))`` probe columns, two power
    iterations when ``2 r < min(m, n)`` (with ``k = min(m, n)`` the range is exact without them), then
    the SVD of the small ``Q^T m`` through a Gram QR of its transpose and a k x k SVD.
    """
    layout = layout or local_layout(m)
    rows, cols = layout.shape
    rank = L.shape[1]
    k = min(rank + _OVERSAMPLE, rows, cols)
    generator = torch.Generator(device=m.device).manual_seed(seed)
    probe = torch.randn(cols, k, generator=generator, dtype=m.dtype, device=m.device)
    probe = probe[layout.col_start:layout.col_start + m.shape[1]]
    (Y,) = layout.sum_cols(m @ probe)
    Q, _ = gram_qr(Y, layout.sum_rows)
    if 2 * rank < min(rows, cols):
        for _ in range(2):
            (Z,) = layout.sum_rows(m.mT @ Q)
            Z, _ = gram_qr(Z, layout.sum_cols)
            (Y,) = layout.sum_cols(m @ Z)
            Q, _ = gram_qr(Y, layout.sum_rows)
    (B,) = layout.sum_rows(Q.mT @ m)  # (k, n), columns split like m's
    Qb, Rb = gram_qr(B.mT, layout.sum_cols)  # B = Rb^T Qb^T
    U, S, Wh = torch.linalg.svd(Rb.mT)
    root = S[:rank].sqrt()
    L.copy_((Q @ U[:, :rank]) * root)
    R.copy_(root[:, None] * (Wh[:rank] @ Qb.mT))


def _ridge_solve_right(A: Tensor, gram: Tensor) -> Tensor:
    """``A @ (gram + ridge)^-1`` for a symmetric positive semi-definite ``gram``."""
    ridge = _RIDGE * gram.diagonal().mean().clamp_min(torch.finfo(gram.dtype).tiny)
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return torch.linalg.solve(gram + ridge * eye, A, left=False)


def refine_factors(m: Tensor, L: Tensor, R: Tensor, steps: int, solver: str, layout: BlockLayout = None) -> None:
    """``steps`` alternating warm-started descent steps on ``||L R - m||_F^2``, in place.

    ``scaled_gd`` takes the unit step preconditioned by the other factor's Gram matrix,
    ``L <- L - (L R - m) R^T (R R^T)^-1`` (algebraically ``m R^T (R R^T)^-1``, an exact solve for
    ``L``; the correction form is kept because it loses less to the Gram's conditioning). The ``L``
    step contracts over columns, the ``R`` step over rows: with rows split, the ``L`` step is local
    and the ``R`` step sums one r x (n + r) message (its gradient and ``L``'s Gram).
    """
    layout = layout or local_layout(m)
    for _ in range(steps):
        grad_L, gram_R = layout.sum_cols((L @ R - m) @ R.mT, R @ R.mT)
        if solver == "scaled_gd":
            L.sub_(_ridge_solve_right(grad_L, gram_R))
        else:
            L.sub_(grad_L, alpha=1.0 / _largest_eigenvalue(gram_R))
        grad_Rt, gram_L = layout.sum_rows((L @ R - m).mT @ L, L.mT @ L)
        if solver == "scaled_gd":
            R.sub_(_ridge_solve_right(grad_Rt, gram_L).mT)
        else:
            R.sub_(grad_Rt.mT, alpha=1.0 / _largest_eigenvalue(gram_L))


def _largest_eigenvalue(gram: Tensor) -> float:
    """sigma_max^2 of a factor, from its r x r Gram matrix."""
    return max(float(torch.linalg.eigvalsh(gram)[-1]), torch.finfo(gram.dtype).tiny)


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
    layout: BlockLayout = None,
) -> Tuple[Tensor, Tensor]:
    """Update the factors in place; return ``(m_c, r)``: the debiased momentum and the residual (this
    rank's part of each when the block is split)."""
    m = torch.addmm(grad, L, R, beta=(1 - beta1) * grad_weight, alpha=decay)
    if refit:
        fit_factors(m, L, R, seed, layout)
    else:
        refine_factors(m, L, R, inner_steps, solver, layout)
    residual = L @ R - m
    corrected = m.sub_(residual, alpha=1.0 / (1 - beta1))
    return corrected, residual
