"""DP-SGD: the fast per-sample clipping equals a naive per-record loop; clipping bounds every
record's gradient; the noise has the std the accountant assumes; Poisson sampling has rate q."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from insitu.errors import ConfigError
from insitu.learn.dpsgd import ClippedGradients, DPSGDConfig, dp_sgd_step, dp_sgd_train, per_sample_loss
from insitu.learn.models import build_model
from insitu.learn.train import TrainConfig


class SeqNet(nn.Module):
    """Linear layers on (batch, positions, features) inputs and a strided, dilated conv on a tiny
    image: exercises both the ghost-norm and the per-sample-gradient paths."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, stride=2, padding=1, dilation=2)
        self.seq = nn.Linear(4, 64)  # T=3 positions: ghost norm (2T² < 4·64)
        self.seq2 = nn.Linear(2, 2)  # T=6 positions: per-sample gradient (2T² > 2·2)
        self.out = nn.Linear(64 + 3 + 2, 1)

    def forward(self, x):
        img, seq = x[:, :32].reshape(-1, 2, 4, 4), x[:, 32:].reshape(-1, 3, 4)
        a = torch.relu(self.conv(img)).flatten(1)
        b = torch.relu(self.seq(seq)).mean(1)
        c = torch.tanh(self.seq2(x[:, 32:].reshape(-1, 6, 2))).sum(1)
        return self.out(torch.cat([a, b, c], 1))


def _naive(model, x, y, loss, clip):
    params = list(model.parameters())
    total = [torch.zeros_like(p) for p in params]
    norms = []
    for i in range(x.shape[0]):
        g = torch.autograd.grad(loss(model(x[i : i + 1]), y[i : i + 1]), params)
        n = torch.sqrt(sum((gi**2).sum() for gi in g))
        norms.append(n)
        for t, gi in zip(total, g):
            t += gi * min(1.0, clip / (float(n) + 1e-6))
    return total, torch.stack(norms)


CASES = [
    ("cnn", lambda: build_model("cnn", (1, 28, 28), 1), (1, 28, 28), 1),
    ("cnn-3class", lambda: build_model("cnn", (1, 28, 28), 3), (1, 28, 28), 3),
    ("logreg", lambda: build_model("logreg", (13,), 1), (13,), 1),
    ("mlp", lambda: build_model("mlp", (13,), 1), (13,), 1),
    ("seq+dilated-conv", SeqNet, (44,), 1),
]


@pytest.mark.parametrize("name,make,shape,outputs", CASES, ids=[c[0] for c in CASES])
def test_clipped_sum_equals_naive_per_sample_loop(name, make, shape, outputs):
    torch.manual_seed(0)
    model = make()
    x = torch.randn(6, *shape)
    y = torch.randint(0, max(2, outputs), (6,))
    loss = per_sample_loss(outputs)
    clip = 0.3
    with ClippedGradients(model) as cg:
        grads, norms, _ = cg.compute(x, y, loss, clip)
    ref, ref_norms = _naive(model, x, y, loss, clip)
    torch.testing.assert_close(norms, ref_norms, rtol=1e-4, atol=1e-6)
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
    assert (ref_norms > clip).any(), "the case must exercise clipping"


def test_clipping_bounds_every_record_gradient():
    torch.manual_seed(1)
    model = build_model("cnn", (1, 28, 28), 1)
    x, y = torch.randn(6, 1, 28, 28) * 5, torch.randint(0, 2, (6,))
    with ClippedGradients(model) as cg:
        for i in range(6):
            grads, norms, _ = cg.compute(x[i : i + 1], y[i : i + 1], per_sample_loss(1), 0.05)
            assert norms[0] > 0.05
            assert math.sqrt(sum(float((g**2).sum()) for g in grads)) <= 0.05 * (1 + 1e-5)


def test_noise_std_is_z_times_clip_over_expected_batch():
    """An empty Poisson batch still releases noise: exactly N(0, (zC)²)/(qn) per coordinate."""
    model = build_model("mlp", (1000,), 1)  # 32 k parameters = 32 k noise draws
    dp = DPSGDConfig(noise_multiplier=1.3, clip=0.7, sampling_rate=0.1)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    with ClippedGradients(model) as cg:
        dp_sgd_step(cg, opt, torch.zeros(0, 1000), torch.zeros(0), per_sample_loss(1), dp, 32.0, torch.Generator().manual_seed(0))
    g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    want = 1.3 * 0.7 / 32.0
    assert abs(float(g.std()) / want - 1) < 5 / math.sqrt(2 * g.numel())
    assert abs(float(g.mean())) < 5 * want / math.sqrt(g.numel())


def test_poisson_sampling_rate_and_hooks_removed():
    torch.manual_seed(2)
    model = build_model("logreg", (13,), 1)
    X, y = torch.randn(400, 13), torch.randint(0, 2, (400,))
    out = dp_sgd_train(model, X, y, TrainConfig(lr=0.1, steps=200, batch_size=40), DPSGDConfig(1.0, 1.0, 0.1),
                       torch.Generator().manual_seed(0), num_outputs=1)
    assert abs(out["dp_mean_batch"] - 40) < 5 * math.sqrt(400 * 0.1 * 0.9 / 200)
    assert all(not m._forward_hooks for m in model.modules())


def test_dpsgd_learns_a_separable_task():
    torch.manual_seed(3)
    model = build_model("logreg", (5,), 1)
    X = torch.randn(1000, 5)
    y = (X[:, 0] + X[:, 1] > 0).long()
    dp_sgd_train(model, X, y, TrainConfig(lr=0.5, steps=60, batch_size=100), DPSGDConfig(1.0, 1.0, 0.1),
                 torch.Generator().manual_seed(0), num_outputs=1)
    acc = float(((model(X).squeeze(-1) > 0).long() == y).float().mean())
    assert acc > 0.9


def test_unsupported_layers_are_refused():
    with pytest.raises(ConfigError, match="BatchNorm"):
        ClippedGradients(nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)))
    with pytest.raises(ConfigError, match="groups"):
        ClippedGradients(nn.Conv2d(4, 4, 3, groups=2))
