"""Declarative models: a model is data (a list of layers from a fixed vocabulary), never code.

A consortium writes a specification; every site checks it and builds the network itself from this
module's vocabulary, so nothing executable travels and the specification's canonical JSON can be
covered by the task's content hash::

    {"layers": [
        {"type": "conv2d", "out_channels": 16, "kernel_size": 3, "padding": 1},
        {"type": "relu"},
        {"type": "maxpool", "kernel_size": 2},
        {"type": "flatten"},
        {"type": "linear", "out_features": 32},
        {"type": "relu"},
        {"type": "linear", "out_features": "outputs"}
    ]}

Input sizes are inferred from the data's input shape, layer by layer; only output sizes are
written.  ``"outputs"`` stands for the task's number of outputs, and the network must end with
exactly that shape.  A specification that names an unknown layer or key, a size out of range, or a
layer that cannot take the shape before it is refused naming the layer's index and the problem.

    validate_spec(spec) -> canonical dict (defaults filled, keys sorted: hash this)
    canonical_json(spec) -> str
    count_params(spec, input_shape, num_outputs) -> int     (without building anything)
    build_from_spec(spec, input_shape, num_outputs, seed=0, policy=None) -> nn.Module

``ModelSpec`` is a validated specification as a plan's task carries it (``model = "spec"``,
``model_spec = {...}``); ``load_model_spec(path)`` reads one from a JSON file.
``ModelPolicy(max_params=...)`` is a site's cap, checked before any memory is allocated.
``BUILTIN_SPECS`` are the registry's models (logreg, mlp, cnn) written as specifications; built
with the same seed they hold the same initial parameters as ``insitu.learn.models.build_model``.
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from enum import StrEnum
from typing import Any

import torch
from torch import nn

from insitu.errors import ConfigError, PolicyViolation, parse_choice

OUTPUTS = "outputs"  # the size placeholder for the task's number of outputs
MAX_LAYERS = 64
MAX_SIZE = 1 << 16  # any one width, channel count or embedding table size


class LayerType(StrEnum):
    LINEAR = "linear"
    CONV2D = "conv2d"
    MAXPOOL = "maxpool"
    AVGPOOL = "avgpool"
    BATCHNORM = "batchnorm"
    GROUPNORM = "groupnorm"
    LAYERNORM = "layernorm"
    DROPOUT = "dropout"
    EMBEDDING = "embedding"
    LSTM = "lstm"
    GRU = "gru"
    RELU = "relu"
    GELU = "gelu"
    TANH = "tanh"
    SIGMOID = "sigmoid"
    FLATTEN = "flatten"


class RecurrentOutput(StrEnum):
    LAST = "last"  # the last step's hidden state: (hidden,)
    SEQUENCE = "sequence"  # every step's: (length, hidden)


# key -> (kind, default); kind: "size" (1..MAX_SIZE), "size|outputs", "small" (1..15), "count"
# (0..15), "bool", "prob" ([0, 1)), "output" (RecurrentOutput).  No default = required.
_REQUIRED = object()
_KEYS: dict[LayerType, dict[str, tuple[str, Any]]] = {
    LayerType.LINEAR: {"out_features": ("size|outputs", _REQUIRED), "bias": ("bool", True)},
    LayerType.CONV2D: {"out_channels": ("size", _REQUIRED), "kernel_size": ("small", _REQUIRED),
                       "stride": ("small", 1), "padding": ("count", 0), "bias": ("bool", True)},
    LayerType.MAXPOOL: {"kernel_size": ("small", _REQUIRED), "stride": ("small", None)},
    LayerType.AVGPOOL: {"kernel_size": ("small", _REQUIRED), "stride": ("small", None)},
    LayerType.BATCHNORM: {},
    LayerType.GROUPNORM: {"groups": ("size", _REQUIRED)},
    LayerType.LAYERNORM: {},
    LayerType.DROPOUT: {"p": ("prob", 0.5)},
    LayerType.EMBEDDING: {"num_embeddings": ("size", _REQUIRED), "embedding_dim": ("size", _REQUIRED)},
    LayerType.LSTM: {"hidden_size": ("size", _REQUIRED), "num_layers": ("small", 1), "output": ("output", "last")},
    LayerType.GRU: {"hidden_size": ("size", _REQUIRED), "num_layers": ("small", 1), "output": ("output", "last")},
    **{t: {} for t in (LayerType.RELU, LayerType.GELU, LayerType.TANH, LayerType.SIGMOID, LayerType.FLATTEN)},
}


def _check_value(kind: str, value: Any, where: str, key: str) -> Any:
    def bad(expect: str) -> ConfigError:
        return ConfigError(f"{where}: {key} must be {expect}, got {value!r}")

    is_int = isinstance(value, int) and not isinstance(value, bool)
    if kind == "size|outputs":
        if value == OUTPUTS:
            return value
        kind = "size"
    if kind == "size":
        if not is_int or not 1 <= value <= MAX_SIZE:
            raise bad(f"an integer from 1 to {MAX_SIZE}" + (f' or "{OUTPUTS}"' if key == "out_features" else ""))
    elif kind == "small":
        if not is_int or not 1 <= value <= 15:
            raise bad("an integer from 1 to 15")
    elif kind == "count":
        if not is_int or not 0 <= value <= 15:
            raise bad("an integer from 0 to 15")
    elif kind == "bool":
        if not isinstance(value, bool):
            raise bad("true or false")
    elif kind == "prob":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) < 1.0:
            raise bad("a number in [0, 1)")
        return float(value)
    elif kind == "output":
        return parse_choice(RecurrentOutput, value, f"{where}: {key}").value
    return value


def validate_spec(spec: Any) -> dict[str, Any]:
    """Check a specification's form and return its canonical dict (every default written out)."""
    if isinstance(spec, str):
        try:
            spec = json.loads(spec)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"model spec is not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    if not isinstance(spec, Mapping):
        raise ConfigError(f"model spec must be an object with a list of layers, got {type(spec).__name__}")
    unknown = set(spec) - {"layers"}
    if unknown:
        raise ConfigError(f"model spec has unknown key(s) {sorted(unknown)}; it holds only 'layers'")
    layers = spec.get("layers")
    if not isinstance(layers, list) or not layers:
        raise ConfigError("model spec needs a non-empty list 'layers'")
    if len(layers) > MAX_LAYERS:
        raise ConfigError(f"model spec has {len(layers)} layers; at most {MAX_LAYERS}")
    out = []
    for i, layer in enumerate(layers):
        if not isinstance(layer, Mapping):
            raise ConfigError(f"model spec layer {i}: must be an object with a 'type', got {type(layer).__name__}")
        kind = parse_choice(LayerType, layer.get("type"), f"model spec layer {i}: type")
        where = f"model spec layer {i} ({kind.value})"
        keys = _KEYS[kind]
        extra = set(layer) - {"type"} - set(keys)
        if extra:
            raise ConfigError(f"{where}: unknown key(s) {sorted(extra)}; it takes {sorted(keys) or 'none'}")
        canon: dict[str, Any] = {"type": kind.value}
        for key, (vkind, default) in keys.items():
            if key in layer:
                canon[key] = _check_value(vkind, layer[key], where, key)
            elif default is _REQUIRED:
                raise ConfigError(f"{where}: needs {key}")
            elif default is not None:
                canon[key] = default
        if kind in (LayerType.MAXPOOL, LayerType.AVGPOOL) and "stride" not in canon:
            canon["stride"] = canon["kernel_size"]
        if kind is LayerType.EMBEDDING and i != 0:
            raise ConfigError(f"{where}: an embedding reads integer codes, so it must be the first layer")
        out.append(dict(sorted(canon.items())))
    return {"layers": out}


