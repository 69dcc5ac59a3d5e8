"""Model compression for devices: magnitude pruning, knowledge distillation, post-training int8.

These act on a trained PyTorch model (the federated global model of a run);
:mod:`insitu.compress.export` turns the result into an ONNX file and checks it
with onnxruntime.  Pruning and distillation happen in PyTorch; int8
quantization happens on the ONNX graph (onnxruntime's static quantizer,
calibrated on training images), because that is the form a device runs.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from insitu.errors import ConfigError
from insitu.learn.train import loss_fn


def prunable(model: nn.Module) -> list[nn.Parameter]:
    """Weights of conv and linear layers; biases are too few to matter and pruning them hurts."""
    return [m.weight for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))]


def sparsity(model: nn.Module) -> float:
    """Fraction of prunable weights that are exactly zero."""
    ws = prunable(model)
    total = sum(w.numel() for w in ws)
    return sum(int((w == 0).sum()) for w in ws) / total if total else 0.0


def magnitude_masks(model: nn.Module, amount: float) -> list[torch.Tensor]:
    """Global magnitude pruning (Han et al. 2015): one threshold over all prunable weights, so
    layers with many small weights give up more than small, dense ones."""
    if not 0.0 <= amount < 1.0:
        raise ConfigError(f"--prune must be a fraction in [0, 1), got {amount}")
    ws = prunable(model)
    if not ws or amount == 0.0:
        return [torch.ones_like(w, dtype=torch.bool) for w in ws]
    flat = torch.cat([w.detach().abs().reshape(-1) for w in ws])
    k = math.ceil(amount * flat.numel() - 1e-9)  # at least ``amount``: 50 % of 13 weights prunes 7
    if k == 0:
        return [torch.ones_like(w, dtype=torch.bool) for w in ws]
    threshold = torch.kthvalue(flat, k).values
    # weights tied with the threshold go too (at least ``amount`` is pruned; ties are rare in floats)
    return [w.detach().abs() > threshold for w in ws]


def apply_masks(model: nn.Module, masks: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for w, m in zip(prunable(model), masks):
            w.mul_(m)


def prune(model: nn.Module, amount: float, *, X: torch.Tensor | None = None, y: torch.Tensor | None = None,
          num_outputs: int = 1, finetune_steps: int = 0, lr: float = 0.01, batch_size: int = 64, seed: int = 0) -> nn.Module:
    """A pruned copy of ``model`` with ``amount`` of its prunable weights at zero.

    With data and ``finetune_steps`` > 0 the surviving weights are fine-tuned with the mask held
    fixed (pruned weights stay zero after every step), which recovers most of the accuracy that
    one-shot pruning loses at high sparsity.
    """
    pruned = copy.deepcopy(model)
    masks = magnitude_masks(pruned, amount)
    apply_masks(pruned, masks)
    if finetune_steps > 0 and X is not None and y is not None:
        _fit(pruned, X, y, num_outputs, finetune_steps, lr, batch_size, seed, after_step=lambda: apply_masks(pruned, masks))
    return pruned


def _fit(model, X, y, num_outputs, steps, lr, batch_size, seed, *, after_step=None, loss=None) -> None:
    gen = torch.Generator().manual_seed(seed)
    crit = loss or (lambda out, xb, yb: loss_fn(num_outputs)(out, yb))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    n = X.shape[0]
    for _ in range(steps):
        idx = torch.randint(0, n, (min(batch_size, n),), generator=gen)
        opt.zero_grad(set_to_none=True)
        crit(model(X[idx]), X[idx], y[idx]).backward()
        opt.step()
        if after_step is not None:
            after_step()
    model.eval()


class TinyCNN(nn.Module):
    """A student for 28×28 images: two 3×3 conv layers of 4 and 8 channels, one linear head
    (~1.3 k parameters, ~40× fewer than the federated SmallCNN)."""

    def __init__(self, input_shape: tuple[int, ...], num_outputs: int):
        super().__init__()
        c = input_shape[0] if len(input_shape) == 3 else 1
        side = input_shape[-1] // 4
        self.net = nn.Sequential(
            nn.Conv2d(c, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(8 * side * side, num_outputs),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:
            x = x.unsqueeze(1)
        return self.net(x)


def student_for(input_shape: tuple[int, ...], num_outputs: int, seed: int = 0) -> nn.Module:
    """The distillation student: TinyCNN for images, logistic regression for tabular inputs."""
    torch.manual_seed(seed)
    if len(input_shape) >= 2:
        return TinyCNN(tuple(input_shape), num_outputs)
    return nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(input_shape)), num_outputs))


@dataclass(frozen=True)
class DistillConfig:
    """Hinton et al. 2015: the student matches the teacher's softened outputs (temperature T)
    with weight ``alpha`` and the true labels with weight 1 − alpha."""

    temperature: float = 4.0
    alpha: float = 0.7
    steps: int = 1500
    lr: float = 0.01
    batch_size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.temperature > 0 or not 0.0 <= self.alpha <= 1.0 or self.steps < 1:
            raise ConfigError(f"distillation needs temperature > 0, alpha in [0, 1], steps >= 1; got {self}")


def distill(teacher: nn.Module, X: torch.Tensor, y: torch.Tensor, *, num_outputs: int,
            student: nn.Module | None = None, config: DistillConfig = DistillConfig()) -> nn.Module:
    """Train a small ``student`` on the teacher's soft outputs over the records in ``X``."""
    student = student if student is not None else student_for(tuple(X.shape[1:]), num_outputs, config.seed)
    teacher.eval()
    with torch.no_grad():
        soft = torch.cat([teacher(X[i : i + 2048]) for i in range(0, X.shape[0], 2048)])
    T, a = config.temperature, config.alpha
    hard = loss_fn(num_outputs)
    gen = torch.Generator().manual_seed(config.seed)
    opt = torch.optim.Adam(student.parameters(), lr=config.lr)
    student.train()
    n = X.shape[0]
    for _ in range(config.steps):
        idx = torch.randint(0, n, (min(config.batch_size, n),), generator=gen)
        out, t = student(X[idx]), soft[idx]
        if num_outputs == 1:
            kd = nn.functional.binary_cross_entropy_with_logits(out.squeeze(-1) / T, torch.sigmoid(t.squeeze(-1) / T))
        else:
            kd = nn.functional.kl_div(nn.functional.log_softmax(out / T, -1), nn.functional.softmax(t / T, -1), reduction="batchmean")
        loss = a * T * T * kd + (1 - a) * hard(out, y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    student.eval()
    return student


def count_params(model: nn.Module) -> tuple[int, int]:
    """(all parameters, nonzero parameters)."""
    total = sum(p.numel() for p in model.parameters())
    nonzero = sum(int((p != 0).sum()) for p in model.parameters())
    return total, nonzero


__all__ = ["prune", "magnitude_masks", "apply_masks", "sparsity", "prunable", "distill", "DistillConfig", "TinyCNN", "student_for", "count_params"]
