"""``simulate --secure-aggregation`` / ``--homomorphic`` reach the accuracy of the plain run (same seed)."""
from __future__ import annotations

import pytest

from insitu.apps.simulate import simulate

#: the sites' secrets, handed to both runs so that sampling is the same and accuracies can be compared exactly
SECRETS = {s: bytes([i + 1]) * 32 for i, s in enumerate(("cleveland", "hungary", "switzerland", "va-long-beach"))}
OPTIONS = {"secagg": {"secure_aggregation": True}, "paillier": {"homomorphic": "paillier"}, "ckks": {"homomorphic": "ckks"}}


@pytest.fixture(scope="module")
def plain():
    return simulate(dataset="heart", rounds=3, local_steps=10, baselines=False, write=False, seed=1, site_secrets=SECRETS)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_protected_run_matches_plain_run(plain, name):
    run = simulate(dataset="heart", rounds=3, local_steps=10, baselines=False, write=False, seed=1, site_secrets=SECRETS, **OPTIONS[name])
    assert run["final"]["rounds_completed"] == 3
    assert run["final"]["site_accuracy"] == plain["final"]["site_accuracy"]
    assert run["final"]["bytes_up_per_round"] > plain["final"]["bytes_up_per_round"]  # masks/ciphertexts are bigger
