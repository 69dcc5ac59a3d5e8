"""Noise mechanisms: Gaussian (for model updates) and Laplace (pure ε for bounded statistics).

Each mechanism is a frozen record of its parameters that can describe itself as a
:class:`PrivacyEvent`, so what is added and what is accounted come from one object.

Randomness: by default each mechanism draws from a NumPy ``Generator`` seeded from the
operating system (``secrets``); a fixed seed is for tests and reproducible simulations only.
Known limit: floating-point Gaussian/Laplace sampling is not the discrete mechanism of
Canonne et al. 2020; its low-order bits can leak (Mironov 2012).  Updates are further
rounded by compression/encoding, which blunts but does not formally close this.
"""
from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import numpy as np

from insitu.errors import ConfigError
from insitu.privacy.accounting import Mechanism, PrivacyEvent


def secure_rng(seed: int | None = None) -> np.random.Generator:
    """A generator seeded from the OS unless a seed is given (tests, reproducible simulations)."""
    return np.random.default_rng(secrets.randbits(128) if seed is None else seed)


@dataclass(frozen=True)
class GaussianMechanism:
    """Adds N(0, (z·Δ₂)²) to each coordinate of a release of L2 sensitivity Δ₂."""

    sensitivity: float
    noise_multiplier: float

    def __post_init__(self) -> None:
        if not (self.sensitivity > 0 and math.isfinite(self.sensitivity)):
            raise ConfigError(f"sensitivity must be a positive number, got {self.sensitivity!r}")
        if not (self.noise_multiplier > 0 and math.isfinite(self.noise_multiplier)):
            raise ConfigError(f"noise multiplier must be a positive number, got {self.noise_multiplier!r}")

    @property
    def std(self) -> float:
        return self.noise_multiplier * self.sensitivity

    def event(self, *, sampling_rate: float = 1.0, steps: int = 1) -> PrivacyEvent:
        return PrivacyEvent(Mechanism.GAUSSIAN, self.noise_multiplier, sampling_rate, steps)

    def add(self, value: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        value = np.asarray(value, dtype=np.float64)
        return value + rng.normal(0.0, self.std, size=value.shape)


@dataclass(frozen=True)
class LaplaceMechanism:
    """Adds Laplace(0, Δ₁/ε) noise: a pure ε-DP release of a statistic of L1 sensitivity Δ₁.

    For counts (a site's cohort sizes, label counts), Δ₁ = 1 under add/remove-one-record
    when every record falls in exactly one cell.
    """

    sensitivity: float
    epsilon: float

    def __post_init__(self) -> None:
        if not (self.sensitivity > 0 and math.isfinite(self.sensitivity)):
            raise ConfigError(f"sensitivity must be a positive number, got {self.sensitivity!r}")
        if not (self.epsilon > 0 and math.isfinite(self.epsilon)):
            raise ConfigError(f"ε must be a positive number, got {self.epsilon!r}")

    @property
    def scale(self) -> float:
        return self.sensitivity / self.epsilon

    def event(self) -> PrivacyEvent:
        return PrivacyEvent(Mechanism.LAPLACE, 1.0 / self.epsilon)

    def add(self, value: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        value = np.asarray(value, dtype=np.float64)
        return value + rng.laplace(0.0, self.scale, size=value.shape)


def release_counts(counts: np.ndarray, epsilon: float, rng: np.random.Generator | None = None) -> np.ndarray:
    """Cohort counts (one record per cell) released with pure ε-DP: Laplace noise, then
    rounding and clamping at 0 (post-processing, free of privacy cost)."""
    mech = LaplaceMechanism(1.0, epsilon)
    noisy = mech.add(np.asarray(counts, dtype=np.float64), rng or secure_rng())
    return np.maximum(np.rint(noisy), 0).astype(np.int64)


__all__ = ["GaussianMechanism", "LaplaceMechanism", "release_counts", "secure_rng"]
