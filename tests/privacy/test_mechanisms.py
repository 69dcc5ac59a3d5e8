"""The noise actually added has the std the accountant was told (statistical tests), and the
clip bounds every per-site norm."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from insitu.errors import ConfigError
from insitu.federation.dp import CentralDPProtocol, ClipStage, DistributedDPProtocol, NoiseShareStage
from insitu.federation.messages import Message, MessageKind
from insitu.federation.instructions import RoundInstructions
from insitu.federation.pipeline import RoundContext
from insitu.federation.protocol import AggregateResult, RoundPlan
from insitu.privacy.accounting import PLD_DISCRETIZATION
from insitu.privacy import (
    AdaptiveClip, GaussianMechanism, LaplaceMechanism, Mechanism, PrivacyEvent, calibrate_noise, clip_by_norm,
    epsilon_of, release_counts, secure_rng, split_noise,
)

N = 200_000


def _std_ok(sample: np.ndarray, std: float) -> None:
    # the sample std of N normals has relative sd 1/sqrt(2N) ≈ 0.16 %; allow 5 of them
    assert abs(sample.std() / std - 1) < 5 / math.sqrt(2 * sample.size)
    assert abs(sample.mean()) < 5 * std / math.sqrt(sample.size)


def test_gaussian_noise_std_matches_calibration():
    z = calibrate_noise(2.0, 1e-5, rounds=5)
    mech = GaussianMechanism(sensitivity=0.7, noise_multiplier=z)
    noise = mech.add(np.zeros(N), secure_rng(1))
    _std_ok(noise, 0.7 * z)
    assert mech.event() == PrivacyEvent(Mechanism.GAUSSIAN, z)


def test_laplace_scale_and_pure_epsilon():
    mech = LaplaceMechanism(sensitivity=1.0, epsilon=0.5)
    noise = mech.add(np.zeros(N), secure_rng(2))
    assert abs(np.abs(noise).mean() / 2.0 - 1) < 0.02  # E|L(0,b)| = b = 2
    assert epsilon_of([mech.event()], 1e-6) <= 0.5 + PLD_DISCRETIZATION


def test_release_counts_are_non_negative_integers():
    out = release_counts(np.array([0, 3, 120]), 1.0, secure_rng(3))
    assert out.dtype == np.int64 and (out >= 0).all()


class _Zeros:
    """An inner protocol whose sites all sent zero updates (weight 1 each)."""

    name = "zeros"

    def __init__(self, sites: int, size: int):
        self.sites, self.size = sites, size

    def collect(self, plan, transport):
        self.plan = plan
        parts = tuple(f"s{i}" for i in range(self.sites))
        metrics = {p: {"dp_clip_bit": 0.5} for p in parts}
        return AggregateResult(np.zeros(self.size), float(self.sites), parts, {}, metrics)

    def site_protection(self, site_id):
        return None


def _plan(size: int) -> RoundPlan:
    return RoundPlan("job", 1, ("s0",), size, 10.0, 1, {}, RoundInstructions(), {})


def test_central_noise_std_is_z_times_clip():
    proto = CentralDPProtocol(_Zeros(4, N), noise_multiplier=1.7, clip=0.3, rng=secure_rng(4))
    res = proto.collect(_plan(N), None)
    _std_ok(res.total, 1.7 * 0.3)
    assert res.weight == 4.0


def test_distributed_shares_sum_to_the_accounted_noise_even_at_the_minimum():
    z, c, m = 2.0, 0.5, 3
    req = RoundContext("job", 1, RoundInstructions())
    total = np.zeros(N)
    for i in range(m):  # exactly the minimum number of sites finish
        info = {"dp_clip": c}
        total += NoiseShareStage(z, m, secure_rng(10 + i)).apply(np.zeros(N), req, info)
    _std_ok(total, z * c)


def test_distributed_round_with_too_few_shares_is_not_released():
    from insitu.errors import RoundAborted

    with pytest.raises(RoundAborted, match="noise shares"):
        DistributedDPProtocol(_Zeros(2, 10), shares=3).collect(_plan(10), None)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=50), st.floats(1e-3, 10))
def test_clip_bounds_every_site_norm(values, c):
    out, norm = clip_by_norm(np.array(values), c)
    assert np.linalg.norm(out) <= c * (1 + 1e-9)
    if norm <= c:
        assert np.array_equal(out, np.array(values))


def test_clip_stage_bounds_norm_and_reports_indicator():
    req = RoundContext("job", 1, RoundInstructions(dp_clip=0.25))
    info: dict = {}
    out = ClipStage(1.0, adaptive=True).apply(np.full(100, 1.0), req, info)
    assert np.linalg.norm(out) <= 0.25 + 1e-12 and info["dp_clip_bit"] == -0.5 and info["dp_update_norm"] == pytest.approx(10.0)


def test_adaptive_clip_tracks_the_median_norm():
    rng = secure_rng(5)
    norms = rng.uniform(0.0, 2.0, size=(400, 50))  # median of each round ≈ 1.0
    ac = AdaptiveClip(clip=0.05, target_quantile=0.5, learning_rate=0.2, count_stddev=0.5)
    for row in norms:
        ac.update([0.5 if n <= ac.clip else -0.5 for n in row], rng)
    assert 0.8 < ac.clip < 1.2


def test_adaptive_clip_noise_split_composes_to_the_total():
    z, sb = 2.0, 3.0
    zd = split_noise(z, sb)
    both = epsilon_of([PrivacyEvent(Mechanism.GAUSSIAN, zd), PrivacyEvent(Mechanism.GAUSSIAN, 2 * sb)] * 10, 1e-5)
    one = epsilon_of([PrivacyEvent(Mechanism.GAUSSIAN, z)] * 10, 1e-5)
    assert both == pytest.approx(one, rel=0.02)
    with pytest.raises(ConfigError):
        split_noise(2.0, 0.5)  # the count would need all the noise budget
