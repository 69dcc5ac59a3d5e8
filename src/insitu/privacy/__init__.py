"""Differential privacy: events and accountants, mechanisms, clipping, per-site budget ledger.

    from insitu.privacy import Accountant, PrivacyEvent, calibrate_noise, PrivacyLedger, Budget

    z = calibrate_noise(1.0, 1e-5, rounds=30, sampling_rate=0.08, steps_per_round=20)
    ledger = PrivacyLedger("privacy.sqlite")
    ledger.set_budget("hospital-a", Budget(epsilon=3.0, delta=1e-5))
    ledger.charge("hospital-a", "job-1", 1, gaussian_round(z, sampling_rate=0.08, steps=20))

A leaf package: it imports nothing from federation or learn.  The federation glue (site
guard, clip/noise stages, central-noise protocol wrapper) is in ``insitu.federation.dp``;
DP-SGD is in ``insitu.learn.dpsgd``.
"""
from insitu.privacy.accounting import (
    Accountant,
    AccountantKind,
    Mechanism,
    PrivacyEvent,
    calibrate_noise,
    epsilon_of,
    gaussian_round,
)
from insitu.privacy.budget import Budget, LedgerRecord, PrivacyLedger, Quote
from insitu.privacy.clipping import AdaptiveClip, clip_by_norm, split_noise
from insitu.privacy.mechanisms import GaussianMechanism, LaplaceMechanism, release_counts, secure_rng

__all__ = [
    "Accountant",
    "AccountantKind",
    "AdaptiveClip",
    "Budget",
    "GaussianMechanism",
    "LaplaceMechanism",
    "LedgerRecord",
    "Mechanism",
    "PrivacyEvent",
    "PrivacyLedger",
    "Quote",
    "calibrate_noise",
    "clip_by_norm",
    "epsilon_of",
    "gaussian_round",
    "release_counts",
    "secure_rng",
    "split_noise",
]