def canonical_json(spec: Any) -> str:
    """The one byte string a specification hashes to: validated, defaults filled, keys sorted."""
    return json.dumps(validate_spec(spec), sort_keys=True, separators=(",", ":"))


# -- shape inference (no tensors) -------------------------------------------------------------------
@dataclass(frozen=True)
class _Planned:
    kind: LayerType
    args: dict[str, Any]
    shape_in: tuple[int, ...]
    shape_out: tuple[int, ...]
    params: int


def _plan(spec: Any, input_shape: tuple[int, ...], num_outputs: int) -> list[_Planned]:
    canon = validate_spec(spec)
    shape = tuple(int(d) for d in input_shape)
    if not shape or any(d < 1 for d in shape):
        raise ConfigError(f"input shape {shape} must be non-empty with positive sizes")
    if not isinstance(num_outputs, int) or num_outputs < 1:
        raise ConfigError(f"num_outputs must be a positive integer, got {num_outputs!r}")
    layers = canon["layers"]
    if len(shape) == 2 and layers[0]["type"] == LayerType.CONV2D:
        shape = (1, *shape)  # (H, W) images get their single channel, as the built-in CNN does
    plan = []
    for i, a in enumerate(layers):
        kind = LayerType(a["type"])
        where = f"model spec layer {i} ({kind.value})"

        def need(rank: int | tuple[int, ...], what: str) -> None:
            ranks = (rank,) if isinstance(rank, int) else rank
            if len(shape) not in ranks:
                raise ConfigError(f"{where}: needs {what}, but the layer before gives shape {shape}"
                                  + (" (add a flatten)" if kind is LayerType.LINEAR else ""))

        params = 0
        if kind is LayerType.LINEAR:
            need((1, 2), "a vector (features,) or a sequence (length, features)")
            out = num_outputs if a["out_features"] == OUTPUTS else a["out_features"]
            params = shape[-1] * out + (out if a["bias"] else 0)
            new = (*shape[:-1], out)
        elif kind is LayerType.CONV2D:
            need(3, "an image (channels, height, width)")
            c, h, w = shape
            k, s, p = a["kernel_size"], a["stride"], a["padding"]
            oh, ow = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
            if oh < 1 or ow < 1:
                raise ConfigError(f"{where}: kernel {k} does not fit the {h}×{w} image (padding {p})")
            params = a["out_channels"] * c * k * k + (a["out_channels"] if a["bias"] else 0)
            new = (a["out_channels"], oh, ow)
        elif kind in (LayerType.MAXPOOL, LayerType.AVGPOOL):
            need(3, "an image (channels, height, width)")
            c, h, w = shape
            k, s = a["kernel_size"], a["stride"]
            if k > h or k > w:
                raise ConfigError(f"{where}: kernel {k} is larger than the {h}×{w} image")
            new = (c, (h - k) // s + 1, (w - k) // s + 1)
        elif kind is LayerType.BATCHNORM:
            need((1, 3), "features (features,) or an image (channels, height, width)")
            params, new = 2 * shape[0], shape
        elif kind is LayerType.GROUPNORM:
            need((1, 3), "features (features,) or an image (channels, height, width)")
            if shape[0] % a["groups"]:
                raise ConfigError(f"{where}: {a['groups']} groups do not divide {shape[0]} channels")
            params, new = 2 * shape[0], shape
        elif kind is LayerType.LAYERNORM:
            params, new = 2 * shape[-1], shape
        elif kind is LayerType.EMBEDDING:
            need(1, "a sequence of integer codes (length,)")
            params = a["num_embeddings"] * a["embedding_dim"]
            new = (shape[0], a["embedding_dim"])
        elif kind in (LayerType.LSTM, LayerType.GRU):
            need(2, "a sequence (length, features)")
            gates = 4 if kind is LayerType.LSTM else 3
            hsz, n = a["hidden_size"], a["num_layers"]
            params = sum(gates * hsz * ((shape[1] if j == 0 else hsz) + hsz + 2) for j in range(n))
            new = (hsz,) if a["output"] == RecurrentOutput.LAST else (shape[0], hsz)
        elif kind is LayerType.FLATTEN:
            new = (math.prod(shape),)
        else:  # activations, dropout
            new = shape
        plan.append(_Planned(kind, a, shape, new, params))
        shape = new
    if shape != (num_outputs,):
        raise ConfigError(f"model spec ends in shape {shape}; it must end in ({num_outputs},), the task's "
                          f'outputs: finish with {{"type": "linear", "out_features": "{OUTPUTS}"}}')
    return plan


def count_params(spec: Any, input_shape: tuple[int, ...], num_outputs: int) -> int:
    """Trainable parameters the specification would have, computed from shapes alone."""
    return sum(p.params for p in _plan(spec, input_shape, num_outputs))


@dataclass(frozen=True)
class ModelPolicy:
    """What a site accepts from a model specification: at most ``max_params`` trainable parameters."""

    max_params: int = 10_000_000

    def check(self, spec: Any, input_shape: tuple[int, ...], num_outputs: int) -> int:
        n = count_params(spec, input_shape, num_outputs)
        if n > self.max_params:
            raise PolicyViolation(f"the model specification has {n:,} parameters; this site's policy allows at "
                                  f"most {self.max_params:,} (raise max_params in the site policy to accept it)")
        return n


# -- building ---------------------------------------------------------------------------------------
class _Recurrent(nn.Module):
    """An LSTM or GRU over (batch, length, features) returning the last step or every step."""

    def __init__(self, kind: LayerType, features: int, hidden: int, layers: int, output: str):
        super().__init__()
        cls = nn.LSTM if kind is LayerType.LSTM else nn.GRU
        self.rnn = cls(features, hidden, num_layers=layers, batch_first=True)
        self.last = output == RecurrentOutput.LAST

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return out[:, -1] if self.last else out


class _Embedding(nn.Module):
    """An embedding table over integer codes that arrive as floats (the data tensors' dtype)."""

    def __init__(self, num: int, dim: int):
        super().__init__()
        self.table = nn.Embedding(num, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        codes = x.long()
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.table.num_embeddings):
            raise ValueError(f"embedding input holds codes outside 0..{self.table.num_embeddings - 1}")
        return self.table(codes)


class SpecModel(nn.Module):
    """A network built from a specification: its layers in order, plus the single image channel
    that (H, W) inputs get before a first convolution."""

    def __init__(self, layers: list[nn.Module], add_channel: bool):
        super().__init__()
        self.layers = nn.Sequential(*layers)
        self.add_channel = add_channel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.add_channel and x.dim() == 3:
            x = x.unsqueeze(1)
        return self.layers(x)

    def __getitem__(self, i: int) -> nn.Module:
        """Layer ``i`` of the specification (the index its error messages name)."""
        return self.layers[i]

    def __len__(self) -> int:
        return len(self.layers)


_ACTIVATIONS: dict[LayerType, Callable[[], nn.Module]] = {
    LayerType.RELU: nn.ReLU, LayerType.GELU: nn.GELU, LayerType.TANH: nn.Tanh, LayerType.SIGMOID: nn.Sigmoid,
    LayerType.FLATTEN: nn.Flatten,
}


def _module(p: _Planned) -> nn.Module:
    a, s = p.args, p.shape_in
    if p.kind is LayerType.LINEAR:
        return nn.Linear(s[-1], p.shape_out[-1], bias=a["bias"])
    if p.kind is LayerType.CONV2D:
        return nn.Conv2d(s[0], a["out_channels"], a["kernel_size"], stride=a["stride"], padding=a["padding"], bias=a["bias"])
    if p.kind is LayerType.MAXPOOL:
        return nn.MaxPool2d(a["kernel_size"], stride=a["stride"])
    if p.kind is LayerType.AVGPOOL:
        return nn.AvgPool2d(a["kernel_size"], stride=a["stride"])
    if p.kind is LayerType.BATCHNORM:
        return nn.BatchNorm1d(s[0]) if len(s) == 1 else nn.BatchNorm2d(s[0])
    if p.kind is LayerType.GROUPNORM:
        return nn.GroupNorm(a["groups"], s[0])
    if p.kind is LayerType.LAYERNORM:
        return nn.LayerNorm(s[-1])
    if p.kind is LayerType.DROPOUT:
        return nn.Dropout(a["p"])
    if p.kind is LayerType.EMBEDDING:
        return _Embedding(a["num_embeddings"], a["embedding_dim"])
    if p.kind in (LayerType.LSTM, LayerType.GRU):
        return _Recurrent(p.kind, s[1], a["hidden_size"], a["num_layers"], a["output"])
    return _ACTIVATIONS[p.kind]()


def build_from_spec(spec: Any, input_shape: tuple[int, ...], num_outputs: int, seed: int = 0, *,
                    policy: ModelPolicy | None = None) -> SpecModel:
    """Validate ``spec`` against the input shape (and ``policy``, before allocating) and build it.

    ``torch.manual_seed(seed)`` precedes construction, as in ``insitu.learn.models.build_model``.
    """
    plan = _plan(spec, input_shape, num_outputs)
    if policy is not None:
        policy.check(spec, input_shape, num_outputs)
    torch.manual_seed(seed)
    add_channel = len(tuple(input_shape)) == 2 and plan[0].kind is LayerType.CONV2D
    return SpecModel([_module(p) for p in plan], add_channel)


@dataclass(frozen=True)
class ModelSpec:
    """A validated model specification, held as its canonical JSON (hashable, comparable, frozen).

    ``ModelSpec.parse`` takes a dict, a JSON string or a ``ModelSpec``; two specifications that
    differ only in key order or in defaults written out are the same ``ModelSpec``."""

    canonical: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "canonical", canonical_json(self.canonical))

    @classmethod
    def parse(cls, raw: Any) -> "ModelSpec":
        return raw if isinstance(raw, ModelSpec) else cls(canonical_json(raw))

    def to_meta(self) -> dict[str, Any]:
        """The canonical dict (what a plan carries and hashes)."""
        return json.loads(self.canonical)

    def count_params(self, input_shape: tuple[int, ...], num_outputs: int) -> int:
        return count_params(self.canonical, input_shape, num_outputs)

    def build(self, input_shape: tuple[int, ...], num_outputs: int, seed: int = 0) -> SpecModel:
        return build_from_spec(self.canonical, input_shape, num_outputs, seed)


