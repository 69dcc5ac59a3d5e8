"""A minimal site for protocol tests: returns a fixed vector through a protection's protect()."""
from __future__ import annotations

from typing import Callable

import numpy as np
import pytest

from insitu.federation.messages import Message, MessageKind
from insitu.federation.instructions import RoundInstructions
from insitu.federation.protocol import RoundPlan
from insitu.federation.transport import InProcessTransport


class VecSite:
    """Answers TRAIN with protect(weight·vec, weight); other kinds go to the protection's handlers."""

    def __init__(self, site_id: str, protection, vec: np.ndarray, weight: float, tamper: Callable[[Message], Message] | None = None):
        self.site_id = site_id
        self.protection = protection
        self.vec = vec
        self.weight = weight
        self.handlers = dict(protection.handlers())
        self.tamper = tamper
        self.last: dict[MessageKind, Message] = {}

    def handle(self, msg: Message) -> Message:
        if msg.kind is MessageKind.TRAIN:
            meta, tensors = self.protection.protect(msg, self.weight * self.vec, self.weight)
            reply = Message(MessageKind.TRAIN_REPLY, msg.round, msg.job, meta, tensors)
        else:
            reply = self.handlers[msg.kind](msg)
        self.last[reply.kind] = reply
        return self.tamper(reply) if self.tamper else reply


def make_group(protocol, n: int, size: int, seed: int = 0, fail=None, tamper: dict | None = None):
    rng = np.random.default_rng(seed)
    ids = [f"site{i:02d}" for i in range(n)]
    vecs = {s: rng.normal(size=size) for s in ids}
    weights = {s: float(rng.integers(1, 50)) for s in ids}
    tamper = tamper or {}
    sites = {s: VecSite(s, protocol.site_protection(s), vecs[s], weights[s], tamper.get(s)) for s in ids}
    return sites, InProcessTransport(sites, fail=fail), vecs, weights


def plan(sites, size: int, round_: int = 1, job: str = "job") -> RoundPlan:
    return RoundPlan(job, round_, tuple(sorted(sites)), size, 60.0, 1, {}, RoundInstructions(group=len(sites)), {})


@pytest.fixture
def vec_group():
    return make_group
