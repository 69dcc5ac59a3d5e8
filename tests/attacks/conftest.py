"""Shared fixtures for the attack tests: the heart pool, PneumoniaMNIST images, fast trainers."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from insitu.learn.models import build_model
from insitu.learn.train import single_thread

PNEUMONIA = Path(__file__).resolve().parents[3] / "shared/data/pneumoniamnist.npz"


@pytest.fixture(scope="session")
def heart():
    from insitu.data.heart import load_heart

    return load_heart()


@pytest.fixture(scope="session")
def heart_pool(heart):
    """All 740 heart records (z-scored per hospital) as one candidate pool."""
    X, y = heart.pooled_train()
    Xt, yt = heart.pooled_test()
    return torch.cat([X, Xt]), torch.cat([y, yt])


@pytest.fixture(scope="session")
def pneumonia():
    if not PNEUMONIA.exists():
        pytest.skip(f"{PNEUMONIA} not present")
    with np.load(PNEUMONIA) as z:
        imgs = z["train_images"][:600].astype(np.float32) / 255.0
        labels = z["train_labels"][:600, 0].astype(np.float32)
    x = torch.from_numpy((imgs - 0.5) / 0.5).unsqueeze(1)  # the loader's scaling: [-1, 1]
    return x, torch.from_numpy(labels)


def fit_mlp(X: torch.Tensor, y: torch.Tensor, seed: int, steps: int = 300) -> torch.nn.Module:
    """Full-batch Adam on the registry's MLP: fast, and it overfits small data as real models do."""
    torch.manual_seed(seed)
    m = build_model("mlp", (X.shape[1],), 1, seed=seed)
    opt = torch.optim.Adam(m.parameters(), lr=0.02)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(m(X).squeeze(-1), y).backward()
        opt.step()
    return m


def make_dp_mlp(epsilon: float, delta: float, n: int, epochs: int = 15, batch: int = 128, clip: float = 1.0):
    """Record-level DP-SGD as the sites run it (``insitu.learn.dpsgd``: Poisson sampling, per-record
    clipping), with the noise calibrated by the project's accountant (PLD) for ``epsilon``."""
    from insitu.learn.dpsgd import DPSGDConfig, dp_sgd_train
    from insitu.learn.train import TrainConfig
    from insitu.privacy import calibrate_noise, epsilon_of
    from insitu.privacy.accounting import Mechanism, PrivacyEvent

    q = batch / n
    steps = int(round(epochs / q))
    sigma = calibrate_noise(epsilon, delta, rounds=1, sampling_rate=q, steps_per_round=steps)

    def fit(X: torch.Tensor, y: torch.Tensor, seed: int) -> torch.nn.Module:
        m = build_model("mlp", (X.shape[1],), 1, seed=seed)
        dp_sgd_train(m, X, y, TrainConfig(lr=1.0, steps=steps), DPSGDConfig(sigma, clip, min(1.0, batch / X.shape[0])),
                     torch.Generator().manual_seed(seed), num_outputs=1, noise_generator=torch.Generator().manual_seed(seed + 1))
        return m

    fit.sigma = sigma
    fit.epsilon = epsilon_of([PrivacyEvent(Mechanism.GAUSSIAN, sigma, q, steps)], delta)
    return fit


@pytest.fixture(autouse=True)
def _one_thread():
    """Thousands of tiny steps: one torch thread is far faster than two on a shared 2-core box."""
    with single_thread():
        yield
