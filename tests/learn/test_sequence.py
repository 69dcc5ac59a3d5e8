"""Sequence models (LSTM, GRU-D): shapes, GRU-D's decays, and exact per-sample gradients for DP-SGD."""
from __future__ import annotations

import pytest
import torch

from insitu.errors import ConfigError
from insitu.learn.dpsgd import ClippedGradients, DPSGDConfig, dp_sgd_train, per_sample_loss
from insitu.learn.models import build_model, get_flat
from insitu.learn.sequence import GRUD, last_observed
from insitu.learn.train import TrainConfig

T, V = 12, 5


def _records(n: int, seed: int = 0) -> torch.Tensor:
    """Random [n, T, 3V] records: sparse observations, zeros where unobserved, gaps in hours."""
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(n, T, V, generator=g) < 0.4).float()
    values = torch.randn(n, T, V, generator=g) * mask
    delta = torch.zeros(n, T, V)
    for t in range(1, T):
        delta[:, t] = 1 + (1 - mask[:, t - 1]) * delta[:, t - 1]
    return torch.cat([values, mask, delta], -1)


@pytest.mark.parametrize("name", ["lstm", "grud"])
def test_forward_shapes(name):
    x = _records(7)
    for outputs in (1, 3):
        model = build_model(name, (T, 3 * V), outputs, seed=0)
        out = model(x)
        assert out.shape == (7, outputs) and torch.isfinite(out).all()
    with pytest.raises(ConfigError, match=r"shape \(T, 3V\)"):
        build_model(name, (T, 3 * V + 1), 1)
    with pytest.raises(ConfigError, match=r"shape \(T, 3V\)"):
        build_model(name, (3 * V,), 1)


def test_last_observed_fills_forward_from_the_mean():
    values = torch.tensor([[[0.0], [2.0], [0.0], [0.0], [-1.0], [0.0]]])
    mask = torch.tensor([[[0.0], [1.0], [0.0], [0.0], [1.0], [0.0]]])
    assert last_observed(values, mask).flatten().tolist() == [0.0, 2.0, 2.0, 2.0, -1.0, -1.0]


def _one_variable(value: float, gap: float) -> torch.Tensor:
    """Observed once (``value``) at step 0, then missing, with time gap ``gap`` at step 1."""
    x = torch.zeros(1, 2, 3)
    x[0, 0, 0], x[0, 0, 1] = value, 1.0
    x[0, 1, 2] = gap
    return x


def test_grud_input_decays_from_last_value_toward_the_mean():
    model = GRUD((2, 3), 1)
    with torch.no_grad():
        model.input_decay.weight.fill_(0.5)
        model.input_decay.bias.fill_(0.0)
    imputed = []
    for gap in (0.0, 1.0, 4.0, 50.0):
        values, mask, delta = _one_variable(2.0, gap).split(1, dim=-1)
        gx, _ = model.decays(delta)
        imputed.append(float(model.impute(values, mask, gx)[0, 1, 0].detach()))
    assert imputed[0] == pytest.approx(2.0)  # no time passed: the last value
    assert imputed[1] == pytest.approx(2.0 * torch.exp(torch.tensor(-0.5)).item())
    assert imputed[0] > imputed[1] > imputed[2] > imputed[3] > 0 and imputed[3] < 1e-9  # toward the mean, 0
    values, mask, delta = _one_variable(2.0, 3.0).split(1, dim=-1)
    gx, _ = model.decays(delta)
    assert float(model.impute(values, mask, gx)[0, 0, 0].detach()) == 2.0  # an observation is used as it is
    with torch.no_grad():
        model.input_decay.weight.fill_(-1.0)  # relu clamps: a negative rate means no decay
    gx, _ = model.decays(delta)
    assert float(model.impute(values, mask, gx)[0, 1, 0].detach()) == pytest.approx(2.0)


def test_grud_hidden_decay_forgets_across_long_gaps():
    torch.manual_seed(0)
    model = GRUD((2, 3), 1)
    early_a, early_b = _one_variable(2.0, 30.0), _one_variable(-2.0, 30.0)
    with torch.no_grad():
        model.hidden_decay.weight.fill_(1.0)
        model.hidden_decay.bias.fill_(0.0)
        model.input_decay.weight.fill_(1.0)  # the imputed input forgets too
        model.input_decay.bias.fill_(0.0)
        forgot = abs(float(model(early_a) - model(early_b)))
        model.hidden_decay.weight.fill_(-1.0)  # no decay: the early observation still matters
        remembered = abs(float(model(early_a) - model(early_b)))
    assert forgot < 1e-6 < remembered


class _Naive:
    """Gradients of one-record batches, clipped and summed: what DP-SGD must equal."""

    @staticmethod
    def run(model, x, y, loss, clip):
        params = [p for p in model.parameters() if p.requires_grad]
        total = [torch.zeros_like(p) for p in params]
        norms = []
        for i in range(x.shape[0]):
            g = torch.autograd.grad(loss(model(x[i : i + 1]), y[i : i + 1]), params)
            n = torch.sqrt(sum((gi**2).sum() for gi in g))
            norms.append(n)
            for t, gi in zip(total, g):
                t += gi * min(1.0, clip / (float(n) + 1e-6))
        return total, torch.stack(norms)


@pytest.mark.parametrize("name", ["lstm", "grud"])
@pytest.mark.parametrize("outputs", [1, 3])
def test_per_sample_gradients_equal_one_record_batches(name, outputs):
    model = build_model(name, (T, 3 * V), outputs, seed=1)
    x = _records(6, seed=2) * 3
    y = torch.randint(0, max(2, outputs), (6,), generator=torch.Generator().manual_seed(3))
    loss = per_sample_loss(outputs)
    with ClippedGradients(model) as cg:
        big, norms_big, _ = cg.compute(x, y, loss, 1e9)  # no clipping: the plain sum of per-sample gradients
        clipped, norms, _ = cg.compute(x, y, loss, 0.05)
    ref_sum, ref_norms = _Naive.run(model, x, y, loss, 1e9)
    ref_clipped, _ = _Naive.run(model, x, y, loss, 0.05)
    torch.testing.assert_close(norms, ref_norms, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(norms_big, ref_norms, rtol=1e-4, atol=1e-7)
    assert (ref_norms > 0.05).all() and len(set(ref_norms.tolist())) == 6, "every record clipped, each by its own factor"
    for g, r in zip(big, ref_sum):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
    for g, r in zip(clipped, ref_clipped):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-7)
    assert all(p.grad is None for p in model.parameters()), "computing must not leave gradients behind"


@pytest.mark.parametrize("name", ["lstm", "grud"])
def test_dp_sgd_trains_sequence_models(name):
    model = build_model(name, (T, 3 * V), 1, seed=0)
    before = get_flat(model)
    x, y = _records(40), torch.randint(0, 2, (40,), generator=torch.Generator().manual_seed(0))
    info = dp_sgd_train(model, x, y, TrainConfig(lr=0.1, steps=3), DPSGDConfig(1.0, 1.0, 0.25), torch.Generator().manual_seed(1),
                        num_outputs=1, noise_generator=torch.Generator().manual_seed(2))
    assert info["steps"] == 3 and info["dp_mean_batch"] > 0
    assert (get_flat(model) != before).any()
    assert all(not h for h in [model._forward_hooks] + [m._forward_hooks for m in model.modules()]), "hooks removed"
