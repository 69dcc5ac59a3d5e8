"""How attack success is measured: ROC figures for membership, image similarity for reconstruction.

Membership inference is judged the way Carlini et al. (2022, "Membership Inference Attacks From
First Principles") ask: the area under the ROC curve says how well an attack ranks members above
non-members on average, but what matters for privacy is how many members it finds while almost
never accusing a non-member, i.e. the true-positive rate at a low false-positive rate.

Reconstruction of images is judged by PSNR and SSIM (Wang et al. 2004, Gaussian window σ = 1.5);
both are written here so that no image library is needed.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter
from sklearn.metrics import roc_auc_score, roc_curve

from insitu.errors import DataError


@dataclass(frozen=True)
class RocSummary:
    """AUC and TPR at the false-positive rates the privacy report shows."""

    auc: float
    tpr_at_0_1pct: float  # TPR at FPR ≤ 0.1 %
    tpr_at_1pct: float  # TPR at FPR ≤ 1 %
    n_members: int
    n_nonmembers: int

    @property
    def min_resolvable_fpr(self) -> float:
        """1 / non-members: below this FPR the figure only says whether the top score is a member."""
        return 1.0 / max(1, self.n_nonmembers)


def _check(scores: np.ndarray, is_member: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    m = np.asarray(is_member).astype(bool).reshape(-1)
    if s.shape != m.shape:
        raise DataError(f"{s.shape[0]} scores but {m.shape[0]} membership labels; give one score per record")
    if m.all() or (~m).all():
        raise DataError("membership labels hold only one class; an attack needs both members and non-members to be scored")
    if not np.all(np.isfinite(s)):
        raise DataError("attack scores hold NaN or infinite values")
    return s, m


def tpr_at_fpr(scores: np.ndarray, is_member: np.ndarray, fpr: float) -> float:
    """Highest TPR reachable by a threshold whose FPR does not exceed ``fpr`` (no interpolation)."""
    s, m = _check(scores, is_member)
    f, t, _ = roc_curve(m, s)
    ok = f <= fpr + 1e-12
    return float(t[ok].max()) if ok.any() else 0.0


def roc_summary(scores: np.ndarray, is_member: np.ndarray) -> RocSummary:
    """Higher score = "more likely a member"."""
    s, m = _check(scores, is_member)
    return RocSummary(
        auc=float(roc_auc_score(m, s)),
        tpr_at_0_1pct=tpr_at_fpr(s, m, 0.001),
        tpr_at_1pct=tpr_at_fpr(s, m, 0.01),
        n_members=int(m.sum()),
        n_nonmembers=int((~m).sum()),
    )


def auc_interval(scores: np.ndarray, is_member: np.ndarray, *, reps: int = 200, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Bootstrap interval of the AUC (members and non-members resampled separately).

    With a few hundred records an AUC of 0.55 can be chance: the interval says how far from
    0.5 a figure must be before it means something.
    """
    s, m = _check(scores, is_member)
    pos, neg = s[m], s[~m]
    rng = np.random.default_rng(seed)
    labels = np.r_[np.ones(pos.size, bool), np.zeros(neg.size, bool)]
    aucs = np.empty(reps)
    for i in range(reps):
        aucs[i] = roc_auc_score(labels, np.r_[rng.choice(pos, pos.size), rng.choice(neg, neg.size)])
    a = (1 - level) / 2
    return float(np.quantile(aucs, a)), float(np.quantile(aucs, 1 - a))


def psnr(reference: np.ndarray, estimate: np.ndarray, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB; ∞ for identical images."""
    a = np.asarray(reference, dtype=np.float64)
    b = np.asarray(estimate, dtype=np.float64)
    if a.shape != b.shape:
        raise DataError(f"images differ in shape: {a.shape} vs {b.shape}")
    mse = float(np.mean((a - b) ** 2))
    if mse == 0.0:
        return float("inf")
    return float(10.0 * np.log10(data_range**2 / mse))


def ssim(reference: np.ndarray, estimate: np.ndarray, data_range: float = 1.0, sigma: float = 1.5) -> float:
    """Structural similarity of two 2-D images (mean SSIM over a Gaussian-weighted window).

    Follows Wang et al. 2004: K1 = 0.01, K2 = 0.03, local statistics with a Gaussian window of
    σ = 1.5, sample covariance correction, mean over the whole image.  1.0 only for identical
    images; near 0 for unrelated ones.
    """
    a = np.asarray(reference, dtype=np.float64)
    b = np.asarray(estimate, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise DataError(f"SSIM needs two 2-D images of the same shape, got {a.shape} and {b.shape}")
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2

    def blur(x: np.ndarray) -> np.ndarray:
        return gaussian_filter(x, sigma=sigma, mode="reflect", truncate=3.5)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    den = (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    return float(np.mean(num / den))
