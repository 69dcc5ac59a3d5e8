"""A task: the model, the data's shape and schema, and the site's local-training hyper-parameters.

It is the model/data part of a :class:`~insitu.plan.Plan`; sites approve the plan's hash, which
covers the task.  :func:`canonical_hash` is the one hash of both.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from insitu.errors import ConfigError, ProtocolError, parse_choice
from insitu.learn.models import MAX_PARAMS, ModelName, build_model, check_size
from insitu.learn.spec import BUILTIN_SPECS, ModelSpec, validate_spec
from insitu.learn.balance import ClassBalance
from insitu.learn.train import OptimizerName, TrainConfig, check_class_weights

if TYPE_CHECKING:
    import torch


#: the most feature names a task's schema may list
MAX_SCHEMA = 100_000


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class TaskSpec:
    """What a site trains: the model, the input shape, outputs (1 for a binary task) and feature
    schema it expects, and the site's local optimiser and hyper-parameters.  Checked on
    construction; part of the plan hash sites approve.

    The model is a built-in name (``logreg``, ``mlp``, ``cnn``: fixed specifications of
    :data:`insitu.learn.spec.BUILTIN_SPECS`; ``lstm``, ``grud``: recurrent cells the layer
    vocabulary cannot express, kept as named built-ins) or ``"spec"`` with ``model_spec`` the
    consortium's own specification (layers from a fixed vocabulary, :mod:`insitu.learn.spec`).
    Either way each site builds the network itself (:meth:`build_model`); no code travels.  A
    built-in name stays a name in the plan, so plans approved before specifications keep their hash."""

    model: str
    input_shape: tuple[int, ...]
    num_outputs: int
    schema: tuple[str, ...]  # feature names (tabular) or ("image",) with input_shape
    lr: float
    local_steps: int
    batch_size: int
    optimizer: str = OptimizerName.SGD.value
    augment_shift: int = 0  # images: random shifts of up to this many pixels during local training
    model_spec: ModelSpec | None = None  # model = "spec": the layers (a dict, JSON text or ModelSpec)
    #: loss weight per class (binary: [negative, positive]), or a rule each site applies to its own
    #: training labels ("balanced", "logit-adjust": :mod:`insitu.learn.balance`; the plan carries the
    #: rule, never a site's numbers); None: every record weighs the same
    class_weights: "tuple[float, ...] | ClassBalance | None" = None
    #: images: random rotation (degrees), scale and contrast change of each training image, at most
    #: these; None: off (absent from the plan, so plans without it keep their hash)
    augment_jitter: tuple[float, float, float] | None = None

    def __post_init__(self) -> None:
        name = parse_choice(ModelName, self.model, "model")
        if name is ModelName.SPEC:
            if self.model_spec is None:
                raise ConfigError('model = "spec" needs model_spec, the specification of the layers (insitu.learn.spec)')
            object.__setattr__(self, "model_spec", ModelSpec.parse(self.model_spec))
            from insitu.learn.spec import check_federable

            check_federable(self.model_spec.canonical)
        elif self.model_spec is not None:
            raise ConfigError(f'model_spec is given with model = "{name.value}"; a specification runs as model = "spec" '
                              "(give one of the two)")
        if not isinstance(self.input_shape, (list, tuple)) or not 1 <= len(self.input_shape) <= 4 or not all(
                isinstance(d, int) and not isinstance(d, bool) and 1 <= d <= 1_000_000 for d in self.input_shape):
            raise ConfigError(f"input_shape must be 1 to 4 positive integers (each at most 1,000,000), got {self.input_shape!r}")
        if isinstance(self.num_outputs, bool) or not isinstance(self.num_outputs, int) or not 1 <= self.num_outputs <= 100_000:
            raise ConfigError(f"num_outputs must be an integer from 1 to 100,000, got {self.num_outputs!r}")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)):
            raise ConfigError(f"lr must be a number, got {self.lr!r}")
        if not isinstance(self.schema, (list, tuple)) or not 1 <= len(self.schema) <= MAX_SCHEMA or not all(
                isinstance(c, str) and 0 < len(c) <= 200 for c in self.schema):
            raise ConfigError(f"schema must be a list of 1 to {MAX_SCHEMA:,} feature names (non-empty strings), got {_short(self.schema)}")
        object.__setattr__(self, "input_shape", tuple(int(d) for d in self.input_shape))
        object.__setattr__(self, "schema", tuple(self.schema))
        if self.class_weights is not None:
            object.__setattr__(self, "class_weights", check_class_weights(self.class_weights, max(2, self.num_outputs)))
        if self.augment_jitter is not None:
            from insitu.learn.train import check_jitter

            object.__setattr__(self, "augment_jitter", check_jitter(self.augment_jitter))
        self.param_count()  # checks the size (and a specification's shapes) before any party allocates the model
        self.train_config()  # validates hyper-parameters

    def train_config(self, prox_mu: float = 0.0) -> TrainConfig:
        """The site's local-training settings (``prox_mu`` comes from the plan's strategy)."""
        shift = self.augment_shift
        if not isinstance(shift, int) or isinstance(shift, bool) or not 0 <= shift <= 8:
            raise ConfigError(f"augment_shift must be an integer from 0 to 8, got {shift!r}")
        for k in ("local_steps", "batch_size"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 10_000_000:
                raise ConfigError(f"{k} must be an integer from 1 to 10,000,000, got {v!r}")
        optimizer = parse_choice(OptimizerName, self.optimizer, "optimizer")
        return TrainConfig(lr=self.lr, steps=self.local_steps, batch_size=self.batch_size, optimizer=optimizer,
                           prox_mu=prox_mu, augment_shift=shift, class_weights=self.class_weights, augment_jitter=self.augment_jitter)

    # -- the model ----------------------------------------------------------------------------
    def resolved_spec(self) -> ModelSpec | None:
        """The specification every site builds: the task's own, or a built-in name's; None for the
        recurrent built-ins (``lstm``, ``grud``), which stay named models."""
        if self.model_spec is not None:
            return self.model_spec
        builtin = BUILTIN_SPECS.get(ModelName(self.model).value)
        return ModelSpec.parse(builtin) if builtin is not None else None

    def param_count(self) -> int:
        """Trainable parameters of the task's model, from shapes alone; refused above
        :data:`~insitu.learn.models.MAX_PARAMS` (the model travels in one message)."""
        if self.model_spec is None:
            return check_size(self.model, self.input_shape, self.num_outputs)
        n = self.model_spec.count_params(self.input_shape, self.num_outputs)
        if n > MAX_PARAMS:
            raise ConfigError(f"the model specification would have {n:,} parameters for input_shape {list(self.input_shape)} and "
                              f"num_outputs {self.num_outputs}; the limit is {MAX_PARAMS:,} (the model travels in one message of at most 64 MiB)")
        return n

    def build_model(self, seed: int = 0) -> "torch.nn.Module":
        """The task's network with the initial parameters of ``seed``, built here from the specification
        (the same parameters, in the same order, whichever party builds it)."""
        spec = self.resolved_spec()
        if spec is None:
            return build_model(self.model, self.input_shape, self.num_outputs, seed=seed)
        return spec.build(self.input_shape, self.num_outputs, seed=seed)

    def to_meta(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_shape"] = list(self.input_shape)
        d["schema"] = list(self.schema)
        del d["model_spec"]  # absent for built-in names: their plans hash as they always did
        if self.model_spec is not None:
            d["model_spec"] = self.model_spec.to_meta()
        if self.augment_jitter is None:
            del d["augment_jitter"]  # absent, not null: plans without it keep the hash they had
        else:
            d["augment_jitter"] = list(self.augment_jitter)
        if self.class_weights is None:
            del d["class_weights"]  # absent, not null: plans without class weights keep the hash they had
        elif isinstance(self.class_weights, ClassBalance):
            d["class_weights"] = self.class_weights.value
        else:
            d["class_weights"] = list(self.class_weights)
        return d

    @classmethod
    def from_meta(cls, meta: Any) -> "TaskSpec":
        if not isinstance(meta, dict):
            raise ProtocolError(f"task spec is not an object: {meta!r}")
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(meta) - known
        if unknown:
            raise ProtocolError(f"task spec has unknown fields {sorted(unknown)}")
        if "model_spec" in meta:  # on the wire only in canonical form: one plan, one encoding, one hash
            try:
                canon = validate_spec(meta["model_spec"])
            except ConfigError as exc:
                raise ProtocolError(f"invalid task spec: {exc}") from None
            if not isinstance(meta["model_spec"], dict) or _json(canon) != _json(meta["model_spec"]):
                raise ProtocolError("invalid task spec: model_spec is not in canonical form (every layer's keys written out, "
                                    "as ModelSpec.to_meta gives it)")
        try:
            return cls(**meta)
        except (TypeError, ValueError, ConfigError) as exc:
            raise ProtocolError(f"invalid task spec: {exc}") from None

    def content_hash(self) -> str:
        """SHA-256 over the canonical JSON of the spec."""
        return canonical_hash(self.to_meta())


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def canonical_hash(meta: Any) -> str:
    """SHA-256 over canonical JSON (sorted keys, no spaces, no NaN): the one hash of plans and tasks."""
    try:
        blob = json.dumps(meta, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"cannot hash a value that is not plain JSON: {exc}") from None
    return hashlib.sha256(blob).hexdigest()
