"""The federated model as the gateway serves it: weights, feature schema and model card.

Read from a run directory written by ``insitu simulate`` (or a coordinator's
publication): ``task.json`` (the :class:`~insitu.federation.task.TaskSpec`,
whose ``schema`` names the features in order), ``model.npz`` (``params``: the
flat float32 parameter vector) and ``summary.json`` (training sites, rounds
completed, and — when the run used differential privacy — ``final.epsilon``
(the largest ε any site spent) and ``final.delta``).  The model is rebuilt from the model registry only;
nothing in these files picks code.
"""
from __future__ import annotations

import json
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from insitu.errors import ConfigError, DataError
from insitu.federation.task import TaskSpec
from insitu.learn.models import set_flat
from insitu.learn.train import predict_scores


@dataclass(frozen=True)
class ModelCard:
    """What a caller of /predict is told about the model that answered."""

    model: str
    task_hash: str
    features: tuple[str, ...]
    training_sites: tuple[str, ...]
    rounds: int
    epsilon: float | None  # None: trained without differential privacy
    delta: float | None
    strategy: str | None
    mean_site_accuracy: float | None
    input: str = "tabular"  # what /predict takes (insitu.gateway.inputs.InputKind)
    threshold: float = 0.5  # risk at which /predict says positive: the run's validation choice where it made one
    plan_hash: str | None = None  # the plan the training sites approved (`insitu site pending` shows it), when the run recorded it

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model, "input": self.input, "threshold": self.threshold, "task_hash": self.task_hash,
            "plan_hash": self.plan_hash, "features": list(self.features),
            "training_sites": list(self.training_sites), "rounds": self.rounds,
            "epsilon": self.epsilon, "delta": self.delta,
            "differential_privacy": self.epsilon is not None,
            "strategy": self.strategy, "mean_site_accuracy": self.mean_site_accuracy,
        }


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}; point [model] run_dir at an `insitu simulate` run") from None


def _validation_threshold(final: Mapping[str, Any]) -> float:
    """The decision threshold a run chose on validation data (PhysioNet: the pooled Score 1 threshold
    of ``final.clinical``), else 0.5."""
    thr = ((final.get("clinical") or {}).get("pooled") or {}).get("threshold")
    if isinstance(thr, (int, float)) and not isinstance(thr, bool) and 0.0 < float(thr) < 1.0:
        return float(thr)
    return 0.5


class ServedModel:
    """A binary classifier over any task's inputs (tabular, PhysioNet series, image, sequence); thread-safe inference.

    What a request must carry is :attr:`input`, derived from the task (:mod:`.inputs`)."""

    def __init__(self, spec: TaskSpec, params: np.ndarray, card: ModelCard):
        from insitu.gateway.inputs import InputSchema

        if spec.num_outputs != 1:
            raise ConfigError(f"the gateway serves binary models (one output, a risk score); task {spec.model} has "
                              f"{spec.num_outputs} outputs")
        try:
            self.input = InputSchema.of(spec)
        except DataError as exc:
            raise ConfigError(f"the gateway cannot serve this model: {exc}") from None
        self.spec, self.card = spec, card
        self.net = spec.build_model()  # a registered model or the task's own specification (insitu.learn.spec)
        set_flat(self.net, params)
        self.net.eval()
        self._lock = threading.Lock()

    @property
    def features(self) -> tuple[str, ...]:
        return self.spec.schema

    def risk(self, x: np.ndarray) -> float:
        """The positive class's probability for one input of the task's shape."""
        x = np.asarray(x, dtype=np.float32)
        if x.shape != tuple(self.spec.input_shape):
            raise DataError(f"input of shape {x.shape}; the model takes {tuple(self.spec.input_shape)}")
        with self._lock:
            return float(predict_scores(self.net, torch.from_numpy(x).unsqueeze(0), num_outputs=1)[0])

    @classmethod
    def load(cls, run_dir: str | Path) -> "ServedModel":
        d = Path(run_dir)
        spec = TaskSpec.from_meta(_read_json(d / "task.json"))
        try:
            with np.load(d / "model.npz") as z:
                params = np.asarray(z["params"], dtype=np.float32)
        except (OSError, KeyError, ValueError) as exc:
            raise ConfigError(f"cannot read model parameters {d / 'model.npz'}: {exc}") from None
        summary = _read_json(d / "summary.json") if (d / "summary.json").exists() else {}
        final = summary.get("final") or {}
        card = ModelCard(
            model=spec.model,
            task_hash=spec.content_hash(),
            features=spec.schema,
            training_sites=tuple(sorted(summary.get("sites") or {})),
            rounds=int(final.get("rounds_completed", 0)),
            epsilon=final.get("epsilon"),  # present only when the run used differential privacy
            delta=final.get("delta") if final.get("epsilon") is not None else None,
            strategy=(summary.get("config") or {}).get("strategy"),
            mean_site_accuracy=final.get("mean_site_accuracy"),
            threshold=_validation_threshold(final),
            plan_hash=summary.get("plan_hash") if isinstance(summary.get("plan_hash"), str) else None,
        )
        try:
            from insitu.gateway.inputs import InputSchema

            card = replace(card, input=InputSchema.of(spec).kind.value)
        except DataError:
            pass  # the constructor refuses it with the reason
        return cls(spec, params, card)


__all__ = ["ModelCard", "ServedModel"]
