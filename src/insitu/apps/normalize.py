"""Consortium z-scoring for ``insitu simulate --normalize federated``: a DP release of every site.

Each site clips its training records to the task's public bounds, releases its noised
(n, Σu, Σu²) (:mod:`insitu.privacy.moments`) with randomness derived from its own secret, and
charges the release to its privacy ledger first (round 0 of the job: preprocessing).  The
coordinator combines the releases into one mean and standard deviation, and every site scales
its records with them.  Nothing else about the records leaves a site.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Mapping

import numpy as np
import torch

from insitu.data.dataset import FederatedData, SiteData
from insitu.privacy import AccountantKind
from insitu.privacy.moments import FeatureBounds, MomentsRelease, combine_moments, moments_noise, moments_sensitivity, release_moments

#: the ledger round of preprocessing releases (training rounds count from 1)
PREPROCESSING_ROUND = 0


@dataclass(frozen=True)
class Normalization:
    """What the consortium z-scoring released and cost: published in the run's summary."""

    epsilon: float
    delta: float
    noise_multiplier: float
    sensitivity: float
    mean: np.ndarray
    sd: np.ndarray
    releases: Mapping[str, MomentsRelease]

    def to_summary(self) -> dict[str, Any]:
        return {"kind": "federated", "epsilon_per_site": self.epsilon, "delta": self.delta,
                "noise_multiplier": self.noise_multiplier, "sensitivity": self.sensitivity,
                "noise_std": self.noise_multiplier * self.sensitivity,
                "mean": self.mean.tolist(), "sd": self.sd.tolist(),
                "released_counts": {k: r.count for k, r in self.releases.items()}}


def release_site_moments(site: SiteData, bounds: FeatureBounds, noise_multiplier: float, secret: bytes,
                         ledger: Any, job: str) -> MomentsRelease:
    """One site's release: charged to its ledger first (refused, releasing nothing, past budget)."""
    from insitu.builder import derive_seed

    ledger.charge(site.name, job, PREPROCESSING_ROUND, (MomentsRelease.event(noise_multiplier),))
    rng = np.random.default_rng(derive_seed(secret, "normalization-moments"))
    return release_moments(site.X_train.numpy(), bounds, noise_multiplier, rng)


def federated_normalization(data: FederatedData, bounds: FeatureBounds, *, epsilon: float, delta: float,
                            accountant: AccountantKind, secrets: Mapping[str, bytes], ledger: Any,
                            job: str) -> tuple[FederatedData, Normalization]:
    """``data`` (raw features) scaled with consortium moments built from the sites' DP releases."""
    z = moments_noise(epsilon, delta, accountant)
    releases = {s.name: release_site_moments(s, bounds, z, secrets[s.name], ledger, job) for s in data.sites}
    mu, sd = combine_moments(list(releases.values()), bounds)
    m, d = torch.tensor(mu, dtype=torch.float32), torch.tensor(sd, dtype=torch.float32)

    def scale(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else (x - m) / d

    sites = tuple(replace(s, X_train=scale(s.X_train), X_test=scale(s.X_test), X_val=scale(s.X_val)) for s in data.sites)
    info = {**data.info, "normalize": "federated"}
    norm = Normalization(epsilon, delta, z, moments_sensitivity(bounds.dim), mu, sd, releases)
    return replace(data, sites=sites, info=info), norm


__all__ = ["Normalization", "PREPROCESSING_ROUND", "federated_normalization", "release_site_moments"]
