"""The curious coordinator: everything that reaches it in a round, kept for the attacker.

The coordinator is honest (it runs the protocol as written) but curious: it keeps every reply a
site sent and the aggregate the protocol handed it, and then attacks them offline.  Wrapping the
real transport and protocol — rather than re-computing updates — means the attacker sees exactly
what the wire carried, masked or encrypted when secure aggregation or homomorphic encryption is
on, clipped and noised when DP is on.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from insitu.federation.coordinator import Coordinator
from insitu.federation.messages import Message, MessageKind
from insitu.federation.protocol import AggregateResult, AggregationProtocol, RoundPlan
from insitu.federation.transport import Exchange, Transport


@dataclass
class _RecordingTransport:
    inner: Transport
    replies: list[tuple[str, Message]] = field(default_factory=list)

    def sites(self) -> list[str]:
        return self.inner.sites()

    def exchange(self, requests, timeout) -> Exchange:
        ex = self.inner.exchange(requests, timeout)
        self.replies.extend(ex.replies.items())
        return ex


@dataclass
class _RecordingProtocol:
    inner: AggregationProtocol
    results: list[AggregateResult] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.inner.name

    def collect(self, plan: RoundPlan, transport: Transport) -> AggregateResult:
        res = self.inner.collect(plan, transport)
        self.results.append(res)
        return res

    def site_protection(self, site_id: str):
        return self.inner.site_protection(site_id)


@dataclass(frozen=True)
class ObservedRound:
    """One round as the coordinator saw it."""

    round: int
    protocol: str
    params: np.ndarray  # the global model the sites trained from (the coordinator sent it)
    train_replies: Mapping[str, Message]  # TRAIN_REPLY messages exactly as received
    aggregate: AggregateResult  # what the protocol gave the coordinator: Σ wᵢuᵢ and Σ wᵢ

    def candidate_views(self) -> dict[str, np.ndarray]:
        """Every vector the coordinator holds that could be an update: each reply's float tensors
        of the update's size (in the clear for the plain protocol, masked or ciphertext otherwise),
        and the aggregate ``Σ wᵢuᵢ``.  The attacker tries them all."""
        n = self.aggregate.total.shape[0]
        views: dict[str, np.ndarray] = {}
        for sid, msg in self.train_replies.items():
            for name, arr in msg.tensors.items():
                a = np.asarray(arr)
                if a.ndim == 1 and a.shape[0] >= n and np.issubdtype(a.dtype, np.number):
                    views[f"{sid}:{name}"] = a[:n].astype(np.float64)
        views["aggregate"] = np.asarray(self.aggregate.total, dtype=np.float64)
        return views


def observe_round(coord: Coordinator, round_: int) -> ObservedRound:
    """Run one round of ``coord`` and keep what reached the coordinator."""
    transport, protocol = coord.transport, coord.protocol
    rt, rp = _RecordingTransport(transport), _RecordingProtocol(protocol)
    params = coord.params.copy()
    coord.transport, coord.protocol = rt, rp
    try:
        coord.run_round(round_)
    finally:
        coord.transport, coord.protocol = transport, protocol
    train = {sid: m for sid, m in rt.replies if m.kind is MessageKind.TRAIN_REPLY}
    return ObservedRound(round_, protocol.name, params, train, rp.results[-1])
