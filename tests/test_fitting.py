"""Closed-form fits recover planted linear maps from streamed float64 statistics."""
import torch

from subfit.fitting import full_fit, fit_in_basis, reduced_rank_fit, shared_basis
from subfit.selection import token_weights
from subfit.stats import UnitStats, uniform_weights


def _stats(x, y, weights=uniform_weights):
    s = UnitStats(x.shape[1], y.shape[1], "cpu")
    for xb, yb in zip(x.split(300), y.split(300)):  # streamed in batches, like a calibration walk
        s.add(xb, yb, xb, weights(xb))
    return s


def _planted(n=2000, d=48, rank=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) * torch.linspace(0.1, 3.0, d) + 5.0  # off-centre, uneven scales
    w = torch.randn(d, rank, generator=g) @ torch.randn(rank, d, generator=g) / d**0.5
    bias = torch.randn(d, generator=g)
    return x, w, bias


def test_reduced_rank_fit_recovers_planted_low_rank_affine_map():
    x, w, bias = _planted()
    y = x @ w + bias
    fit = reduced_rank_fit(_stats(x, y).moments(), rank=6, ridge=1e-8)
    pred = x.double() @ fit.down @ fit.up + fit.bias
    assert float((pred - y.double()).norm() / y.double().norm()) < 1e-5
    assert fit.error < 1e-8 * float(y.double().var(0).sum())


def test_reduced_rank_fit_error_formula_matches_activations():
    """The error computed from moments alone equals the error measured on the data."""
    x, w, bias = _planted()
    y = x @ w + bias + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    for weights in (uniform_weights, token_weights):
        stats = _stats(x, y, weights)
        fit = reduced_rank_fit(stats.moments(), rank=3, ridge=1e-3)
        resid = y.double() - (x.double() @ fit.down @ fit.up + fit.bias)
        wts = weights(x)
        measured = float((wts * resid.pow(2).sum(-1)).sum() / wts.sum())
        assert abs(measured - fit.error) <= 1e-6 * measured


def test_shared_basis_recovers_units_that_share_an_input_subspace():
    g = torch.Generator().manual_seed(3)
    d, r = 40, 5
    basis_true = torch.linalg.qr(torch.randn(d, r, generator=g)).Q
    moments = []
    for unit in range(3):
        x = torch.randn(1500, d, generator=g) * (1 + unit)
        y = (x @ basis_true) @ torch.randn(r, d, generator=g) + torch.randn(d, generator=g)
        moments.append((x, y, _stats(x, y).moments()))
    basis = shared_basis([m for _, _, m in moments], rank=r, ridge=1e-9)
    for x, y, m in moments:
        fit = fit_in_basis(m, basis, ridge=1e-9)
        assert fit.error < 1e-7 * m.var_y
        pred = x.double() @ fit.down @ fit.up + fit.bias
        assert float((pred - y.double()).norm() / y.double().norm()) < 1e-4


def test_full_fit_survives_a_rank_deficient_input():
    """Collinear inputs make X^T X singular; the ridge keeps the solve finite and accurate."""
    g = torch.Generator().manual_seed(4)
    base = torch.randn(800, 10, generator=g)
    x = torch.cat([base, base[:, :5] * 2.0], dim=1)  # 15 columns, rank 10
    y = base @ torch.randn(10, 7, generator=g)
    fit = full_fit(_stats(x, y).moments(), ridge=1e-6)
    assert torch.isfinite(fit.down).all()
    assert fit.error < 1e-4 * float(y.var(0).sum())


def test_centred_statistics_merge_batches_exactly_and_float32_products_stay_close():
    """Batch-by-batch merging gives the moments of the whole data, even with a mean far larger than
    the spread (no cancellation); float32 products (centred in float32) stay within 1e-5 of float64
    and bfloat16 products (scoring walks) within 1e-2."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3000, 24, generator=g) * 0.01 + 100.0  # mean 1e4 times the spread
    y = x @ torch.randn(24, 16, generator=g) + torch.randn(3000, 16, generator=g)
    w = torch.rand(3000, generator=g).double() + 0.5
    exact_x, exact_y = x.double(), y.double()
    mean_x = (w[:, None] * exact_x).sum(0) / w.sum()
    mean_y = (w[:, None] * exact_y).sum(0) / w.sum()
    cov_xx = ((w[:, None] * (exact_x - mean_x)).T @ (exact_x - mean_x)) / w.sum()
    cov_xy = ((w[:, None] * (exact_x - mean_x)).T @ (exact_y - mean_y)) / w.sum()
    var_y = float((w * (exact_y - mean_y).pow(2).sum(-1)).sum() / w.sum())
    energy = float((w * exact_x.pow(2).sum(-1)).sum())
    for dtype, tolerance in ((torch.float64, 1e-10), (torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        s = UnitStats(24, 16, "cpu", dtype)
        for rows in torch.arange(3000).split(700):  # uneven batches
            s.add(x[rows], y[rows], x[rows], w[rows])
        m = s.moments()
        assert float((m.cov_xx - cov_xx).norm() / cov_xx.norm()) < tolerance, dtype
        assert float((m.cov_xy - cov_xy).norm() / cov_xy.norm()) < tolerance, dtype
        assert float((m.mean_x - mean_x).norm() / mean_x.norm()) < 1e-12
        assert float((m.mean_y - mean_y).norm() / mean_y.norm()) < 1e-10
        assert abs(m.var_y - var_y) < 1e-5 * var_y and abs(float(s.energy) - energy) < 1e-6 * energy
