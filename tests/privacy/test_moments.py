"""Federated z-scoring moments as a DP release, tested by attacking them as the coordinator would."""
from __future__ import annotations

import math

import numpy as np
import pytest

from insitu.data.heart import BOUNDS, FEATURES, load_heart
from insitu.errors import BudgetExceeded, ConfigError
from insitu.privacy import Budget, PrivacyLedger
from insitu.privacy.moments import FeatureBounds, combine_moments, moments_noise, moments_sensitivity, release_moments


def _exact(X: np.ndarray) -> np.ndarray:
    """What a site sent before: exact count, Σx and Σx²."""
    return np.concatenate([[len(X)], X.sum(0), (X * X).sum(0)])


def _site_train(name: str = "switzerland") -> np.ndarray:
    raw = load_heart(normalize="raw")
    return next(s for s in raw.sites if s.name == name).X_train.numpy().astype(np.float64)


def test_sensitivity_bound_holds_at_the_corners():
    b = FeatureBounds(("a", "b", "c"), (0.0, -1.0, 10.0), (1.0, 1.0, 20.0))
    rng = np.random.default_rng(1)
    corners = np.array([[x, y, z] for x in (0, 1, 0.5, 7) for y in (-1, 1, 0, -9) for z in (10, 20, 15, 99)], dtype=float)
    base = rng.uniform([0, -1, 10], [1, 1, 20], size=(5, 3))
    f = lambda X: np.concatenate([[len(X)], b.scale(X).sum(0), (b.scale(X) ** 2).sum(0)])  # noqa: E731
    worst = 0.0
    for r in corners:
        worst = max(worst, np.linalg.norm(f(np.vstack([base, r])) - f(base)))  # add one record
        for r2 in corners:
            worst = max(worst, np.linalg.norm(f(np.vstack([base, r])) - f(np.vstack([base, r2]))))  # replace it
    assert worst <= moments_sensitivity(3) + 1e-12
    assert worst >= moments_sensitivity(3) - 1e-9  # the bound is attained: it is tight, not loose


def test_exact_moments_reveal_a_sum_and_a_one_record_difference():
    """The attack that succeeds without the defence: exact sums give a site's Σx to the last digit
    and the difference of two neighbouring releases is the record itself."""
    X = _site_train()
    with_record, without = _exact(X), _exact(X[1:])
    np.testing.assert_array_equal(with_record[1:1 + len(FEATURES)], X.sum(0))
    np.testing.assert_allclose(with_record[1:1 + len(FEATURES)] - without[1:1 + len(FEATURES)], X[0], atol=1e-9)


def test_dp_release_hides_the_sum_and_the_one_record_difference():
    """The same attack on the DP release: the sum is off by the noise, and the best test between
    'record present' and 'absent' (projection on the record's own effect, the likelihood-ratio
    test of a Gaussian) does no better than (ε, δ)-DP allows."""
    X = _site_train()
    eps, delta = 0.1, 1e-5
    z = moments_noise(eps, delta)
    d = len(FEATURES)
    rng = np.random.default_rng(7)
    one = release_moments(X, BOUNDS, z, rng)
    exact_u = BOUNDS.scale(X).sum(0)
    assert np.max(np.abs(one.sum - exact_u)) > 1.0  # no longer exact: wrong by tens of records
    assert one.noise_std == pytest.approx(z * moments_sensitivity(d))
    trials = 3000
    f_in = np.concatenate([[len(X)], BOUNDS.scale(X).sum(0), (BOUNDS.scale(X) ** 2).sum(0)])
    f_out = np.concatenate([[len(X) - 1], BOUNDS.scale(X[1:]).sum(0), (BOUNDS.scale(X[1:]) ** 2).sum(0)])
    direction = (f_in - f_out) / np.linalg.norm(f_in - f_out)
    stat = lambda r: np.concatenate([[r.count], r.sum, r.sum_sq]) @ direction  # noqa: E731
    s_in = np.array([stat(release_moments(X, BOUNDS, z, rng)) for _ in range(trials)])
    s_out = np.array([stat(release_moments(X[1:], BOUNDS, z, rng)) for _ in range(trials)])
    threshold = (f_in + f_out) @ direction / 2
    tpr, fpr = float(np.mean(s_in > threshold)), float(np.mean(s_out > threshold))
    slack = 3 * math.sqrt(0.25 / trials) * 2  # sampling error of two proportions
    assert tpr <= math.exp(eps) * fpr + delta + slack
    assert abs((tpr + 1 - fpr) / 2 - 0.5) < 0.05  # the attacker guesses at chance


def test_ledger_is_charged_before_release_and_refuses_past_budget():
    from insitu.apps.normalize import PREPROCESSING_ROUND, federated_normalization
    from insitu.privacy import AccountantKind

    raw = load_heart(normalize="raw")
    secrets = {s.name: bytes([i + 1]) * 32 for i, s in enumerate(raw.sites)}
    with PrivacyLedger(":memory:") as ledger:
        for s in raw.sites:
            ledger.set_budget(s.name, Budget(0.05 if s.name == "hungary" else 1.0, 1e-5))
        with pytest.raises(BudgetExceeded, match="hungary"):
            federated_normalization(raw, BOUNDS, epsilon=0.1, delta=1e-5, accountant=AccountantKind.PLD,
                                    secrets=secrets, ledger=ledger, job="j")
        assert ledger.records("hungary") == []
        ledger.set_budget("hungary", Budget(1.0, 1e-5))
        data, norm = federated_normalization(raw, BOUNDS, epsilon=0.1, delta=1e-5, accountant=AccountantKind.PLD,
                                             secrets=secrets, ledger=ledger, job="j2")
        for s in raw.sites:
            recs = ledger.records(s.name, job="j2")
            assert [r.round for r in recs] == [PREPROCESSING_ROUND]
        # a site that released in the refused attempt (sites before hungary) stays charged for it
        assert [r.job for r in ledger.records("cleveland")] == ["j", "j2"]
        assert ledger.records("hungary", job="j2")[0].epsilon_round == pytest.approx(0.1, rel=0.01)
        assert ledger.spent("hungary") == pytest.approx(0.1, rel=0.01)
    # one shared affine transform for every site, test splits included
    for before, after in zip(raw.sites, data.sites):
        np.testing.assert_allclose(after.X_test.numpy(), (before.X_test.numpy() - norm.mean) / norm.sd, rtol=1e-4, atol=1e-4)


def test_combined_moments_tend_to_exact_with_a_large_epsilon_and_to_public_constants_with_a_tiny_one():
    raw = load_heart(normalize="raw")
    parts = [s.X_train.numpy().astype(np.float64) for s in raw.sites]
    pooled = np.clip(np.concatenate(parts), BOUNDS.lower, BOUNDS.upper)
    rng = np.random.default_rng(3)
    mu, sd = combine_moments([release_moments(X, BOUNDS, 0.01, rng) for X in parts], BOUNDS)
    width = np.array(BOUNDS.upper) - BOUNDS.lower
    assert np.all(np.abs(mu - pooled.mean(0)) <= 0.02 * width)
    assert np.all(np.abs(sd - pooled.std(0)) <= 0.05 * width)
    mu, sd = combine_moments([release_moments(X, BOUNDS, 1e6, rng) for X in parts], BOUNDS)
    mid = (np.array(BOUNDS.upper) + BOUNDS.lower) / 2
    assert np.all(np.abs(mu - mid) <= 1e-3 * width)
    np.testing.assert_allclose(sd, 0.25 * width, rtol=1e-3)
    with pytest.raises(ConfigError, match="ε of the normalisation moments"):
        moments_noise(0.0, 1e-5)
