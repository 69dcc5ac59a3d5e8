"""The approved plan by reference: after a site has checked the whole plan once in a job, it is named by its hash.

Every TRAIN and EVALUATE request names the approved plan; a site runs a request only for the plan it
approved.  The plan's JSON is most of a small task's request (on heart, 687 of 957 bytes of a TRAIN),
so :class:`PlanRefTransport` (made by :func:`insitu.builder.build_coordinator`) sends it whole only
until the site has answered a request that carried it, and then only its content hash:

* ``meta["plan"]``: the whole plan (:meth:`insitu.plan.Plan.to_meta`); the site hashes it and compares
  with the hash it approved (and builds its job from it, when it has none);
* ``meta["plan_hash"]``: the plan's content hash (64 lower-case hex digits) instead.  The site accepts
  it only for a plan it holds *and* checked whole in a request of the same job
  (``insitu.federation.site.Site._check_plan``; a deployed site node refuses it first when it holds no plan of the job); anything else, including a request of a job it has
  no plan for (it is new, restarted or dropped the job), is refused with an
  :class:`~insitu.errors.UnknownPlanError` naming the hash (its class name is the refusal's code).

A request carries exactly one of the two.  The site's approval check is unchanged: it approved a hash,
and every round it checks the approval of the plan it holds, whose hash is the one named.

**Fallback.**  The coordinator sends the whole plan again to a site that did not answer its last
request (dropped, refused, timed out), whose connection count changed (it reconnected, perhaps
restarted), and at once, in the same exchange, to a site whose refusal has the code
``UnknownPlanError`` (the code, not the refusal's wording: a refusal for any other reason that happens
to contain the same words is not retried).  The
round is not lost.  Byte counts are those of every message sent (a refused request and its retry both
count).
"""
from __future__ import annotations

import time
from typing import Any, Mapping

from insitu.errors import ProtocolError, UnknownPlanError
from insitu.federation.messages import Message, MessageKind
from insitu.federation.task import canonical_hash
from insitu.federation.transport import Exchange, Transport

#: the meta key of the whole plan and of its hash
PLAN_KEY = "plan"
PLAN_REF_KEY = "plan_hash"
#: words every refusal of a plan hash the site does not hold contains (for the operator; the coordinator acts on
#: the refusal's code, :class:`~insitu.errors.UnknownPlanError`, never on these words)
UNKNOWN_PLAN = "does not hold plan"
#: requests that name the plan (their replies show the site checked it)
_ANSWERS = {MessageKind.TRAIN: MessageKind.TRAIN_REPLY, MessageKind.EVALUATE: MessageKind.EVALUATE_REPLY}
_HEX = frozenset("0123456789abcdef")


def parse_plan_ref(raw: Any) -> str:
    """A ``plan_hash`` field, checked: a SHA-256 content hash in 64 lower-case hex digits."""
    if not isinstance(raw, str) or len(raw) != 64 or not set(raw) <= _HEX:
        shown = raw if isinstance(raw, str) and len(raw) <= 80 else type(raw).__name__
        raise ProtocolError(f"plan_hash {shown!r} is not a plan content hash (64 lower-case hex digits)")
    return raw


def unknown_plan(site_id: str, plan_hash: str, job: str, why: str) -> UnknownPlanError:
    """The refusal of a request that names by hash a plan this site did not check whole in this job."""
    return UnknownPlanError(f"site {site_id} {UNKNOWN_PLAN} {plan_hash} for job {job!r} ({why}); the coordinator sends the whole plan instead")


def connection_epochs(transport: Any) -> dict[str, Any]:
    """Each site's connection count, from a network transport's ``site_status`` (empty in process):
    a site whose count changed has reconnected and may have restarted, holding nothing of the job."""
    status = getattr(transport, "site_status", None)
    if status is None:
        return {}
    return {row["site"]: row.get("connects") for row in status()}