#: layers that hold trainable parameters, and those of them record-level DP-SGD clips per record
#: (insitu.learn.dpsgd: Linear and Conv2d; normalisation, embedding and recurrent layers it cannot)
PARAMETERISED = frozenset({LayerType.LINEAR, LayerType.CONV2D, LayerType.BATCHNORM, LayerType.GROUPNORM, LayerType.LAYERNORM,
                           LayerType.EMBEDDING, LayerType.LSTM, LayerType.GRU})
RECORD_DP_LAYERS = frozenset({LayerType.LINEAR, LayerType.CONV2D})


def check_record_dp(spec: Any) -> None:
    """Refuse, naming the layer, a specification whose parameters DP-SGD cannot clip record by record,
    when the plan is made rather than when a site first trains it."""
    for i, layer in enumerate(validate_spec(spec)["layers"]):
        kind = LayerType(layer["type"])
        if kind in PARAMETERISED - RECORD_DP_LAYERS:
            mixes = " (and it mixes the records of a batch)" if kind is LayerType.BATCHNORM else ""
            raise ConfigError(f"model spec layer {i} ({kind.value}) has parameters record-level DP-SGD cannot clip per record{mixes}; "
                              'with dp = "record" the layers with parameters must be linear or conv2d')


def check_federable(spec: Any) -> None:
    """Refuse, naming the layer, a specification whose model a federation cannot carry whole:
    ``batchnorm`` keeps running statistics of each site's data, which are not parameters (they
    would never reach the global model, and sending them would be an undeclared release), so a
    published model would normalise with its initial statistics."""
    for i, layer in enumerate(validate_spec(spec)["layers"]):
        if LayerType(layer["type"]) is LayerType.BATCHNORM:
            raise ConfigError(f"model spec layer {i} (batchnorm): its running statistics are each site's data and are not "
                              "federated, so the global model would normalise with its initial ones; use groupnorm or layernorm")


