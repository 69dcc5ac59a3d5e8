"""How updates travel from sites to the coordinator's sum: the aggregation protocol.

Every protocol computes the same thing, the weighted sum ``Σ wᵢ·uᵢ`` and ``Σ wᵢ``
over the sites that completed the round; they differ in what the coordinator
may see on the way.  A protocol has two halves:

* coordinator half, :meth:`AggregationProtocol.collect`: runs the round's
  exchanges (at least the TRAIN exchange) through a :class:`Transport` and
  returns an :class:`AggregateResult`;
* site half, :class:`SiteProtection`: turns the site's weighted, clipped,
  noised, encoded vector into what leaves the site, and answers the
  protocol's extra phases (key agreement, unmasking, decryption).

The plain protocol below sends ``wᵢ·uᵢ`` in the clear: fine for a simulation,
and what secure aggregation and homomorphic encryption replace.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol

import numpy as np

from insitu.errors import ProtocolError
from insitu.federation.instructions import RoundInstructions
from insitu.federation.messages import Message, MessageKind
from insitu.federation.transport import Transport, check_reply, finite_vector, reply_metrics


@dataclass(frozen=True)
class RoundPlan:
    """Everything the coordinator decided for one round before asking any site."""

    job: str
    round: int
    sites: tuple[str, ...]
    size: int  # length of the update vector every site returns
    timeout: float
    min_sites: int
    plan: Mapping[str, Any]  # the approved plan's to_meta(); sites check its hash
    instructions: RoundInstructions
    train_tensors: Mapping[str, np.ndarray]

    def train_request(self, site: str, extra_meta: Mapping[str, Any] | None = None) -> Message:
        """The TRAIN message for ``site``: the plan, the typed instructions and the protocol's own field."""
        meta: dict[str, Any] = {"plan": self.plan, "instructions": self.instructions.to_meta()}
        for k, v in (extra_meta or {}).items():
            if k in meta:
                raise ProtocolError(f"protocol field {k!r} would overwrite the plan or the instructions")
            meta[k] = v
        return Message(MessageKind.TRAIN, self.round, self.job, meta, dict(self.train_tensors))


@dataclass(frozen=True)
class AggregateResult:
    total: np.ndarray  # float64: Σ wᵢ·uᵢ over participants (plus any noise the protocol adds)
    weight: float  # Σ wᵢ over participants
    participants: tuple[str, ...]
    dropped: Mapping[str, str]
    site_metrics: Mapping[str, Mapping[str, Any]]
    bytes_up: Mapping[str, int] = field(default_factory=dict)  # site → coordinator
    bytes_down: Mapping[str, int] = field(default_factory=dict)  # coordinator → site
    #: sites whose own update was refused (malformed, non-finite, or outside the plan's bounds): a
    #: deployed job counts these rounds toward the site's exclusion like rounds it made abort
    culprits: tuple[str, ...] = ()

    @property
    def mean(self) -> np.ndarray:
        return self.total / self.weight


class SiteProtection(Protocol):
    """The site half of a protocol: the last step before an update leaves the site."""

    def protect(self, request: Message, weighted: np.ndarray, weight: float) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """Meta and tensors of the TRAIN_REPLY carrying ``weighted`` (= wᵢ·uᵢ) and ``weight``."""
        ...

    def handlers(self) -> Mapping[MessageKind, Callable[[Message], Message]]:
        """Extra message kinds this protocol's site half answers."""
        ...


class TimedHandlers:
    """Mixin for a protocol's site half: ``seconds`` accumulates the time its handlers take (benchmarks)."""

    seconds: float = 0.0

    def _timed(self, fn: Callable[[Message], Message]) -> Callable[[Message], Message]:
        def run(msg: Message) -> Message:
            t0 = time.perf_counter()
            try:
                return fn(msg)
            finally:
                self.seconds += time.perf_counter() - t0

        return run


class AggregationProtocol(Protocol):
    name: str

    def collect(self, plan: RoundPlan, transport: Transport) -> AggregateResult: ...

    def site_protection(self, site_id: str) -> SiteProtection: ...


def train_replies(plan: RoundPlan, transport: Transport, sites: tuple[str, ...] | None = None, extra: Mapping[str, Mapping[str, Any]] | None = None):
    """Run the TRAIN exchange; returns (exchange, valid replies, dropped incl. malformed replies)."""
    sites = plan.sites if sites is None else sites
    extra = extra or {}
    ex = transport.exchange({s: plan.train_request(s, extra.get(s)) for s in sites}, plan.timeout)
    ok: dict[str, Message] = {}
    dropped = dict(ex.dropped)
    for sid, rep in ex.replies.items():
        try:
            check_reply(rep, MessageKind.TRAIN_REPLY, plan.round, plan.job)
            ok[sid] = rep
        except ProtocolError as exc:
            dropped[sid] = f"bad reply: {exc}"
    return ex, ok, dropped


