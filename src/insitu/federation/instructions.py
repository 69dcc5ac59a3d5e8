"""What a coordinator may tell a site about one round, and nothing else.

The approved plan (:mod:`insitu.plan`) fixes everything that stays constant over a job: the
model, the site optimiser, FedProx's μ, the protection, the DP mechanism, the compression.  A
round adds only the few values below.  They travel as ``meta["instructions"]`` and a site parses
them strictly: a missing key, an unknown key or a value of the wrong type or range is refused,
naming the key, before anything is trained.  No instruction travels as a loose dict.

Tensors that belong to a round (the global parameters, Scaffold's server control) are checked
by shape and dtype where they are used (:meth:`insitu.federation.messages.Message.tensor`).
"""
from __future__ import annotations

import enum
import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

from insitu.errors import ProtocolError, parse_choice

#: the largest clip norm a coordinator may announce (adaptive clipping); beyond it C means nothing
MAX_CLIP = 1e4
#: the largest group a round may announce
MAX_GROUP = 1_000_000


class Split(str, enum.Enum):
    """Which of its own splits a site scores a model on."""

    TEST = "test"
    VAL = "val"


def _strict(cls: type, raw: Any, what: str) -> dict[str, Any]:
    if not isinstance(raw, Mapping):
        raise ProtocolError(f"{what} must be an object, got {type(raw).__name__}")
    names = [f.name for f in fields(cls)]
    unknown = sorted(set(raw) - set(names))
    if unknown:
        raise ProtocolError(f"{what} has unknown key(s) {unknown}; this site understands {names}")
    missing = [n for n in names if n not in raw]
    if missing:
        raise ProtocolError(f"{what} lacks key(s) {missing}")
    return dict(raw)


def _number(what: str, key: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ProtocolError(f"{what} {key} = {v!r} is not a finite number")
    return float(v)


def _count(what: str, key: str, v: Any, low: int, high: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
        raise ProtocolError(f"{what} {key} = {v!r} is not an integer in [{low}, {high}]")
    return v


@dataclass(frozen=True)
class RoundInstructions:
    """The per-round values of a TRAIN request.

    * ``lr_scale``: factor in (0, 1] on the approved site learning rate (a schedule may lower it,
      never raise it);
    * ``group``: how many sites were asked this round (a site checks it against the smallest
      group it lets its update be aggregated in);
    * ``dp_clip``: the clip norm of this round when the plan asks for adaptive site-level
      clipping, else None;
    * ``dp_min_shares``: the number of noise shares the coordinator will insist on when the plan
      places site-level noise at the sites, else None.
    """

    lr_scale: float = 1.0
    group: int = 1
    dp_clip: float | None = None
    dp_min_shares: int | None = None

    def __post_init__(self) -> None:
        what = "round instruction"
        s = _number(what, "lr_scale", self.lr_scale)
        if not 0.0 < s <= 1.0:
            raise ProtocolError(f"{what} lr_scale = {s!r} must be in (0, 1]: a coordinator may lower, never raise, the approved learning rate")
        object.__setattr__(self, "lr_scale", s)
        _count(what, "group", self.group, 1, MAX_GROUP)
        if self.dp_clip is not None:
            c = _number(what, "dp_clip", self.dp_clip)
            if not 0.0 < c <= MAX_CLIP:
                raise ProtocolError(f"{what} dp_clip = {c!r} is not in (0, {MAX_CLIP:g}]")
            object.__setattr__(self, "dp_clip", c)
        if self.dp_min_shares is not None:
            _count(what, "dp_min_shares", self.dp_min_shares, 1, MAX_GROUP)

    def to_meta(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_meta(cls, raw: Any) -> "RoundInstructions":
        return cls(**_strict(cls, raw, "round instructions"))


@dataclass(frozen=True)
class EvalInstructions:
    """An EVALUATE request's instructions: which split to score on, and (``threshold``, validation
    split only) whether the site also answers its own Score 1 threshold there, which a deployed
    ICU job asks once, for the model it publishes (insitu.learn.clinical.threshold_from_answers)."""

    split: Split = Split.TEST
    threshold: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "split", parse_choice(Split, self.split, "evaluation split", ProtocolError))
        if not isinstance(self.threshold, bool):
            raise ProtocolError(f"evaluation instructions threshold = {self.threshold!r} is not true or false")
        if self.threshold and self.split is not Split.VAL:
            raise ProtocolError("evaluation instructions ask for a threshold on the test split; a threshold is chosen on validation only")

    def to_meta(self) -> dict[str, Any]:
        # the key only when asked: every other evaluation request keeps its bytes
        return {"split": self.split.value, **({"threshold": True} if self.threshold else {})}

    @classmethod
    def from_meta(cls, raw: Any) -> "EvalInstructions":
        d = _strict(cls, {"threshold": False, **raw} if isinstance(raw, Mapping) else raw, "evaluation instructions")
        return cls(**d)


__all__ = ["RoundInstructions", "EvalInstructions", "Split", "MAX_CLIP"]
