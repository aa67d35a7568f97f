"""Closed-form bypass fits from float64 moment statistics: pure linear algebra, no model code.

Every fit is affine (the bias absorbs the mean of a unit's output, a large share of it), solved
with a Cholesky factorisation plus a ridge relative to the input's variance, never an inverse.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Moments:
    """Weighted, centred second moments of a unit's input x and output y (float64)."""

    weight: float  # sum of token weights
    mean_x: torch.Tensor  # [d_in]
    mean_y: torch.Tensor  # [d_out]
    cov_xx: torch.Tensor  # [d_in, d_in]
    cov_xy: torch.Tensor  # [d_in, d_out]
    var_y: float  # trace of cov_yy


@dataclass
class LinearFit:
    """`y ~= x @ down @ up + bias`, and the weighted mean squared error it leaves."""

    down: torch.Tensor
    up: torch.Tensor
    bias: torch.Tensor
    error: float  # E_w ||y - fit(x)||^2 per unit weight


def _ridge(cov: torch.Tensor, ridge: float) -> torch.Tensor:
    """cov + ridge * mean eigenvalue * I: scale-free, so one default suits every layer."""
    d = cov.shape[0]
    lam = ridge * cov.diagonal().mean().clamp_min(1e-30)
    return cov + lam * torch.eye(d, dtype=cov.dtype, device=cov.device)


def _solve(cov: torch.Tensor, rhs: torch.Tensor, ridge: float) -> torch.Tensor:
    """(cov + ridge) X = rhs by Cholesky; lstsq if the factorisation still fails."""
    regularised = _ridge(cov, ridge)
    chol, info = torch.linalg.cholesky_ex(regularised)
    if int(info) == 0:
        return torch.cholesky_solve(rhs, chol)
    return torch.linalg.lstsq(regularised, rhs).solution


def residual_error(m: Moments, weight: torch.Tensor) -> float:
    """E||y - mean_y - (x - mean_x) @ weight||^2 from moments alone (no activations needed)."""
    explained = 2 * (weight * m.cov_xy).sum() - (weight * (m.cov_xx @ weight)).sum()
    return max(float(m.var_y - explained), 0.0)


def reduced_rank_fit(m: Moments, rank: int, ridge: float) -> LinearFit:
    """Reduced-rank ridge regression: the ridge solution projected on its top `rank` output
    directions (the principal directions of the fitted values)."""
    full = _solve(m.cov_xx, m.cov_xy, ridge)  # [d_in, d_out]
    rank = min(rank, *full.shape)
    fitted_cov = full.T @ m.cov_xx @ full
    eigvals, eigvecs = torch.linalg.eigh((fitted_cov + fitted_cov.T) / 2)
    top = eigvecs[:, eigvals.argsort(descending=True)[:rank]]  # [d_out, rank]
    down, up = full @ top, top.T
    return _affine(m, down, up)


def shared_basis(moments: list[Moments], rank: int, ridge: float) -> torch.Tensor:
    """An input basis [d, rank] shared by several units: reduced-rank regression on all their
    outputs at once. Each unit's ridge coefficients are stacked side by side and the top `rank`
    input directions taken in the metric of the units' average input covariance, so a single unit
    gives exactly its own reduced-rank input space."""
    if not moments:
        raise ValueError("shared_basis needs the statistics of at least one unit.")
    mean_cov = sum(m.cov_xx for m in moments) / len(moments)
    eigvals, eigvecs = torch.linalg.eigh(_ridge(mean_cov, ridge))
    root = eigvals.clamp_min(1e-30).sqrt()
    coefficients = torch.cat([_solve(m.cov_xx, m.cov_xy, ridge) for m in moments], dim=1)  # [d, units * d_out]
    left, _, _ = torch.linalg.svd((eigvecs * root) @ eigvecs.T @ coefficients, full_matrices=False)
    basis = (eigvecs / root) @ eigvecs.T @ left[:, : min(rank, left.shape[1])]
    return torch.linalg.qr(basis).Q  # orthonormal columns, same span


def fit_in_basis(m: Moments, basis: torch.Tensor, ridge: float) -> LinearFit:
    """Per-unit output map for inputs projected on a fixed (shared) basis."""
    cov_zz = basis.T @ m.cov_xx @ basis
    up = _solve(cov_zz, basis.T @ m.cov_xy, ridge)
    return _affine(m, basis, up)


def full_fit(m: Moments, ridge: float) -> LinearFit:
    """Full-rank ridge regression with bias (ReplaceMe-style block maps, planted-case tests)."""
    full = _solve(m.cov_xx, m.cov_xy, ridge)
    eye = torch.eye(full.shape[1], dtype=full.dtype, device=full.device)
    return _affine(m, full, eye)


def _affine(m: Moments, down: torch.Tensor, up: torch.Tensor) -> LinearFit:
    weight = down @ up
    bias = m.mean_y - m.mean_x @ weight
    return LinearFit(down, up, bias, residual_error(m, weight))
