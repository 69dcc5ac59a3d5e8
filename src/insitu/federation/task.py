"""A task: model + data schema + hyper-parameters, named by the hash of its content.

Sites approve tasks by hash; the coordinator only ever names one.  The TRAIN
message carries the spec, and a site re-hashes it before running anything.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

from insitu.errors import ConfigError, ProtocolError
from insitu.learn.models import ModelName
from insitu.learn.train import OptimizerName, TrainConfig


@dataclass(frozen=True)
class TaskSpec:
    model: str
    input_shape: tuple[int, ...]
    num_outputs: int
    schema: tuple[str, ...]  # feature names (tabular) or ("image",) with input_shape
    lr: float
    local_steps: int
    batch_size: int
    optimizer: str = OptimizerName.SGD.value
    prox_mu: float = 0.0
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        try:
            ModelName(self.model)
        except ValueError:
            raise ConfigError(f"unknown model {self.model!r}") from None
        object.__setattr__(self, "input_shape", tuple(int(d) for d in self.input_shape))
        object.__setattr__(self, "schema", tuple(str(s) for s in self.schema))
        self.train_config()  # validates hyper-parameters

    def train_config(self) -> TrainConfig:
        shift = self.extra.get("augment_shift", 0)
        if not isinstance(shift, int) or isinstance(shift, bool) or not 0 <= shift <= 8:
            raise ConfigError(f"augment_shift must be an integer from 0 to 8, got {shift!r}")
        return TrainConfig(lr=self.lr, steps=self.local_steps, batch_size=self.batch_size, optimizer=OptimizerName(self.optimizer),
                           prox_mu=self.prox_mu, augment_shift=shift)

    def to_meta(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_shape"] = list(self.input_shape)
        d["schema"] = list(self.schema)
        d["extra"] = dict(self.extra)
        return d

    @classmethod
    def from_meta(cls, meta: Any) -> "TaskSpec":
        if not isinstance(meta, dict):
            raise ProtocolError(f"task spec is not an object: {meta!r}")
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(meta) - known
        if unknown:
            raise ProtocolError(f"task spec has unknown fields {sorted(unknown)}")
        try:
            return cls(**meta)
        except (TypeError, ValueError, ConfigError) as exc:
            raise ProtocolError(f"invalid task spec: {exc}") from None

    def content_hash(self) -> str:
        """SHA-256 over the canonical JSON of the spec; what a site admin approves."""
        blob = json.dumps(self.to_meta(), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()
