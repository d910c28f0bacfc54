"""Pure statistics of the Layer Card (docs/design.md §3, §3a, §4).

Everything here is a function of numpy arrays, with no model or hook in sight, so the maths can be
tested against brute force. The matrix work runs in the precision of the arrays it is given (float32 for a
float32 model's sums, float64 otherwise); sums that become a scalar, and every returned eigenvalue, are
float64. Notation: a unit has weight W (d_out × d_in); X (n × d_in) are
its input rows over the probe positions and G = ∂L/∂Y (n × d_out) the output gradients, so
∇W = Gᵀ X and Σ = XᵀX / n.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from layercard.errors import LayercardError

CAPTURE_RANKS: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)


@dataclass(frozen=True)
class Spectrum:
    """Eigen-decomposition of an input covariance Σ = U diag(λ) Uᵀ (λ ascending, clipped at 0)."""

    eigenvalues: np.ndarray  # (d,), float64
    eigenvectors: np.ndarray  # (d, d), columns, in the precision Σ was decomposed in
    n: int  # positions the covariance was averaged over

    @property
    def dim(self) -> int:
        return int(self.eigenvalues.shape[0])

    @property
    def trace(self) -> float:
        return float(self.eigenvalues.sum())


def _eigh(sym: np.ndarray, *, vectors: bool = True, upper: bool = False):
    # numpy's LAPACK reads one triangle. (SciPy's eigh, same driver, ran 1.6× slower here after a torch
    # pass: its own BLAS threads compete with torch's.)
    uplo = "U" if upper else "L"
    if not np.isfinite(sym).all():  # LAPACK would fail on it with "did not converge", or return noise
        raise LayercardError(
            f"a {sym.shape[0]}×{sym.shape[1]} matrix of the card's statistics is not finite (NaN or "
            f"infinite): its values overflowed {sym.dtype}"
        )
    return np.linalg.eigh(sym, UPLO=uplo) if vectors else np.linalg.eigvalsh(sym, UPLO=uplo)


def spectrum(xtx: np.ndarray, n: int, *, vectors_dtype: type = np.float64) -> Spectrum:
    """Σ = XᵀX / n from an accumulated XᵀX, eigen-decomposed in float64; only the upper triangle of ``xtx``
    is read (the probe sums only that half).

    The decomposition stays in float64 even for float32 sums: in float32 its own error reaches the small
    eigenvalues that the whitening divides by (docs/card.md, "Precision"). ``vectors_dtype`` is the precision
    the eigenvectors are kept in for the per-unit products that read them.
    """
    if n <= 0:
        raise ValueError("covariance over zero positions")
    sigma = np.asarray(xtx, dtype=np.float64) / n
    lam, u = _eigh(sigma, upper=True)
    return Spectrum(np.clip(lam, 0.0, None), u.astype(vectors_dtype, copy=False), n)


def damping(eigenvalues: np.ndarray, delta: float) -> float:
    """λ = δ·tr(Σ)/d_in (docs/design.md §3). A tiny floor keeps an all-zero input finite."""
    d = eigenvalues.shape[0]
    lam = delta * float(eigenvalues.sum()) / d
    return max(lam, 1e-30)


def eig_projection(grad: np.ndarray, spec: Spectrum) -> np.ndarray:
    """∇W U: the gradient in Σ's eigenbasis, which both the energies and the whitened gradient start from."""
    u = spec.eigenvectors
    return np.asarray(grad, dtype=u.dtype) @ u


def grad_eig_energy(grad: np.ndarray, spec: Spectrum, proj: np.ndarray | None = None) -> np.ndarray:
    """eⱼ = ‖∇W uⱼ‖²: the gradient's energy along each eigenvector of Σ (``proj``: ∇W U when known).

    Stored in the card so resnorm can be re-evaluated at any damping without a new pass.
    """
    proj = eig_projection(grad, spec) if proj is None else proj
    return np.einsum("ij,ij->j", proj, proj).astype(np.float64)


def resnorm_sq_from_energy(energy: np.ndarray, eigenvalues: np.ndarray, n: int, delta: float) -> float:
    """resnorm² = tr(∇W Σλ⁻¹ ∇Wᵀ) / n = Σⱼ eⱼ / (λⱼ + λ) / n."""
    lam = damping(eigenvalues, delta)
    e = np.asarray(energy, dtype=np.float64)
    return float(np.sum(e / (np.asarray(eigenvalues, dtype=np.float64) + lam)) / n)


