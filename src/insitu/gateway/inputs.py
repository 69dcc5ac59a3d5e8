"""What ``/predict`` accepts for a task, derived from the task the served model was trained on.

The input schema follows the model's :class:`~insitu.federation.task.TaskSpec` (its ``input_shape``
and feature ``schema``); nothing is hard-wired to one dataset:

=====================  ===========================================================================
kind                   request body
=====================  ===========================================================================
``tabular``            ``{"features": {NAME: number, ...}}``: every feature of the schema, by name,
                       standardised as the training records were; nothing else.
``physionet2012``      ``{"observations": [["HH:MM", PARAMETER, value], ...]}``: one ICU stay's
                       first 48 hours, the rows of its PhysioNet 2012 record file without the
                       ``RecordID`` line (``insitu.data.physionet.series_rows`` turns a file into
                       this list).  Descriptors (``Age``, ``Gender``, ``Height``, ``ICUType``,
                       ``Weight``) at ``00:00``, ``ICUType`` required; ``-1`` means missing.
                       Binned and normalised by the loader's own code
                       (:func:`insitu.data.physionet.featurize_series`), so the model sees what it
                       saw in training; values outside the plausible ranges are dropped as in
                       training and counted in the answer's ``ignored``.
``image``              ``{"image": [[[...]]]}``: one image as ``channels × height × width`` numbers,
                       scaled as the training images were.
``sequence``           ``{"sequence": [[...], ...]}``: ``steps × features`` numbers.
=====================  ===========================================================================

A wrong shape, an unknown name or parameter, a missing feature, a non-finite number or a string
where a number belongs is refused with 422 naming the field (``body.observations.3.parameter``,
``body.image.0.27``) by the strict parser of :mod:`._intake`, after authentication and the policy.
"""
from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, create_model, model_validator

from insitu.errors import DataError
from insitu.federation.task import TaskSpec
from insitu.gateway._intake import BodyRefused

#: the largest magnitude a number in a prediction request may have
LIMIT = 1e6
Number = Annotated[float, Field(allow_inf_nan=False, ge=-LIMIT, le=LIMIT)]


class InputKind(str, enum.Enum):
    TABULAR = "tabular"
    PHYSIONET2012 = "physionet2012"
    IMAGE = "image"
    SEQUENCE = "sequence"


def _nested(shape: tuple[int, ...]) -> Any:
    """A list type of exactly ``shape`` numbers (outermost axis first)."""
    t: Any = Number
    for n in reversed(shape):
        t = Annotated[list[t], Field(min_length=n, max_length=n)]  # type: ignore[valid-type]
    return t


def _observation_model() -> type[BaseModel]:
    from insitu.data.physionet import SERIES_PARAMETERS

    parameter = enum.Enum("Parameter", {p: p for p in SERIES_PARAMETERS}, type=str)  # type: ignore[misc]

    class Observation(BaseModel):
        """One row of a PhysioNet 2012 record file: ``["HH:MM", parameter, value]`` (or an object with these names)."""

        model_config = ConfigDict(extra="forbid", json_schema_extra={
            "description": 'a row of the record file: ["HH:MM", PARAMETER, value], time 00:00 to 48:00'})

        time: Annotated[str, StringConstraints(pattern=r"^(?:(?:[0-3]\d|4[0-7]):[0-5]\d|48:00)$")]
        parameter: parameter  # type: ignore[valid-type]
        value: Number

        @model_validator(mode="before")
        @classmethod
        def _row(cls, v: Any) -> Any:
            if isinstance(v, (list, tuple)):
                if len(v) != 3:
                    raise ValueError(f'an observation is ["HH:MM", parameter, value]; got {len(v)} element(s)')
                return {"time": v[0], "parameter": v[1], "value": v[2]}
            return v

    return Observation


@dataclass(frozen=True)
class InputSchema:
    """The input a served model takes, and the request body that carries it."""

    kind: InputKind
    shape: tuple[int, ...]
    features: tuple[str, ...]

    @classmethod
    def of(cls, spec: TaskSpec) -> "InputSchema":
        shape, schema = tuple(spec.input_shape), tuple(spec.schema)
        if len(shape) == 1:
            if shape[0] != len(schema):
                raise DataError(f"tabular task with input shape {shape} but {len(schema)} feature names")
            return cls(InputKind.TABULAR, shape, schema)
        if len(shape) == 2:
            from insitu.data.physionet import schema as physionet_schema

            if schema == physionet_schema() and shape[1] == len(schema):
                return cls(InputKind.PHYSIONET2012, shape, schema)
            return cls(InputKind.SEQUENCE, shape, schema)
        if len(shape) == 3:
            return cls(InputKind.IMAGE, shape, schema)
        raise DataError(f"no request form for inputs of shape {shape}")

    def request_model(self) -> type[BaseModel]:
        strict = ConfigDict(extra="forbid")
        if self.kind is InputKind.TABULAR:
            feats = create_model("Features", __config__=strict, **{n: (Number, ...) for n in self.features})
            return create_model("PredictRequest", __config__=strict, features=(feats, ...))
        if self.kind is InputKind.PHYSIONET2012:
            rows = Annotated[list[_observation_model()], Field(min_length=1, max_length=5000)]  # type: ignore[misc]
            return create_model("PredictRequest", __config__=strict, observations=(rows, ...))
        key = "image" if self.kind is InputKind.IMAGE else "sequence"
        return create_model("PredictRequest", __config__=strict, **{key: (_nested(self.shape), ...)})

    def tensor(self, body: BaseModel) -> tuple[np.ndarray, dict[str, int]]:
        """The model input of a validated body, and what was dropped from it (out-of-range values per parameter)."""
        if self.kind is InputKind.TABULAR:
            values = body.features.model_dump()  # type: ignore[attr-defined]
            return np.array([values[f] for f in self.features], dtype=np.float32), {}
        if self.kind is InputKind.PHYSIONET2012:
            from insitu.data.physionet import featurize_series

            obs = body.observations  # type: ignore[attr-defined]
            rows = [(o.time, o.parameter.value, o.value) for o in obs]
            try:
                return featurize_series(rows, bins=self.shape[0], source="observations")
            except DataError as exc:
                m = re.search(r"line (\d+)", str(exc))
                where = f"body.observations.{int(m.group(1)) - 3}" if m and int(m.group(1)) >= 3 else "body.observations"
                reason = re.sub(r"^observations( line \d+)?: ", "", str(exc)).replace("record 0 ", "the series ")
                raise BodyRefused(422, where, reason) from None
        key = "image" if self.kind is InputKind.IMAGE else "sequence"
        return np.asarray(getattr(body, key), dtype=np.float32).reshape(self.shape), {}


__all__ = ["InputKind", "InputSchema"]
