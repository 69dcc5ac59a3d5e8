"""The logistic regression's gradient without autograd (insitu.learn.train._logistic_gradient) gives the
same bits as autograd: parameters and reported loss, for every optimiser, batch size and data shape it
takes; every other model or setting falls back to autograd."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from insitu.federation.task import TaskSpec
from insitu.learn.models import build_model
from insitu.learn.train import TrainConfig, _logistic_gradient, train_local


def _data(n: int, shape: tuple[int, ...], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn((n, *shape), generator=g) * 3
    y = (torch.rand(n, generator=g) < 0.4).float()
    return X, y


def _both(model_of, X, y, cfg, correction=None):
    out = []
    for autograd in (False, True):
        model = model_of()
        stats = train_local(model, X, y, cfg, torch.Generator().manual_seed(11), num_outputs=1,
                            correction=correction, autograd=autograd)
        out.append(([p.detach().clone() for p in model.parameters()], stats))
    return out


def _task(shape: tuple[int, ...]) -> TaskSpec:
    return TaskSpec(model="logreg", input_shape=shape, num_outputs=1, schema=tuple(f"f{i}" for i in range(len(shape))),
                    lr=0.05, local_steps=50, batch_size=4, optimizer="sgd")


@pytest.mark.parametrize("optimizer", ["sgd", "sgdm", "adam"])
@pytest.mark.parametrize("batch", [1, 3, 4, 10, 64, 500])
def test_direct_gradient_is_bit_identical_to_autograd(optimizer, batch):
    task = _task((13,))
    X, y = _data(199, (13,), seed=batch)
    cfg = TrainConfig(lr=0.05, steps=400, batch_size=batch, optimizer=optimizer, weight_decay=0.0 if batch % 2 else 1e-3)
    (p_fast, s_fast), (p_ref, s_ref) = _both(lambda: task.build_model(3), X, y, cfg)
    assert _logistic_gradient(task.build_model(3), 1, cfg) is not None  # the fast path did run
    for a, b in zip(p_fast, p_ref):
        assert torch.equal(a, b)
    assert s_fast == s_ref  # the reported mean loss too
    quiet = task.build_model(3)  # without the loss (baselines): the same parameters
    stats = train_local(quiet, X, y, cfg, torch.Generator().manual_seed(11), num_outputs=1, track_loss=False)
    assert all(torch.equal(a, b) for a, b in zip(quiet.parameters(), p_ref)) and stats["train_loss"] != stats["train_loss"]
    assert not torch.equal(p_fast[0], task.build_model(3).state_dict()["layers.1.weight"])  # it trained


def test_direct_gradient_images_and_registry_model_and_scaffold():
    """(H, W) inputs flattened, the registry's nn.Sequential logreg, and Scaffold's correction."""
    X, y = _data(120, (6, 5), seed=1)
    cfg = TrainConfig(lr=0.1, steps=300, batch_size=8)
    corr = [torch.full((1, 30), 0.01), torch.full((1,), -0.02)]
    for model_of in (lambda: _task((6, 5)).build_model(0), lambda: build_model("logreg", (6, 5), 1, seed=0)):
        (p_fast, s_fast), (p_ref, s_ref) = _both(model_of, X, y, cfg, correction=corr)
        assert _logistic_gradient(model_of(), 1, cfg) is not None
        assert all(torch.equal(a, b) for a, b in zip(p_fast, p_ref)) and s_fast == s_ref


def test_other_models_and_settings_keep_autograd():
    task = _task((13,))
    cfg = TrainConfig()
    assert _logistic_gradient(task.build_model(0), 2, cfg) is None  # cross-entropy over classes
    assert _logistic_gradient(task.build_model(0), 1, replace(cfg, prox_mu=0.1)) is None
    assert _logistic_gradient(task.build_model(0), 1, replace(cfg, class_weights=(1.0, 0.5))) is None
    assert _logistic_gradient(build_model("mlp", (13,), 1, seed=0), 1, cfg) is None
    hooked = task.build_model(0)
    hooked.register_forward_hook(lambda *a: None)
    assert _logistic_gradient(hooked, 1, cfg) is None
    nobias = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(13, 1, bias=False))
    assert _logistic_gradient(nobias, 1, cfg) is None