def whitened_gradient(
    grad: np.ndarray, spec: Spectrum, delta: float, proj: np.ndarray | None = None
) -> np.ndarray:
    """M = ∇W Σλ^{-1/2} / √n in Σ's eigenbasis (same singular values); ``proj``: ∇W U when known."""
    lam = damping(spec.eigenvalues, delta)
    proj = eig_projection(grad, spec) if proj is None else proj
    w = (1.0 / np.sqrt(spec.eigenvalues + lam) / math.sqrt(spec.n)).astype(proj.dtype)
    return proj * w[None, :]


def singular_values_sq(m: np.ndarray) -> np.ndarray:
    """σᵢ(M)² in descending order, via the eigenvalues of the smaller Gram matrix."""
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is refused by name just below
        gram = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
    # The decomposition reads one triangle, so rounding asymmetry in the product needs no averaging out.
    ev = _eigh(gram, vectors=False).astype(np.float64)
    return np.clip(ev[::-1], 0.0, None)


def captured(sv_sq: np.ndarray, ranks: Sequence[int] = CAPTURE_RANKS) -> dict[int, float]:
    """captured@r = Σ_{i≤r} σᵢ(M)²: what the best rank-r update captures (Eckart–Young)."""
    cs = np.cumsum(sv_sq)
    out: dict[int, float] = {}
    for r in ranks:
        k = min(r, cs.shape[0])
        out[int(r)] = float(cs[k - 1]) if k > 0 else 0.0
    return out


# IQR of a standard normal (2·0.6745): turns the spread of the singular values into a scale σ̂.
_IQR_PER_SIGMA = 1.349


def weight_snr(singular_values: np.ndarray, shape: tuple[int, int]) -> float:
    """Signal-to-noise ratio of a weight matrix by the Marchenko–Pastur rule (docs/design.md §3).

    σ̂ = IQR(s)/1.349 is a noise scale read off the bulk of the singular values s (quartiles with linear
    interpolation), and ε = σ̂·(1 + √β) with β = min(m, n)/max(m, n) the aspect ratio of the m × n matrix
    is the edge of that bulk: values above it are signal. SNR = Σ_{s>ε} s / Σ_{s≤ε} s / s_max. The noise
    sum counts as 1 when nothing (or only zeros) falls below ε, and a zero matrix has SNR 0. Dividing by
    s_max makes the value scale with 1/‖W‖₂: matrices are compared as the rule compares them, within a role.
    """
    s = np.sort(np.abs(np.asarray(singular_values, dtype=np.float64)))[::-1]
    if s.size == 0 or s[0] <= 0:
        return 0.0
    m, n = (int(x) for x in shape)
    beta = min(m, n) / max(m, n)
    q75, q25 = np.quantile(s, [0.75, 0.25])
    eps = (q75 - q25) / _IQR_PER_SIGMA * (1.0 + math.sqrt(beta))
    signal = float(s[s > eps].sum())
    noise = float(s[s <= eps].sum())
    # The rule's own fallback for an empty noise sum; a zero sum would give no finite ratio to store.
    noise = noise if noise > 0 else 1.0
    return signal / noise / float(s[0])


@dataclass(frozen=True)
class InputStats:
    """Conditioning of one input covariance (docs/design.md §3, activation energy row)."""

    energy: float  # tr(Σ)/d_in
    kappa: float  # λmax/λmin of Σλ
    effective_rank: float  # exp(H(λ/Σλ))
    noise_amplification: float  # tr(Σλ⁻¹)·tr(Σ)/d_in² (1 when isotropic)


def input_stats(eigenvalues: np.ndarray, delta: float) -> InputStats:
    lam_vec = np.asarray(eigenvalues, dtype=np.float64)
    d = lam_vec.shape[0]
    tr = float(lam_vec.sum())
    lam = damping(lam_vec, delta)
    damped = lam_vec + lam
    p = lam_vec / tr if tr > 0 else np.full(d, 1.0 / d)
    nz = p[p > 0]
    entropy = float(-(nz * np.log(nz)).sum())
    return InputStats(
        energy=tr / d,
        kappa=float(damped.max() / damped.min()),
        effective_rank=float(math.exp(entropy)) if tr > 0 else 0.0,  # a silent input spans no direction
        noise_amplification=float(np.sum(1.0 / damped) * tr / d**2) if tr > 0 else 1.0,
    )


def lora_a_init(d_in: int, rank: int, generator: np.random.Generator) -> np.ndarray:
    """LoRA A as PEFT initialises it: kaiming_uniform(a=√5) → U(−1/√d_in, 1/√d_in)."""
    bound = 1.0 / math.sqrt(d_in)
    return generator.uniform(-bound, bound, size=(rank, d_in))


