"""Model registry: the only models a task may name.  Nothing from a message picks code."""
from __future__ import annotations

import enum
from typing import Callable

import numpy as np
import torch
from torch import nn

from insitu.errors import ConfigError, parse_choice
from insitu.learn.sequence import GRUD, HIDDEN, LSTMClassifier


class ModelName(str, enum.Enum):
    LOGREG = "logreg"
    CNN = "cnn"
    MLP = "mlp"
    LSTM = "lstm"  # sequences [T, 3V] (insitu.learn.sequence)
    GRUD = "grud"
    SPEC = "spec"  # a declarative specification the task carries (insitu.learn.spec), built by each site


def _logreg(input_shape: tuple[int, ...], num_outputs: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(input_shape)), num_outputs))


def _mlp(input_shape: tuple[int, ...], num_outputs: int) -> nn.Module:
    d = int(np.prod(input_shape))
    return nn.Sequential(nn.Flatten(), nn.Linear(d, 32), nn.ReLU(), nn.Linear(32, num_outputs))


class SmallCNN(nn.Module):
    """Two conv blocks and two dense layers for 28×28 single-channel images (~56 k parameters)."""

    def __init__(self, input_shape: tuple[int, ...], num_outputs: int):
        super().__init__()
        c = input_shape[0] if len(input_shape) == 3 else 1
        self.features = nn.Sequential(
            nn.Conv2d(c, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        side = input_shape[-1] // 4
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(32 * side * side, 32), nn.ReLU(), nn.Linear(32, num_outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:
            x = x.unsqueeze(1)
        return self.head(self.features(x))


MODELS: dict[ModelName, Callable[[tuple[int, ...], int], nn.Module]] = {
    ModelName.LOGREG: _logreg,
    ModelName.MLP: _mlp,
    ModelName.CNN: SmallCNN,
    ModelName.LSTM: LSTMClassifier,
    ModelName.GRUD: GRUD,
}


#: the most parameters a model may have: the global model travels in one message of at most 64 MiB
#: (Scaffold sends a control vector of the same size beside it), and every party holds a few copies
MAX_PARAMS = 8_000_000


def _named(key: ModelName) -> ModelName:
    if key is ModelName.SPEC:
        raise ConfigError('model "spec" is built from the task\'s model_spec (TaskSpec.build_model), not by name')
    return key


def param_count(name: str | ModelName, input_shape: tuple[int, ...], num_outputs: int) -> int:
    """How many parameters :func:`build_model` would make, computed exactly without allocating them
    (Python integers, so a hostile shape cannot overflow)."""
    key = _named(ModelName(name))
    d = 1
    for x in input_shape:
        d *= int(x)
    o = int(num_outputs)
    if key is ModelName.LOGREG:
        return d * o + o
    if key is ModelName.MLP:
        return d * 32 + 32 + 32 * o + o
    if key in (ModelName.LSTM, ModelName.GRUD):  # records [T, 3V] (insitu.learn.sequence, hidden size HIDDEN)
        v, h = int(input_shape[-1]) // 3, HIDDEN
        head = h * o + o
        if key is ModelName.LSTM:
            return (3 * v * 4 * h + 4 * h) + 4 * h * h + head
        return 2 * v + (v * h + h) + (2 * v * 3 * h + 3 * h) + (3 * h * h + 3 * h) + head
    c = int(input_shape[0]) if len(input_shape) == 3 else 1
    side = int(input_shape[-1]) // 4
    return (c * 16 * 9 + 16) + (16 * 32 * 9 + 32) + (32 * side * side * 32 + 32) + (32 * o + o)


def check_size(name: str | ModelName, input_shape: tuple[int, ...], num_outputs: int) -> int:
    """:func:`param_count`, refused above :data:`MAX_PARAMS` with a sentence naming the shape."""
    n = param_count(name, input_shape, num_outputs)
    if n > MAX_PARAMS:
        raise ConfigError(f"model {ModelName(name).value} with input_shape {list(input_shape)} and num_outputs {num_outputs} would have "
                          f"{n:,} parameters; the limit is {MAX_PARAMS:,} (the model travels in one message of at most 64 MiB)")
    return n


def build_model(name: str | ModelName, input_shape: tuple[int, ...], num_outputs: int, seed: int = 0) -> nn.Module:
    key = _named(parse_choice(ModelName, name, "model"))
    torch.manual_seed(seed)
    return MODELS[key](tuple(input_shape), num_outputs)


def get_flat(model: nn.Module) -> np.ndarray:
    """All trainable parameters as one float32 vector (the unit of federation)."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).cpu().numpy().astype(np.float32)


def set_flat(model: nn.Module, vec: np.ndarray) -> None:
    vec = np.asarray(vec, dtype=np.float32)
    n = num_params(model)
    if vec.shape != (n,):
        raise ConfigError(f"parameter vector has shape {vec.shape}, the model needs ({n},)")
    t = torch.from_numpy(vec)
    i = 0
    with torch.no_grad():
        for p in model.parameters():
            k = p.numel()
            p.copy_(t[i : i + k].view_as(p))
            i += k


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