class PhaseRunner:
    """One exchange of a multi-phase protocol (key agreement, training, unmasking, decryption).

    Counts bytes both ways and network seconds, records drop-outs with the phase's label, and
    turns a reply nobody asked for, or one of another kind, job or round (a replay), into the
    protocol's abort.  ``up``, ``down`` and ``dropped`` accumulate over all phases of the round.
    """

    def __init__(self, plan: RoundPlan, transport: Transport, abort: Callable[[str, str], Exception]):
        self.plan, self.transport, self.abort = plan, transport, abort
        self.up: dict[str, int] = {}
        self.down: dict[str, int] = {}
        self.dropped: dict[str, str] = {}
        self.seconds = 0.0

    def __call__(self, requests: Mapping[str, Message], expect: MessageKind, label: str) -> dict[str, Message]:
        t0 = time.perf_counter()
        ex = self.transport.exchange(requests, self.plan.timeout)
        self.seconds += time.perf_counter() - t0
        for k, v in ex.bytes_received.items():
            self.up[k] = self.up.get(k, 0) + v
        for k, v in ex.bytes_sent.items():
            self.down[k] = self.down.get(k, 0) + v
        for sid, why in ex.dropped.items():
            self.dropped[sid] = f"{label}: {why}"
        plan = self.plan
        for sid, rep in ex.replies.items():
            if sid not in requests:
                raise self.abort(sid, f"answered {label} without being asked")
            if rep.kind is not expect or rep.round != plan.round or rep.job != plan.job:
                raise self.abort(sid, f"{label} reply is {rep.kind.value} for job {rep.job!r} round {rep.round}, "
                                      f"expected {expect.value} for round {plan.round} (replayed or misdirected message)")
        return dict(ex.replies)


class UpdateCodec(Protocol):
    """A wire format for the update a site sends in the clear (compression plugs in here)."""

    def encode(self, vec: np.ndarray, job: str, round_: int) -> tuple[dict[str, Any], dict[str, np.ndarray]]: ...


#: the inverse of an :class:`UpdateCodec`: (meta, tensors, size, job, round) → dense float64 vector
UpdateDecoder = Callable[[Mapping[str, Any], Mapping[str, np.ndarray], int, str, int], np.ndarray]


class DenseCodec:
    """The plain wire format: one float32 tensor ``update``."""

    def encode(self, vec: np.ndarray, job: str, round_: int) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        return {}, {"update": np.asarray(vec, dtype=np.float64).reshape(-1).astype(np.float32)}


def decode_dense(meta: Mapping[str, Any], tensors: Mapping[str, np.ndarray], size: int, job: str, round_: int) -> np.ndarray:
    """The dense update of a reply; a reply in any other encoding is refused."""
    if meta.get("encoding") not in (None, "dense_f32"):
        raise ProtocolError(f"update encoding {meta.get('encoding')!r} is not what this round's plan sends (dense float32)")
    arr = tensors.get("update")
    if arr is None or arr.dtype != np.dtype("<f4") or arr.shape != (size,):
        raise ProtocolError(f"update must be a float32 vector of {size} values, got {None if arr is None else (arr.dtype, arr.shape)}")
    return arr.astype(np.float64)


class PlainSiteProtection:
    """Sends wᵢ·uᵢ in the clear, in ``codec``'s wire format (dense float32 unless compressed)."""

    def __init__(self, codec: UpdateCodec | None = None):
        self.codec = codec or DenseCodec()

    def protect(self, request, weighted, weight):
        meta, tensors = self.codec.encode(weighted, request.job, request.round)
        return {"weight": float(weight), **meta}, tensors

    def handlers(self):
        return {}

    @staticmethod
    def egress() -> dict:
        """Under protection = plain the update leaves in the clear: public because the approved plan says so."""
        from insitu.federation.egress import Declared, Release

        pub = Release.PUBLIC
        return {MessageKind.TRAIN_REPLY: Declared({k: pub for k in ("weight", "encoding", "block", "k", "metrics")},
                                                  {k: pub for k in ("update", "q", "scale", "gaps", "values")})}


class PlainProtocol:
    """No protection: the coordinator sees each site's weighted update.

    ``decode`` reads the wire format sites encode their update in (dense float32 by default;
    :func:`insitu.compress.codec.decode_update` for compressed plans, chosen by the builder).
    ``screen`` bounds one site's influence (:mod:`insitu.federation.robust`: the weight rules, the
    size rule, the DP clip); the builder makes it from the plan, the defaults apply otherwise.
    """

    name = "plain"

    def __init__(self, decode: UpdateDecoder | None = None, codec: UpdateCodec | None = None, screen: Any = None):
        from insitu.federation.robust import UpdateScreen

        self.decode = decode or decode_dense
        self.codec = codec or DenseCodec()
        self.screen = screen if screen is not None else UpdateScreen()

    def collect(self, plan: RoundPlan, transport: Transport) -> AggregateResult:
        ex, replies, dropped = train_replies(plan, transport)
        sizes: dict[str, Any] = {}  # what the screen compares; the decoded vectors are not kept (memory stays one vector)
        weights: dict[str, float] = {}
        metrics: dict[str, Mapping[str, Any]] = {}
        culprits: list[str] = []
        for sid, rep in replies.items():
            try:
                vec = finite_vector(self._decode(plan, rep), plan.size, f"update from {sid}")
                w = self.screen.check_weight(sid, rep.require("weight", (int, float)))
                m = reply_metrics(rep)
            except ProtocolError as exc:
                dropped[sid] = f"bad update: {exc}"
                culprits.append(sid)
                continue
            sizes[sid], weights[sid], metrics[sid] = self.screen.measure(vec, w), w, m
        for sid, why in self.screen.judge(plan, sizes).items():
            dropped[sid] = f"refused update: {why}"
            culprits.append(sid)
            del metrics[sid]
        total = np.zeros(plan.size, dtype=np.float64)
        weight = 0.0
        for sid in metrics:  # in reply order, as before the screen existed (exact-equality tests); decoded again
            total += self._decode(plan, replies[sid])
            weight += weights[sid]
        return AggregateResult(total, weight, tuple(metrics), dropped, metrics, ex.bytes_received, ex.bytes_sent, tuple(sorted(culprits)))

    def _decode(self, plan: RoundPlan, rep: Message) -> np.ndarray:
        return self.decode(rep.meta, rep.tensors, plan.size, plan.job, plan.round)

    def site_protection(self, site_id: str) -> SiteProtection:
        return PlainSiteProtection(self.codec)
