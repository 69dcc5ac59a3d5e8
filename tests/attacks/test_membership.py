"""Membership inference on heart: it works on an overfit model, and DP at ε ≤ 1 takes it to ~0.5."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from insitu.attacks.membership import MembershipAttack, lira, logit_confidence, loss_threshold, per_record_loss, train_shadows
from insitu.errors import ConfigError
from insitu.learn.models import build_model

from .conftest import fit_mlp, make_dp_mlp


def _split(n: int, seed: int) -> np.ndarray:
    mem = np.zeros(n, dtype=bool)
    mem[np.random.default_rng(seed).permutation(n)[: n // 2]] = True
    return mem


def test_logit_confidence_is_log_odds_of_the_true_label():
    torch.manual_seed(0)
    m = build_model("mlp", (5,), 1)
    X = torch.randn(20, 5)
    y = (torch.rand(20) > 0.5).float()
    p = torch.sigmoid(m(X).squeeze(-1)).detach().double()
    py = torch.where(y == 1, p, 1 - p)
    np.testing.assert_allclose(logit_confidence(m, X, y), torch.log(py / (1 - py)).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(per_record_loss(m, X, y), -torch.log(py).numpy(), rtol=1e-5, atol=1e-6)
    mc = build_model("mlp", (5,), 3)
    yc = torch.randint(0, 3, (20,))
    pc = torch.softmax(mc(X), -1).detach().double().gather(1, yc[:, None]).squeeze(1)
    np.testing.assert_allclose(logit_confidence(mc, X, yc), torch.log(pc / (1 - pc)).numpy(), rtol=1e-4, atol=1e-5)


def test_attacks_find_members_of_an_undefended_model(heart_pool):
    X, y = heart_pool
    mem = _split(X.shape[0], 0)
    idx = torch.from_numpy(np.flatnonzero(mem))
    target = fit_mlp(X[idx], y[idx], seed=99)
    loss = loss_threshold(target, X, y, mem)
    stats = train_shadows(X, y, fit_mlp, 8, seed=1)
    online = lira(target, X, y, mem, fit_mlp, variant=MembershipAttack.LIRA_ONLINE, stats=stats)
    offline = lira(target, X, y, mem, fit_mlp, variant=MembershipAttack.LIRA_OFFLINE, stats=stats)
    assert loss.auc > 0.6
    assert online.auc > 0.65 and offline.auc > 0.6
    assert stats.inside.sum(0).tolist() == [4] * X.shape[0]


@pytest.mark.slow
def test_record_level_dp_at_epsilon_1_keeps_every_attack_near_chance(heart_pool):
    X, y = heart_pool
    n = X.shape[0]
    mem = _split(n, 0)
    idx = torch.from_numpy(np.flatnonzero(mem))
    dp_fit = make_dp_mlp(epsilon=1.0, delta=1e-5, n=len(idx))
    target = dp_fit(X[idx], y[idx], seed=99)
    assert dp_fit.epsilon <= 1.0
    stats = train_shadows(X, y, dp_fit, 4, seed=1)  # the attacker knows the recipe, DP included
    aucs = {
        "loss": loss_threshold(target, X, y, mem).auc,
        "lira-online": lira(target, X, y, mem, dp_fit, variant=MembershipAttack.LIRA_ONLINE, stats=stats).auc,
        "lira-offline": lira(target, X, y, mem, dp_fit, variant=MembershipAttack.LIRA_OFFLINE, stats=stats).auc,
    }
    assert max(aucs.values()) <= 0.55, aucs


def test_lira_needs_pairs_of_shadows(heart_pool):
    X, y = heart_pool
    with pytest.raises(ConfigError, match="even number"):
        train_shadows(X, y, fit_mlp, 3)
