"""Consortium feature moments as a differentially private release of each site.

Federated z-scoring needs one mean and standard deviation per feature for the whole
consortium.  Exact per-site (n, Σx, Σx²) would let the coordinator read a site's sums to the
last digit and tell whether one patient is in them.  Here each site instead releases

    (n, Σu, Σu²) + N(0, (z·Δ)²) per coordinate,   u = (clip(x, lo, hi) − mid) / (hi − lo)

where ``lo``/``hi`` are **public** per-feature bounds (constants of the task, not of the data),
so every u lies in [−½, ½] and one record moves the released vector by at most

    Δ = max( √(1 + d·(¼ + 1/16)) ,  √d )
          add/remove one record      replace one record: per feature (u−u')² + (u²−u'²)² ≤ 1

(for ``d`` features; the larger of the two, so the release holds under either adjacency).
The noise multiplier z is calibrated with the project's accountant for the plan's ε at δ, and
the release is one :class:`PrivacyEvent` the site charges to its ledger before releasing.
Combining the releases and turning them into a mean and standard deviation is post-processing
(free): see :func:`combine_moments`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from insitu.errors import ConfigError, DataError
from insitu.privacy.accounting import AccountantKind, Mechanism, PrivacyEvent, calibrate_noise

#: the smallest standard deviation the combined moments may report, as a fraction of the range
MIN_SD_FRACTION = 0.02
#: the public prior of a feature's spread, as a fraction of its range (estimates are shrunk towards it)
PRIOR_SD = 0.25


@dataclass(frozen=True)
class FeatureBounds:
    """Public clipping range of each feature: constants of the task, never computed from records."""

    names: tuple[str, ...]
    lower: tuple[float, ...]
    upper: tuple[float, ...]

    def __post_init__(self) -> None:
        if not (len(self.names) == len(self.lower) == len(self.upper)) or not self.names:
            raise ConfigError(f"feature bounds need one (lower, upper) per feature; got {len(self.names)} names, "
                              f"{len(self.lower)} lower, {len(self.upper)} upper")
        for n, lo, hi in zip(self.names, self.lower, self.upper):
            if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
                raise ConfigError(f"feature {n!r}: bounds must be finite with lower < upper, got [{lo}, {hi}]")

    @property
    def dim(self) -> int:
        return len(self.names)

    def scale(self, X: np.ndarray) -> np.ndarray:
        """Records clipped to the bounds and mapped to [−½, ½]."""
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or X.shape[1] != self.dim:
            raise DataError(f"expected records with {self.dim} features {list(self.names)}, got shape {X.shape}")
        lo, hi = np.asarray(self.lower), np.asarray(self.upper)
        return (np.clip(X, lo, hi) - (lo + hi) / 2) / (hi - lo)


def moments_sensitivity(dim: int) -> float:
    """L2 sensitivity of (n, Σu, Σu²) with u ∈ [−½, ½]^dim, under add/remove and replace-one-record."""
    add_remove = math.sqrt(1.0 + dim * (0.25 + 0.0625))
    replace = math.sqrt(dim)  # per feature (u−u')² + (u²−u'²)² = (u−u')²(1 + (u+u')²) ≤ 1 when |u|,|u'| ≤ ½
    return max(add_remove, replace)


def moments_noise(epsilon: float, delta: float, kind: AccountantKind = AccountantKind.PLD) -> float:
    """Noise multiplier z of the single Gaussian release that spends ``epsilon`` at ``delta``."""
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not (math.isfinite(epsilon) and epsilon > 0):
        raise ConfigError(f"the ε of the normalisation moments must be a positive number, got {epsilon!r}")
    return calibrate_noise(float(epsilon), delta, rounds=1, kind=kind)


@dataclass(frozen=True)
class MomentsRelease:
    """What one site releases: noised count, Σu and Σu² of its clipped, scaled training records."""

    count: float
    sum: np.ndarray
    sum_sq: np.ndarray
    noise_std: float

    @staticmethod
    def event(noise_multiplier: float) -> PrivacyEvent:
        """The ledger event of one release (a single Gaussian mechanism in units of Δ)."""
        return PrivacyEvent(Mechanism.GAUSSIAN, noise_multiplier)


def release_moments(X: np.ndarray, bounds: FeatureBounds, noise_multiplier: float, rng: np.random.Generator) -> MomentsRelease:
    """The site's DP release of its moments.  ``rng`` must be the site's own secret randomness."""
    if not (noise_multiplier > 0 and math.isfinite(noise_multiplier)):
        raise ConfigError(f"noise multiplier must be a positive number, got {noise_multiplier!r}; zero noise is not private")
    U = bounds.scale(X)
    std = noise_multiplier * moments_sensitivity(bounds.dim)
    exact = np.concatenate([[float(len(U))], U.sum(0), (U * U).sum(0)])
    noisy = exact + rng.normal(0.0, std, size=exact.shape)
    d = bounds.dim
    return MomentsRelease(float(noisy[0]), noisy[1:1 + d], noisy[1 + d:], std)


def combine_moments(releases: list[MomentsRelease], bounds: FeatureBounds) -> tuple[np.ndarray, np.ndarray]:
    """Consortium mean and standard deviation, in the features' own units, from the sites' releases.

    Post-processing only (free of privacy cost).  The noise of the pooled estimates is public
    (each release states its std), so each estimate is shrunk towards the public prior of the
    bounds (mean of u 0, standard deviation of u ¼: the middle and a quarter of the range) in
    proportion to its noise: with a small ε or few records the result tends to the public
    constants (entirely so when the pooled count is within three noise stds of 0), with a large
    one to the exact moments.  The variance of u is kept in
    [MIN_SD_FRACTION², ¼]."""
    if not releases:
        raise DataError("no site released its moments")
    n = max(1.0, sum(r.count for r in releases))
    total_std = math.sqrt(sum(r.noise_std ** 2 for r in releases))
    noise = total_std / n  # std of Σ/n from the noise alone
    prior = PRIOR_SD ** 2
    # a count within 3 noise stds of 0 is no count at all: then only the public constants remain
    keep = prior / (prior + noise * noise) if n > 3 * total_std else 0.0
    m1 = keep * np.clip(sum(r.sum for r in releases) / n, -0.5, 0.5)
    m2 = sum(r.sum_sq for r in releases) / n
    var = prior + keep * (np.clip(m2 - m1 * m1, 0.0, 0.25) - prior)
    var = np.clip(var, MIN_SD_FRACTION ** 2, 0.25)
    lo, hi = np.asarray(bounds.lower), np.asarray(bounds.upper)
    width = hi - lo
    return (lo + hi) / 2 + m1 * width, np.sqrt(var) * width


__all__ = ["FeatureBounds", "MomentsRelease", "MIN_SD_FRACTION", "PRIOR_SD", "combine_moments", "moments_noise", "moments_sensitivity",
           "release_moments"]
