"""Clipping: fixed L2 clipping and adaptive (quantile) clipping of Andrew et al. 2021.

Adaptive clipping ("Differentially Private Learning with Adaptive Clipping", NeurIPS 2021)
tracks a target quantile γ of the sites' update norms instead of a hand-tuned C:

    each site reports bᵢ = 1[‖Δᵢ‖ ≤ C] − ½          (centred: sensitivity ½)
    b̄ = (Σ bᵢ + N(0, σ_b²)) / m + ½
    C ← C · exp(−η (b̄ − γ))                           (geometric update)

The count query is a release of its own, so it is accounted: a round with total noise
multiplier z spends a Gaussian of multiplier z_Δ on the update and one of 2σ_b on the
count, with 1/z² = 1/z_Δ² + 1/(2σ_b)².  Both events go into the ledger (exact
composition), which is the same ε as a single Gaussian of multiplier z.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from insitu.errors import ConfigError
from insitu.privacy.accounting import Mechanism, PrivacyEvent


def clip_by_norm(vec: np.ndarray, clip: float) -> tuple[np.ndarray, float]:
    """``vec`` scaled down to L2 norm ``clip`` if longer; returns (clipped, original norm)."""
    if not (clip > 0 and math.isfinite(clip)):
        raise ConfigError(f"clip norm must be a positive number, got {clip!r}")
    vec = np.asarray(vec, dtype=np.float64)
    norm = float(np.linalg.norm(vec))
    if not math.isfinite(norm):
        raise ConfigError("update holds NaN or infinite values; refusing to clip it")
    if norm > clip:
        vec = vec * (clip / norm)
    return vec, norm


def split_noise(noise_multiplier: float, count_stddev: float) -> float:
    """z_Δ such that updates with z_Δ plus the count with 2σ_b compose to z (Andrew et al. Thm 1)."""
    rest = noise_multiplier**-2 - (2.0 * count_stddev) ** -2
    if rest <= 0:
        raise ConfigError(
            f"adaptive clipping's count noise σ_b={count_stddev} takes the whole budget of noise multiplier "
            f"{noise_multiplier}; raise σ_b (Andrew et al. suggest expected sites / 20) or the noise"
        )
    return rest**-0.5


@dataclass
class AdaptiveClip:
    """Server-side state of quantile-tracking clipping; ``clip`` is the C sent to sites."""

    clip: float = 0.1
    target_quantile: float = 0.5
    learning_rate: float = 0.2
    count_stddev: float = 0.2  # σ_b; Andrew et al. recommend (expected sites)/20

    def __post_init__(self) -> None:
        if not (self.clip > 0):
            raise ConfigError(f"initial clip norm must be positive, got {self.clip}")
        if not (0 < self.target_quantile < 1):
            raise ConfigError(f"target quantile must be in (0, 1), got {self.target_quantile}")
        if not (self.learning_rate > 0):
            raise ConfigError(f"clip learning rate must be positive, got {self.learning_rate}")
        if not (self.count_stddev > 0):
            raise ConfigError(f"count noise σ_b must be positive, got {self.count_stddev}")

    def count_event(self) -> PrivacyEvent:
        return PrivacyEvent(Mechanism.GAUSSIAN, 2.0 * self.count_stddev)

    def update(self, centred_bits: list[float], rng: np.random.Generator) -> float:
        """Move C from the sites' centred indicators (each −½ or +½); returns the new C."""
        m = len(centred_bits)
        if m == 0:
            return self.clip
        for b in centred_bits:
            if b not in (-0.5, 0.5):
                raise ConfigError(f"clip indicator must be ±0.5, got {b!r}")
        noisy = (sum(centred_bits) + rng.normal(0.0, self.count_stddev)) / m + 0.5
        self.clip = float(self.clip * math.exp(-self.learning_rate * (noisy - self.target_quantile)))
        return self.clip


__all__ = ["clip_by_norm", "split_noise", "AdaptiveClip"]
