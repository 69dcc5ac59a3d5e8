"""Known answers: our ε is dp-accounting's ε for the same events; calibration is tight."""
from __future__ import annotations

import math

import pytest
from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

from insitu.errors import ConfigError
from insitu.privacy import Accountant, AccountantKind, Mechanism, PrivacyEvent, calibrate_noise, epsilon_of
from insitu.privacy.accounting import PLD_DISCRETIZATION

CASES = [(1.1, 0.01, 1000, 1e-5), (0.8, 0.1, 50, 1e-6), (4.0, 1.0, 30, 1e-5)]


@pytest.mark.parametrize("sigma,q,steps,delta", CASES)
def test_epsilon_equals_dp_accounting_pld(sigma, q, steps, delta):
    ref = pld_privacy_accountant.PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)
    base = dp_event.GaussianDpEvent(sigma)
    ref.compose(dp_event.PoissonSampledDpEvent(q, base) if q < 1 else base, steps)
    ours = epsilon_of([PrivacyEvent(Mechanism.GAUSSIAN, sigma, q, steps)], delta)
    assert ours == pytest.approx(ref.get_epsilon(delta), rel=1e-9)


@pytest.mark.parametrize("sigma,q,steps,delta", CASES)
def test_epsilon_equals_dp_accounting_rdp(sigma, q, steps, delta):
    ref = rdp_privacy_accountant.RdpAccountant()
    base = dp_event.GaussianDpEvent(sigma)
    ref.compose(dp_event.PoissonSampledDpEvent(q, base) if q < 1 else base, steps)
    ours = epsilon_of([PrivacyEvent(Mechanism.GAUSSIAN, sigma, q, steps)] , delta, AccountantKind.RDP)
    assert ours == pytest.approx(ref.get_epsilon(delta), rel=1e-9)


def test_pld_is_tighter_than_rdp():
    ev = [PrivacyEvent(Mechanism.GAUSSIAN, 1.0, 0.05, 100)] * 5
    assert epsilon_of(ev, 1e-5) < epsilon_of(ev, 1e-5, AccountantKind.RDP)


def test_decaying_schedule_is_composed_round_by_round():
    """σ decays over rounds: grouping identical events gives the same ε as composing each round
    in order with the library, and the result lies strictly between the two constant schedules."""
    sigmas = [3.0, 2.5, 2.5, 2.0, 1.5, 1.5]
    rounds = [PrivacyEvent(Mechanism.GAUSSIAN, s, 0.1, 4) for s in sigmas]
    ref = pld_privacy_accountant.PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)
    for r in rounds:
        ref.compose(r.to_dp_event())
    ours = epsilon_of(rounds, 1e-5)
    assert ours == pytest.approx(ref.get_epsilon(1e-5), rel=1e-6)
    lo = epsilon_of([PrivacyEvent(Mechanism.GAUSSIAN, 3.0, 0.1, 4)] * 6, 1e-5)
    hi = epsilon_of([PrivacyEvent(Mechanism.GAUSSIAN, 1.5, 0.1, 4)] * 6, 1e-5)
    assert lo < ours < hi


def test_accountant_dry_run_does_not_spend():
    acc = Accountant(1e-5)
    ev = (PrivacyEvent(Mechanism.GAUSSIAN, 2.0),)
    would = acc.dry_run(ev)
    assert len(acc) == 0 and acc.get_epsilon() == 0.0
    assert acc.step(ev) == pytest.approx(would)
    assert len(acc) == 1 and acc.get_epsilon() == pytest.approx(would)
    assert acc.dry_run(ev) > would


def test_laplace_is_pure_epsilon():
    eps0 = 0.5
    eps = epsilon_of([PrivacyEvent(Mechanism.LAPLACE, 1 / eps0)], 1e-6)
    assert 0.8 * eps0 < eps <= eps0 + PLD_DISCRETIZATION  # PLD rounds up by at most one bucket


@pytest.mark.parametrize("kw", [dict(noise_multiplier=0.0), dict(noise_multiplier=float("nan")), dict(sampling_rate=0.0), dict(steps=0)])
def test_event_refuses_meaningless_parameters(kw):
    args = dict(mechanism=Mechanism.GAUSSIAN, noise_multiplier=1.0) | kw
    with pytest.raises(ConfigError):
        PrivacyEvent(**args)


def test_event_roundtrip():
    e = PrivacyEvent(Mechanism.GAUSSIAN, 1.3, 0.2, 7)
    assert PrivacyEvent.from_dict(e.to_dict()) == e


@pytest.mark.parametrize("target,q,steps,rounds", [(1.0, 0.16, 5, 4), (3.0, 1.0, 1, 20)])
def test_calibration_is_tight(target, q, steps, rounds):
    z = calibrate_noise(target, 1e-5, rounds=rounds, sampling_rate=q, steps_per_round=steps)
    eps = epsilon_of([PrivacyEvent(Mechanism.GAUSSIAN, z, q, steps)] * rounds, 1e-5)
    assert eps <= target
    less = epsilon_of([PrivacyEvent(Mechanism.GAUSSIAN, z * 0.98, q, steps)] * rounds, 1e-5)
    assert less > target  # 2 % less noise would overspend: the calibration is not wasteful


def test_calibration_with_extra_events_counts_them():
    extra = (PrivacyEvent(Mechanism.GAUSSIAN, 20.0),)
    z0 = calibrate_noise(2.0, 1e-5, rounds=5)
    z1 = calibrate_noise(2.0, 1e-5, rounds=5, extra_per_round=extra)
    assert z1 > z0
    assert epsilon_of([PrivacyEvent(Mechanism.GAUSSIAN, z1), *extra] * 5, 1e-5) <= 2.0


def test_calibration_refuses_bad_targets():
    with pytest.raises(ConfigError):
        calibrate_noise(0.0, 1e-5, rounds=3)
    with pytest.raises(ConfigError):
        calibrate_noise(1.0, 1.5, rounds=3)
    assert math.isfinite(calibrate_noise(1000.0, 1e-5, rounds=1))