def merge_retry(first: Exchange, again: Exchange, retried: list[str]) -> Exchange:
    """``first`` with the replies of ``retried`` sites replaced by ``again``'s; bytes of both counted."""
    replies = {k: v for k, v in first.replies.items() if k not in retried}
    replies.update(again.replies)
    dropped = {k: v for k, v in first.dropped.items() if k not in retried}
    dropped.update(again.dropped)
    refused = {k: v for k, v in first.refused.items() if k not in retried}
    refused.update(again.refused)
    sent = dict(first.bytes_sent)
    recv = dict(first.bytes_received)
    for k, v in again.bytes_sent.items():
        sent[k] = sent.get(k, 0) + v
    for k, v in again.bytes_received.items():
        recv[k] = recv.get(k, 0) + v
    return Exchange(replies, dropped, sent, recv, refused)


class PlanRefTransport:
    """Wraps the coordinator's transport: TRAIN and EVALUATE requests name the plan by its hash to every
    site that already answered a request carrying it in this job, over the same connection.

    ``known`` maps a site to ``(job, plan hash, connection count)`` of the plan it checked; ``plan_stats``
    counts requests sent with the whole plan, with its hash, and hashes refused and sent again whole.
    Everything else passes through (and attribute look-ups reach the wrapped transport)."""

    def __init__(self, inner: Transport):
        self.inner = inner
        self.known: dict[str, tuple[str, str, Any]] = {}
        self.plan_stats = {"full": 0, "hash": 0, "retried": 0}
        self._hash: tuple[Any, str] | None = None  # the last plan meta hashed, and its hash

    def sites(self) -> list[str]:
        return self.inner.sites()

    def __getattr__(self, name: str) -> Any:  # site_status, wait_for, a downlink's held/stats
        if name == "inner":  # not yet set (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)

    def _content_hash(self, plan: Any) -> str:
        if self._hash is None or self._hash[0] is not plan:  # one plan per job: hashed once, not per request
            self._hash = (plan, canonical_hash(plan))
        return self._hash[1]

    def exchange(self, requests: Mapping[str, Message], timeout: float) -> Exchange:
        epochs = connection_epochs(self.inner)
        sent: dict[str, Message] = {}
        named: dict[str, str] = {}  # site → hash of the plan its request names
        short: list[str] = []  # sites sent the hash only
        for sid, req in requests.items():
            plan = req.meta.get(PLAN_KEY) if req.kind in _ANSWERS else None
            if plan is None:
                sent[sid] = req
                continue
            h = named[sid] = self._content_hash(plan)
            if self.known.get(sid) == (req.job, h, epochs.get(sid)):
                meta = {(PLAN_REF_KEY if k == PLAN_KEY else k): (h if k == PLAN_KEY else v) for k, v in req.meta.items()}
                sent[sid] = Message(req.kind, req.round, req.job, meta, req.tensors)
                short.append(sid)
            else:
                sent[sid] = req
        t0 = time.monotonic()
        ex = self.inner.exchange(sent, timeout)
        retry = [s for s in short if ex.refused.get(s) == UnknownPlanError.__name__]
        if retry:  # the site does not hold the plan (restarted, or dropped the job): the whole plan, at once
            again = self.inner.exchange({s: requests[s] for s in retry}, max(1.0, timeout - (time.monotonic() - t0)))
            ex = merge_retry(ex, again, retry)
            self.plan_stats["retried"] += len(retry)
        for sid, h in named.items():
            self.plan_stats["hash" if sid in short and sid not in retry else "full"] += 1
            rep = ex.replies.get(sid)
            if rep is not None and rep.kind is _ANSWERS[requests[sid].kind]:
                self.known[sid] = (requests[sid].job, h, epochs.get(sid))
            else:
                self.known.pop(sid, None)  # whatever it holds now, it gets the whole plan next time
        return ex


__all__ = ["PLAN_KEY", "PLAN_REF_KEY", "UNKNOWN_PLAN", "PlanRefTransport", "parse_plan_ref", "unknown_plan", "connection_epochs",
           "merge_retry"]
