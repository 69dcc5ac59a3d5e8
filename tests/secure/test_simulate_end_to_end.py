"""``simulate --secure-aggregation`` / ``--homomorphic`` reach the accuracy of the plain run (same seed)."""
from __future__ import annotations

import pytest

from insitu.federation.simulation import simulate

OPTIONS = {"secagg": {"secure_aggregation": True}, "paillier": {"homomorphic": "paillier"}, "ckks": {"homomorphic": "ckks"}}


@pytest.fixture(scope="module")
def plain():
    return simulate(dataset="heart", rounds=3, local_steps=10, baselines=False, write=False, seed=1)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_protected_run_matches_plain_run(plain, name):
    run = simulate(dataset="heart", rounds=3, local_steps=10, baselines=False, write=False, seed=1, **OPTIONS[name])
    assert run["final"]["rounds_completed"] == 3
    assert run["final"]["site_accuracy"] == plain["final"]["site_accuracy"]
    assert run["final"]["bytes_up_per_round"] > plain["final"]["bytes_up_per_round"]  # masks/ciphertexts are bigger