def first_step_rate(
    grad: np.ndarray,
    a_draws: Sequence[np.ndarray],
    a_sigma_a: Sequence[np.ndarray],
    *,
    lr: float,
    scale: float,
    curvature: float,
) -> tuple[float, float, float]:
    """Loss decrease of Adam's first step on a LoRA module at this unit (docs/design.md §3).

    With B = 0 at init only B moves; Adam's first step is ΔB = −lr·sign(∂L/∂B) with
    ∂L/∂B = s·∇W Aᵀ, so ΔW = s·ΔB·A. First-order decrease: lr·s·‖∇W Aᵀ‖₁. Quadratic term:
    ½·curvature·tr(ΔW Σ ΔWᵀ) = ½·curvature·(lr·s)²·tr(S (A Σ Aᵀ) Sᵀ) with S = sign(∇W Aᵀ).
    ``a_sigma_a[i]`` is A Σ Aᵀ for draw i. Returns (rate, linear, quadratic), means over draws.
    """
    lin, quad = [], []
    g = np.asarray(grad)
    step = lr * scale
    for a, asa in zip(a_draws, a_sigma_a, strict=True):
        gb = g @ np.asarray(a, dtype=g.dtype).T  # (d_out, r)
        s = np.sign(gb).astype(np.float64)
        lin.append(step * float(np.abs(gb).sum(dtype=np.float64)))
        # step·step, not step**2: a float power past the float range raises, a product becomes infinity,
        # which the card's finiteness check then names.
        quad.append(0.5 * curvature * step * step * float(np.einsum("ij,jk,ik->", s, asa, s)))
    linear = float(np.mean(lin))
    quadratic = float(np.mean(quad))
    return linear - quadratic, linear, quadratic


def set_gain(gains: np.ndarray, coupling: np.ndarray, ridge: float = 1e-6) -> float:
    """gain(S) = g_Sᵀ K_SS⁻¹ g_S with K = diag(g)^½ C diag(g)^½ (docs/design.md §4).

    Equivalent to √g_Sᵀ C_SS⁻¹ √g_S; reduces to Σ g when C = I, and redundant units add less.
    Negative predicted gains count as zero. A small ridge keeps a near-singular C finite.

    The result is clipped to [max g, Σ g]: with nearly collinear effects and unequal gains the
    quadratic model credits the tiny-curvature difference direction with a huge gain, which a short
    optimizer run does not realise; coupling is only allowed to make a set worth less than its sum.
    """
    g = np.clip(np.asarray(gains, dtype=np.float64), 0.0, None)
    if g.size == 0:
        return 0.0
    c = np.asarray(coupling, dtype=np.float64)
    c = 0.5 * (c + c.T) + ridge * np.eye(c.shape[0])
    r = np.sqrt(g)
    raw = float(r @ np.linalg.solve(c, r))
    return float(min(max(raw, g.max()), g.sum()))


def coupling_matrix(effects: np.ndarray) -> np.ndarray:
    """Cosine matrix C_uv = ⟨e_u, e_v⟩ / (‖e_u‖‖e_v‖) of output-space effects (rows)."""
    e = np.asarray(effects, dtype=np.float64)
    # each row over its largest entry first: a cosine does not change, and the norms neither underflow
    # nor overflow at extreme scales (effects of 1e-170 would read as orthogonal)
    peak = np.abs(e).max(axis=1, initial=0.0)
    e = e / np.where(peak > 0, peak, 1.0)[:, None]
    norms = np.linalg.norm(e, axis=1)
    norms[norms == 0] = 1.0
    e = e / norms[:, None]
    c = e @ e.T
    np.fill_diagonal(c, 1.0)
    return np.clip(c, -1.0, 1.0)


def redundancy(coupling: np.ndarray) -> float:
    """ρ(S) = ‖C_SS − I‖₂."""
    c = np.asarray(coupling, dtype=np.float64)
    if c.shape[0] == 0:
        return 0.0
    return float(np.linalg.norm(c - np.eye(c.shape[0]), 2))


def spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Spearman rank correlation with average ranks for ties; None where it is undefined (fewer than two
    values, or either sequence constant: its ranks have no spread to correlate)."""
    from scipy.stats import spearmanr

    if len(a) != len(b):
        raise ValueError("spearman: sequences differ in length")
    if len(a) < 2 or _constant(a) or _constant(b):
        return None
    rho = float(spearmanr(a, b).statistic)
    return rho if math.isfinite(rho) else None


def _constant(values: Sequence[float]) -> bool:
    first = values[0]
    return all(v == first for v in values)
