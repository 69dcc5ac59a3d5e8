"""Shared fixtures for the attack tests: the heart pool, PneumoniaMNIST images, fast trainers."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from insitu.learn.models import build_model

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
    """Record-level DP-SGD (Opacus, PRV accountant) with the noise calibrated once for ``epsilon``."""
    from opacus import PrivacyEngine
    from opacus.accountants.utils import get_noise_multiplier

    sigma = get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=batch / n, epochs=epochs, accountant="prv")

    def fit(X: torch.Tensor, y: torch.Tensor, seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        m = build_model("mlp", (X.shape[1],), 1, seed=seed)
        opt = torch.optim.SGD(m.parameters(), lr=1.0)
        dl = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=batch)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            engine = PrivacyEngine(accountant="prv")
            pm, popt, pdl = engine.make_private(module=m, optimizer=opt, data_loader=dl, noise_multiplier=sigma, max_grad_norm=clip)
            for _ in range(epochs):
                for xb, yb in pdl:
                    if len(xb) == 0:
                        continue
                    popt.zero_grad()
                    torch.nn.functional.binary_cross_entropy_with_logits(pm(xb).squeeze(-1), yb).backward()
                    popt.step()
            fit.epsilon = engine.get_epsilon(delta)
        return pm._module

    fit.sigma = sigma
    return fit