def load_model_spec(path: str | Path) -> ModelSpec:
    """Read a specification from a JSON file, refusing (naming the file) one that cannot be read or is invalid."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the model specification {path}: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        return ModelSpec.parse(text)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


BUILTIN_SPECS: dict[str, dict[str, Any]] = {
    "logreg": {"layers": [{"type": "flatten"}, {"type": "linear", "out_features": OUTPUTS}]},
    "mlp": {"layers": [{"type": "flatten"}, {"type": "linear", "out_features": 32}, {"type": "relu"},
                       {"type": "linear", "out_features": OUTPUTS}]},
    "cnn": {"layers": [
        {"type": "conv2d", "out_channels": 16, "kernel_size": 3, "padding": 1}, {"type": "relu"},
        {"type": "maxpool", "kernel_size": 2},
        {"type": "conv2d", "out_channels": 32, "kernel_size": 3, "padding": 1}, {"type": "relu"},
        {"type": "maxpool", "kernel_size": 2},
        {"type": "flatten"}, {"type": "linear", "out_features": 32}, {"type": "relu"},
        {"type": "linear", "out_features": OUTPUTS}]},
}


__all__ = ["BUILTIN_SPECS", "LayerType", "ModelPolicy", "ModelSpec", "load_model_spec", "check_record_dp", "PARAMETERISED", "RECORD_DP_LAYERS", "OUTPUTS", "RecurrentOutput", "SpecModel", "build_from_spec",
           "canonical_json", "count_params", "validate_spec"]
