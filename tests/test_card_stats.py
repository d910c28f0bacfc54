"""Exactness of the card's statistics against brute force (docs/design.md §3 'Exactness')."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from layercard.card import stats
from layercard.errors import LayercardError


def _problem(seed: int = 0, n: int = 200, d_in: int = 12, d_out: int = 7, cond: float = 30.0):
    rng = np.random.default_rng(seed)
    # Anisotropic inputs so that whitening matters.
    scales = np.geomspace(1.0, cond, d_in)
    x = rng.standard_normal((n, d_in)) * scales
    w = rng.standard_normal((d_out, d_in))
    t = rng.standard_normal((n, d_out)) * 5
    return x, w, t


def _sq_loss(x, w, t) -> float:
    r = x @ w.T - t
    return 0.5 * float((r * r).sum())


def _streamed_spectrum(x: np.ndarray, chunks: int = 5) -> stats.Spectrum:
    xtx = np.zeros((x.shape[1], x.shape[1]))
    for part in np.array_split(x, chunks):
        xtx += part.T @ part
    return stats.spectrum(xtx, x.shape[0])


def test_quadratic_identity_linear_model():
    """½·resnorm² equals the loss decrease of the least-squares correction (λ → 0)."""
    x, w, t = _problem()
    g = x @ w.T - t  # ∂L/∂Y for L = ½‖XWᵀ − T‖²
    grad = g.T @ x
    spec = _streamed_spectrum(x)
    rsq = stats.resnorm_sq_from_energy(stats.grad_eig_energy(grad, spec), spec.eigenvalues, spec.n, 1e-14)
    sigma = x.T @ x / x.shape[0]
    dw = -grad @ np.linalg.inv(sigma) / x.shape[0]
    drop = _sq_loss(x, w, t) - _sq_loss(x, w + dw, t)
    assert drop > 0
    assert 0.5 * rsq == pytest.approx(drop, rel=1e-8)
    # resnorm² = ‖P_X G‖²_F when λ = 0.
    proj = x @ np.linalg.pinv(x) @ g
    assert rsq == pytest.approx(float((proj * proj).sum()), rel=1e-8)


@pytest.mark.parametrize("delta", [1e-3, 0.1, 10.0])
def test_damped_optimum_matches(delta: float):
    """With damping, ½·resnorm²(δ) is the optimum of the damped quadratic model."""
    x, w, t = _problem(seed=1)
    n = x.shape[0]
    grad = (x @ w.T - t).T @ x
    spec = _streamed_spectrum(x)
    rsq = stats.resnorm_sq_from_energy(stats.grad_eig_energy(grad, spec), spec.eigenvalues, n, delta)
    sigma = x.T @ x / n
    lam = delta * np.trace(sigma) / sigma.shape[0]
    sl = sigma + lam * np.eye(sigma.shape[0])
    dw = -grad @ np.linalg.inv(sl) / n
    model_drop = -(float((grad * dw).sum()) + 0.5 * n * float(np.trace(dw @ sl @ dw.T)))
    assert 0.5 * rsq == pytest.approx(model_drop, rel=1e-9)


def test_captured_matches_bruteforce_svd():
    x, w, t = _problem(seed=2, d_in=10, d_out=8)
    n = x.shape[0]
    grad = (x @ w.T - t).T @ x
    spec = _streamed_spectrum(x)
    delta = 1e-3
    m = stats.whitened_gradient(grad, spec, delta)
    cap = stats.captured(stats.singular_values_sq(m), ranks=(1, 2, 4, 8, 16))
    sigma = x.T @ x / n
    lam = delta * np.trace(sigma) / sigma.shape[0]
    inv_sqrt = np.real(scipy.linalg.inv(scipy.linalg.sqrtm(sigma + lam * np.eye(sigma.shape[0]))))
    m_direct = grad @ inv_sqrt / np.sqrt(n)
    sv = np.linalg.svd(m_direct, compute_uv=False)
    for r, v in cap.items():
        assert v == pytest.approx(float((sv[:r] ** 2).sum()), rel=1e-8)
    # Full rank captures everything: captured@d = resnorm².
    rsq = stats.resnorm_sq_from_energy(stats.grad_eig_energy(grad, spec), spec.eigenvalues, n, delta)
    assert cap[16] == pytest.approx(rsq, rel=1e-8)


def test_first_step_rate_equals_adam_step_on_linear_model():
    """On a squared-loss linear model the quadratic model is exact, so the rate is the true decrease."""
    x, w, t = _problem(seed=3, d_in=9, d_out=6)
    n = x.shape[0]
    r, alpha, lr = 4, 8.0, 1e-3
    s = alpha / r
    rng = np.random.default_rng(0)
    a = stats.lora_a_init(x.shape[1], r, rng)
    xt = torch.tensor(x)
    b = torch.zeros(w.shape[0], r, dtype=torch.float64, requires_grad=True)
    w_t = torch.tensor(w)
    a_t = torch.tensor(a)
    loss = 0.5 * ((xt @ (w_t + s * b @ a_t).T - torch.tensor(t)) ** 2).sum()
    opt = torch.optim.Adam([b], lr=lr, eps=1e-30)
    loss.backward()
    grad = (x @ w.T - t).T @ x
    opt.step()
    with torch.no_grad():
        new = 0.5 * ((xt @ (w_t + s * b @ a_t).T - torch.tensor(t)) ** 2).sum()
    drop = float((loss - new).detach())
    sigma = x.T @ x / n
    rate, lin, quad = stats.first_step_rate(grad, [a], [a @ sigma @ a.T], lr=lr, scale=s, curvature=n)
    assert rate == pytest.approx(drop, rel=1e-6)
    assert lin > quad > 0


def test_input_stats_isotropic_and_anisotropic():
    iso = stats.input_stats(np.full(8, 2.0), 1e-3)
    assert iso.energy == pytest.approx(2.0)
    assert iso.kappa == pytest.approx(1.0)
    assert iso.effective_rank == pytest.approx(8.0)
    assert iso.noise_amplification == pytest.approx(1 / 1.001, rel=1e-9)
    ani = stats.input_stats(np.array([1e-6, 1.0, 1.0, 100.0]), 1e-3)
    assert ani.kappa > 100 and ani.effective_rank < 4 and ani.noise_amplification > 1
    silent = stats.input_stats(np.zeros(8), 1e-3)  # a dead input spans no direction, not all eight
    assert silent.effective_rank == 0.0 and silent.energy == 0.0


def test_a_matrix_that_overflowed_is_refused_before_its_decomposition():
    for bad in (np.full((3, 3), np.inf), np.array([[1.0, np.nan], [np.nan, 1.0]])):
        with pytest.raises(LayercardError, match="is not finite"):
            stats.spectrum(bad, 4)
    with pytest.raises(LayercardError, match="is not finite"):
        stats.singular_values_sq(np.full((2, 3), 1e30, dtype=np.float32))  # its Gram overflows float32


def test_set_gain_reduces_to_sum_and_penalises_redundancy():
    g = np.array([1.0, 2.0, 3.0])
    assert stats.set_gain(g, np.eye(3)) == pytest.approx(6.0, rel=1e-5)
    same = np.ones((2, 2))
    # Two identical, fully coupled units give what one gives, not twice.
    assert stats.set_gain(np.array([2.0, 2.0]), same, ridge=1e-9) == pytest.approx(2.0, rel=1e-3)
    partial = np.array([[1.0, 0.5], [0.5, 1.0]])
    assert 2.0 < stats.set_gain(np.array([2.0, 2.0]), partial) < 4.0


def test_coupling_matrix_identical_and_orthogonal():
    e = np.array([[1.0, 2.0, 0.0], [2.0, 4.0, 0.0], [0.0, 0.0, 3.0]])
    c = stats.coupling_matrix(e)
    assert c[0, 1] == pytest.approx(1.0)
    assert c[0, 2] == pytest.approx(0.0)
    assert stats.redundancy(c) == pytest.approx(1.0)


def test_spearman():
    assert stats.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert stats.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)


def test_set_gain_never_exceeds_additive():
    near = np.array([[1.0, 0.999], [0.999, 1.0]])
    g = np.array([1.0, 0.9])
    v = stats.set_gain(g, near)
    assert g.max() <= v <= g.sum()


@pytest.mark.parametrize("scale", [1.0, 1e-170, 1e170])
def test_coupling_is_a_cosine_at_any_scale(scale):
    e = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]]) * scale  # 45°, and a row of no effect
    c = stats.coupling_matrix(e)
    assert c[0, 1] == pytest.approx(math.sqrt(0.5)) and c[0, 2] == 0.0 and np.isfinite(c).all()


def test_coupling_diagonal_is_exactly_one_even_for_a_layer_of_no_effect():
    """A unit is fully coupled with itself: C_uu = 1 exactly, also where its effect was measured as zero
    (its cosine with itself is undefined): the set gain and ρ(S) read C − I as the coupling between units."""
    e = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [0.3, -0.7, 0.1], [1e-3, 1e-3, 0.0]])
    c = stats.coupling_matrix(e)
    assert (np.diag(c) == 1.0).all()
    assert c[1, 0] == c[1, 2] == 0.0  # no effect: orthogonal to every other unit
