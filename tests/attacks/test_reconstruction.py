"""Reconstruction from what the coordinator receives: exact without a defence, a guess with SecAgg."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from insitu.attacks.probe import attack_images, attack_tabular, single_record_round
from insitu.attacks.reconstruction import MatchConfig, analytic_linear, gradient_matching, infer_labels, score_images
from insitu.errors import ConfigError
from insitu.federation.task import TaskSpec
from insitu.plan import DPSpec, Plan, ProtectionSpec
from insitu.learn.models import build_model, get_flat
from insitu.learn.train import TrainConfig, train_local

HEART_TASK = TaskSpec(model="logreg", input_shape=(13,), num_outputs=1, schema=tuple(f"f{i}" for i in range(13)), lr=0.05, local_steps=1, batch_size=1)
CNN_TASK = TaskSpec(model="cnn", input_shape=(1, 28, 28), num_outputs=1, schema=("image",), lr=0.05, local_steps=1, batch_size=1)
PLAIN, SECAGG = ProtectionSpec("plain"), ProtectionSpec("secagg")


def plan(task, protection=PLAIN, dp=None):
    return Plan(task, protection=protection, dp=dp or DPSpec())


def _trained_logreg(X, y):
    m = build_model("logreg", (13,), 1, seed=0)
    train_local(m, X, y, TrainConfig(lr=0.05, steps=100), torch.Generator().manual_seed(0), num_outputs=1)
    return get_flat(m)


def test_single_record_heart_update_is_reconstructed_exactly(heart_pool):
    X, y = heart_pool
    params = _trained_logreg(X, y)
    idx = torch.tensor([3, 141, 402, 688])
    obs = single_record_round(plan(HEART_TASK), X[idx], y[idx], params)
    res = attack_tabular(obs, HEART_TASK, X[idx].numpy(), np.zeros(13), tol=1e-4)
    assert res.success == (True, True, True, True)
    assert max(res.quality) < 1e-5


def test_several_local_steps_on_one_record_are_still_exact(heart_pool):
    X, y = heart_pool
    task = replace(HEART_TASK, local_steps=7)
    obs = single_record_round(plan(task), X[:1], y[:1], _trained_logreg(X, y))
    est = analytic_linear(obs.candidate_views()["probe-1:update"], build_model("logreg", (13,), 1)).estimate
    np.testing.assert_allclose(est, X[0].numpy(), atol=1e-4)


def test_secure_aggregation_of_four_sites_leaves_no_better_than_a_guess(heart_pool):
    """Under SecAgg the coordinator holds 4 masked vectors and Σ of 4 single-record updates: no
    record is recovered, and the best estimate is on average no closer to any of the four records
    than the population mean (the guess) is."""
    X, y = heart_pool
    params = _trained_logreg(X, y)
    rng = np.random.default_rng(0)
    exact, dist, guess = [], [], []
    for _ in range(20):
        idx = torch.from_numpy(rng.choice(X.shape[0], 4, replace=False))
        obs = single_record_round(plan(HEART_TASK, SECAGG), X[idx], y[idx], params)
        assert set(obs.candidate_views()) == {f"probe-{i}:masked" for i in range(1, 5)} | {"aggregate"}
        res = attack_tabular(obs, HEART_TASK, X[idx].numpy(), np.zeros(13))
        exact.extend(res.success)
        dist.extend(res.quality)
        guess.extend(res.guess_quality)
    assert not any(exact)
    assert np.mean(dist) >= np.mean(guess)


def test_record_level_dp_sgd_update_is_not_reconstructed(heart_pool):
    """DP-SGD at the noise the largest heart site (Cleveland) uses for ε = 1 over a 30-round run
    (σ ≈ 8.7): the clipped, noised single-record update no longer yields the record, and even the
    best of the 17 vectors the coordinator holds is, on average, no closer than the guess."""
    X, y = heart_pool
    params = _trained_logreg(X, y)
    rng = np.random.default_rng(1)
    idx = torch.from_numpy(rng.choice(X.shape[0], 16, replace=False))
    secrets = {f"probe-{i + 1}": bytes([i + 1]) * 32 for i in range(16)}  # fixed noise: a repeatable figure
    obs = single_record_round(plan(HEART_TASK, dp=DPSpec("record", noise_multiplier=8.7, clip=1.0)), X[idx], y[idx], params, secrets=secrets)
    res = attack_tabular(obs, HEART_TASK, X[idx].numpy(), np.zeros(13))
    assert not any(res.success)
    assert np.mean(res.quality) > 0.95 * np.mean(res.guess_quality)
    # the same probe without DP recovers every record: the defence, not the probe, stops it
    plain = attack_tabular(single_record_round(plan(HEART_TASK), X[idx], y[idx], params), HEART_TASK, X[idx].numpy(), np.zeros(13))
    assert all(plain.success)


def test_analytic_recovery_refuses_a_model_without_a_leading_linear_layer():
    with pytest.raises(ConfigError, match="starts with Conv2d"):
        analytic_linear(np.zeros(100_000), build_model("cnn", (1, 28, 28), 1))


def test_label_is_read_from_the_last_bias(pneumonia):
    X, y = pneumonia
    m = build_model("cnn", (1, 28, 28), 1, seed=0)
    for i in range(6):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(m(X[i : i + 1]).reshape(-1), y[i : i + 1])
        g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, list(m.parameters()))])
        assert float(infer_labels(-g.numpy(), m)[0]) == float(y[i])


FAST = MatchConfig(iterations=200, bounds=(-1.0, 1.0))


@pytest.mark.slow
def test_gradient_matching_recovers_an_xray_from_one_update_and_not_under_secagg(pneumonia):
    X, y = pneumonia
    params = get_flat(build_model("cnn", (1, 28, 28), 1, seed=0))
    guess = X[100:].mean(0).numpy()
    idx = torch.tensor([0, 7, 21, 40])
    obs = single_record_round(plan(CNN_TASK), X[idx], y[idx], params)
    one = replace(obs, train_replies={"probe-1": obs.train_replies["probe-1"]})
    res = attack_images(one, CNN_TASK, X[idx[:1]].numpy(), guess, FAST)
    assert res.success == (True,)
    assert res.quality[0] > 0.8 and res.psnr[0] > 20
    summed = attack_images(single_record_round(plan(CNN_TASK, SECAGG), X[idx], y[idx], params), CNN_TASK, X[idx].numpy(), guess, FAST)
    assert summed.views == 1  # masked integers cannot be a gradient: only the sum is attacked
    assert not any(summed.success)
    assert np.mean(summed.quality) <= np.mean(summed.guess_quality) + 0.05


@pytest.mark.slow
def test_feature_inversion_recovers_an_xray_from_a_trained_cnn_where_gradient_matching_alone_fails(pneumonia):
    """On a trained CNN the gradient's direction alone is a poor guide; the dense layer's analytic
    ratio gives the record's features exactly and inverting them gives the image back."""
    from insitu.attacks.reconstruction import feature_inversion, gradient_matching, gradient_mismatch, reconstruct_image
    from insitu.learn.train import TrainConfig, train_local

    X, y = pneumonia
    model = build_model("cnn", (1, 28, 28), 1, seed=0)
    train_local(model, X[100:600], y[100:600], TrainConfig(lr=1e-3, steps=150, batch_size=64, optimizer="adam"), torch.Generator().manual_seed(0), num_outputs=1)
    guess = X[100:].mean(0).numpy()
    i = 3
    loss = torch.nn.functional.binary_cross_entropy_with_logits(model(X[i : i + 1]).reshape(-1), y[i : i + 1])
    update = -torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, list(model.parameters()))]).numpy()
    cfg = MatchConfig(iterations=300, bounds=(-1.0, 1.0))  # the report's default iterations
    fi = feature_inversion(update, model, (1, 28, 28), config=cfg)
    s_fi = score_images(fi[0], X[i : i + 1].numpy(), guess[None], cfg.bounds)
    assert s_fi.success() and s_fi.psnr > 25, s_fi
    best = reconstruct_image(update, model, (1, 28, 28), config=cfg)
    assert gradient_mismatch(best, update, model) <= gradient_mismatch(fi, update, model) + 1e-9
    gm = gradient_matching(update, model, (1, 28, 28), config=cfg)
    assert score_images(gm[0], X[i : i + 1].numpy(), guess[None], cfg.bounds).ssim < s_fi.ssim
