"""The coordinator half of the round engine, written once for every transport.

One round: broadcast the global model → sites train → collect (through the
aggregation protocol) → check enough sites finished → apply the strategy.  A
round that cannot complete raises :class:`RoundAborted` and leaves the global
model exactly as it was; the next round can run.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from insitu.errors import ConfigError, ProtocolError, RoundAborted
from insitu.federation.instructions import EvalInstructions, RoundInstructions, Split
from insitu.federation.messages import Message, MessageKind
from insitu.federation.protocol import AggregateResult, AggregationProtocol, PlainProtocol, RoundPlan
from insitu.federation.strategies import Strategy
from insitu.federation.transport import Transport, check_reply, reply_evaluation


@dataclass(frozen=True)
class RoundRecord:
    """What happened in one round; written once, never edited."""

    round: int
    participants: tuple[str, ...]
    dropped: Mapping[str, str]
    train: Mapping[str, Mapping[str, Any]]
    bytes_up: Mapping[str, int]
    bytes_down: Mapping[str, int]
    seconds: float
    update_norm: float


def _plus(counts: Mapping[str, int], evaluation: Mapping[str, int] | None) -> dict[str, int]:
    out = {s: int(v) for s, v in counts.items()}
    for s, v in (evaluation or {}).items():
        out[s] = out.get(s, 0) + int(v)
    return out


def round_bytes_down(rec: RoundRecord, evaluation: Mapping[str, int] | None = None) -> dict[str, int]:
    """Every byte the coordinator sent each site for one round: the round's requests (every phase of its
    protocol) plus, when the round was evaluated, the evaluation request (``Coordinator.eval_bytes_down``).
    ``insitu simulate`` and a deployed job (coordinator.service.with_traffic) report the same figure."""
    return _plus(rec.bytes_down, evaluation)


def round_bytes_up(rec: RoundRecord, evaluation: Mapping[str, int] | None = None) -> dict[str, int]:
    """Every byte each site sent the coordinator for one round: its replies to every phase of the round's
    protocol plus, when the round was evaluated, its evaluation answer (``Coordinator.eval_bytes_up``)."""
    return _plus(rec.bytes_up, evaluation)


@dataclass
class Coordinator:
    """Runs rounds of one plan over a transport; made by :func:`insitu.builder.build_coordinator`."""

    job: str
    plan: Any  # insitu.plan.Plan: its to_meta() goes to the sites, its lr_scale(round) shapes the instructions
    params: np.ndarray
    strategy: Strategy
    transport: Transport
    protocol: AggregationProtocol = field(default_factory=PlainProtocol)
    min_sites: int = 1
    timeout: float = 600.0
    sites: tuple[str, ...] | None = None
    #: sites left out of every later round (a deployed job excludes a site that keeps aborting rounds)
    excluded: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        self.params = np.asarray(self.params, dtype=np.float32)
        if self.min_sites < 1:
            raise ConfigError(f"--min-sites must be at least 1, got {self.min_sites}")
        self.rounds_done = 0
        self._plan_meta = self.plan.to_meta()
        #: sites left out of the last evaluation, and why (no answer, a refusal, a malformed reply)
        self.eval_dropped: dict[str, str] = {}
        #: bytes the last evaluation sent each site (reports add them to the round's bytes down)
        self.eval_bytes_down: dict[str, int] = {}
        self.eval_bytes_up: dict[str, int] = {}  # each site's answer to the last evaluation (a refusal's too)

    def _sites(self) -> tuple[str, ...]:
        sites = tuple(self.sites) if self.sites is not None else tuple(self.transport.sites())
        return tuple(s for s in sites if s not in self.excluded) if self.excluded else sites

    def round_plan(self, round_: int) -> RoundPlan:
        sites = self._sites()
        if len(sites) < self.min_sites:
            raise RoundAborted(f"round {round_}: only {len(sites)} site(s) connected, --min-sites is {self.min_sites}")
        tensors = {"params": self.params, **self.strategy.configure(round_, self.params)}
        instructions = RoundInstructions(lr_scale=float(self.plan.lr_scale(round_)), group=len(sites))
        size = self.strategy.update_size(self.params.shape[0])
        return RoundPlan(self.job, round_, sites, size, self.timeout, self.min_sites, self._plan_meta, instructions, tensors)

    def run_round(self, round_: int) -> RoundRecord:
        start = time.perf_counter()
        plan = self.round_plan(round_)
        result: AggregateResult = self.protocol.collect(plan, self.transport)
        if len(result.participants) < self.min_sites:
            why = "; ".join(f"{s}: {r}" for s, r in result.dropped.items()) or "none answered"
            raise RoundAborted(
                f"round {round_}: {len(result.participants)} of {len(plan.sites)} sites finished, "
                f"--min-sites is {self.min_sites} ({why}); the global model is unchanged"
            )
        if not (result.weight > 0) or not np.all(np.isfinite(result.total)):
            raise RoundAborted(f"round {round_}: aggregate is not finite (weight {result.weight}); the global model is unchanged")
        mean = result.mean
        fraction = len(result.participants) / max(1, len(plan.sites))
        new = self.strategy.apply(self.params, mean, fraction=fraction)
        if not np.all(np.isfinite(new)):
            raise RoundAborted(f"round {round_}: the strategy produced non-finite parameters from the aggregate of "
                               f"{sorted(result.participants)} (one of them sent values far outside any honest update); "
                               "the global model is unchanged")
        n = self.params.shape[0]
        self.params = new
        self.rounds_done = round_
        return RoundRecord(
            round=round_,
            participants=tuple(result.participants),
            dropped=dict(result.dropped),
            train={k: dict(v) for k, v in result.site_metrics.items()},
            bytes_up=dict(result.bytes_up),
            bytes_down=dict(result.bytes_down),
            seconds=time.perf_counter() - start,
            update_norm=float(np.linalg.norm(mean[:n])),
        )

    def evaluate(self, round_: int, params: np.ndarray | None = None, split: str = "test", *,
                 threshold: bool = False) -> dict[str, dict[str, Any]]:
        """Federated evaluation: each site scores the global model on its own test (or validation) split
        (``threshold``: validation only, each site also answers its own Score 1 threshold)."""
        params = self.params if params is None else np.asarray(params, dtype=np.float32)
        ins = EvalInstructions(split=Split(split), threshold=threshold)
        req = Message(MessageKind.EVALUATE, round_, self.job, {"plan": self._plan_meta, "instructions": ins.to_meta()}, {"params": params})
        self.eval_bytes_down, self.eval_bytes_up = {}, {}
        ex = self.transport.exchange({s: req for s in self._sites()}, self.timeout)
        self.eval_bytes_down, self.eval_bytes_up = dict(ex.bytes_sent), dict(ex.bytes_received)
        out: dict[str, dict[str, Any]] = {}
        dropped = dict(ex.dropped)
        for sid, rep in ex.replies.items():
            try:  # a malformed score leaves that site out of the evaluation, and says why
                check_reply(rep, MessageKind.EVALUATE_REPLY, round_, self.job)
                out[sid] = reply_evaluation(rep)
            except ProtocolError as exc:
                dropped[sid] = f"bad evaluate reply: {exc}"
        self.eval_dropped = dropped
        return out
