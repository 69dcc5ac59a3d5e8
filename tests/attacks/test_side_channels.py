"""The side-channel attacks succeed without their defence and fail with it, through the real engine."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from insitu.apps.simulate import SimulationConfig, load_federated
from insitu.attacks.probe import probe_plan
from insitu.attacks.side_channels import (
    evaluation_oracle,
    invert_logistic_loss,
    known_sampling_epsilon,
    loss_equation_attack,
    sampling_figures,
    score_pairs,
    solve_loss_equations,
)
from insitu.data.dataset import SiteData
from insitu.errors import ConfigError
from insitu.privacy import PrivacyEvent, epsilon_of
from insitu.privacy.accounting import Mechanism


@pytest.fixture(scope="module")
def heart_fed():
    return load_federated(SimulationConfig(dataset="heart").resolved())


def _plan(data, **opts):
    cfg = SimulationConfig(dataset="heart", rounds=2, **opts).resolved()
    return cfg.plan_for(data.input_shape, data.num_outputs, data.schema)


def _targets(data, k=4):
    Xm, ym = data.pooled_train()
    Xn, yn = data.pooled_test()
    idx = torch.tensor([3, 50, 200, 400][:k])
    return Xm[idx], ym[idx], Xn.mean(0).numpy(), int(yn.float().mean() > 0.5)


# -- the loss-equation attack ------------------------------------------------------------------
def test_invert_logistic_loss_is_the_inverse_of_softplus():
    for u in (-30.0, -3.0, -1e-3, 0.0, 0.7, 12.0):
        loss = float(torch.nn.functional.softplus(torch.tensor(u, dtype=torch.float64)))
        assert invert_logistic_loss(loss) == pytest.approx(u, abs=1e-9)
    assert math.isnan(invert_logistic_loss(0.0)) and math.isnan(invert_logistic_loss(float("inf")))


def test_loss_equations_give_the_record_and_label_with_one_more_round_than_features():
    rng = np.random.default_rng(1)
    d = 6
    x, label = rng.normal(size=d), 0
    W, b = rng.normal(size=(d + 1, d)), rng.normal(size=d + 1)
    losses = np.log1p(np.exp((2 * label - 1) * -(W @ x + b)))
    est, y, res = solve_loss_equations(W, b, losses)
    assert y == label and np.max(np.abs(est - x)) < 1e-9 and res < 1e-9
    # d equations fit either label exactly: the attack does not guess
    assert solve_loss_equations(W[:d], b[:d], losses[:d]) is None


def test_public_losses_give_every_single_record_exactly(heart_fed):
    plan = probe_plan(_plan(heart_fed))
    X, y, guess, gl = _targets(heart_fed)
    r = loss_equation_attack(plan, X, y, guess=guess, guess_label=gl)
    d = X.shape[1]
    assert r.rounds == d + 1 and r.losses_received == 4 * (d + 1)
    assert all(r.success) and all(r.label_correct)
    assert max(r.rms_error) < 1e-4 < min(r.guess_rms_error)


@pytest.mark.parametrize("opts", [
    {"secure_aggregation": True},
    {"dp": "record", "epsilon": 1.0},
    {"dp": "record", "epsilon": 1.0, "secure_aggregation": True},
    {"homomorphic": "paillier"},
], ids=["secagg", "record-dp-eps1", "secagg+record-dp-eps1", "paillier"])
def test_no_loss_leaves_a_protected_or_noised_site_and_the_attack_recovers_nothing(heart_fed, opts):
    plan = probe_plan(_plan(heart_fed, **opts), 2.0 if "dp" in opts else None)
    X, y, guess, gl = _targets(heart_fed)
    r = loss_equation_attack(plan, X, y, guess=guess, guess_label=gl)
    assert r.losses_received == 0
    assert not any(r.success)
    assert r.rms_error == pytest.approx(r.guess_rms_error)  # no better than guessing the population mean


def test_an_honest_coordinator_gets_too_few_independent_equations_from_noiseless_updates(heart_fed):
    plan = probe_plan(_plan(heart_fed))
    X, y, guess, gl = _targets(heart_fed)
    r = loss_equation_attack(plan, X, y, guess=guess, guess_label=gl, chosen=False, rounds=20)
    assert r.losses_received == 80 and not any(r.success)  # the global model moves in the span of 4 records


def test_loss_equation_attack_refuses_a_multi_step_plan(heart_fed):
    X, y, guess, _ = _targets(heart_fed)
    with pytest.raises(ConfigError, match="local_steps = 1"):
        loss_equation_attack(_plan(heart_fed), X, y, guess=guess)


# -- the evaluation oracle ---------------------------------------------------------------------
def test_score_pairs_counts_each_true_value_once_per_label():
    values = np.array([0.0, 0.0, 0.0, 1.0, 2.0])
    labels = np.array([0, 1, 1, 1, 0])
    assert score_pairs([(0.0, 1, 2), (1.0, 0, 1), (2.0, 0, 1)], values, labels, 1e-3) == 4
    assert score_pairs([(0.0, 1, 2), (0.0004, 1, 2)], values, labels, 1e-3) == 3  # a value is matched once
    assert score_pairs([(0.5, 1, 2)], values, labels, 1e-3) == 0


def test_a_site_that_scores_anything_gives_away_every_value_and_label_ties_included():
    # three features; feature 1 holds ties with mixed labels and values close together
    x1 = np.array([0.0, 0.0, 0.0, 0.5, 0.52, 0.52, -1.3, 2.0, 2.0, 3.7], dtype=np.float32)
    y = torch.tensor([0, 1, 1, 1, 0, 0, 1, 0, 1, 0], dtype=torch.float32)
    X = torch.from_numpy(np.stack([np.zeros_like(x1), x1, np.ones_like(x1)], 1))
    site = SiteData("h", X, y, X, y)
    cfg = SimulationConfig(dataset="heart", rounds=2).resolved()
    plan = cfg.plan_for((3,), 1, ("a", "b", "c"))
    r = evaluation_oracle(plan, site, "b", contract=False)
    assert r.recovered == r.pairs == 10 and r.refusal is None
    with pytest.raises(ConfigError, match="not one of the task's features"):
        evaluation_oracle(plan, site, "age")


def test_the_evaluation_contract_refuses_the_oracle_after_two_answers(heart_fed):
    plan = _plan(heart_fed)
    site = heart_fed.sites[0]
    before = evaluation_oracle(plan, site, "age", contract=False)
    assert before.recovered == before.pairs == site.n_test and before.queries_answered > 50
    after = evaluation_oracle(plan, site, "age")
    assert after.queries_answered == 2 and after.recovered == 0
    assert "refuses to evaluate model" in after.refusal and "limit 2" in after.refusal


# -- known sampling ----------------------------------------------------------------------------
def test_known_sampling_takes_away_amplification_only_where_there_was_some():
    sampled = [PrivacyEvent(Mechanism.GAUSSIAN, 1.1, 0.1, 50)] * 3
    declared = epsilon_of(sampled, 1e-5)
    known = known_sampling_epsilon(sampled, 1e-5)
    assert known == pytest.approx(epsilon_of([PrivacyEvent(Mechanism.GAUSSIAN, 1.1, 1.0, 50)] * 3, 1e-5))
    assert known > 5 * declared
    full = [PrivacyEvent(Mechanism.GAUSSIAN, 3.0)]
    assert known_sampling_epsilon(full, 1e-5) == pytest.approx(epsilon_of(full, 1e-5))
    figs = sampling_figures({"a": sampled, "b": full}, 1e-5, "pld", private_randomness=False)
    assert figs.effective_epsilon == figs.known_sampling_epsilon == pytest.approx(max(known, epsilon_of(full, 1e-5)))
    private = sampling_figures({"a": sampled}, 1e-5, "pld", private_randomness=True)
    assert private.amplification_holds and private.effective_epsilon == pytest.approx(declared)
