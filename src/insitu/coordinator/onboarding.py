"""Before a job's first round: wait until the sites approved its plan, instead of failing.

A job submitted before the hospitals' admins approved its plan used to burn its rounds in a
fraction of a second, every site refusing.  Now the coordinator first asks each site whether it
may run the plan (``task_check``: answered from the site's approvals and rules, nothing is
trained or charged; the site lists the plan for its admin at once) and repeats every
``interval`` seconds.  The job's status is ``waiting`` and names the sites it waits for and why.

The job starts as soon as at least ``min_sites`` sites approved and no connected site it asked
still answers "not approved" (sites that are not connected, and sites whose admin refused the
task on purpose, do not hold it back: rounds drop them, as they would anyway).  After ``approval_timeout`` seconds it starts if ``min_sites``
sites approved, and fails otherwise, naming the sites it waited for.  A site whose rules refuse
the plan whatever its admin approves (e.g. no DP under a privacy budget) is not waited for; its
rounds report the refusal as before.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from insitu.errors import RoundAborted
from insitu.federation.messages import Message, MessageKind
from insitu.plan import Plan

NOT_CONNECTED = "not connected"


@dataclass(frozen=True)
class ApprovalCheck:
    """One round of asking: who approved, who holds the job back and why, who cannot be asked."""

    approved: tuple[str, ...]
    waiting: Mapping[str, str]  # connected sites that answered "not approved", with their reason
    unreachable: Mapping[str, str] = field(default_factory=dict)  # not connected, no answer, or an error
    refusing: Mapping[str, str] = field(default_factory=dict)  # refused by the site's admin, or approved but a rule refuses the rounds

    def ready(self, min_sites: int) -> bool:
        return len(self.approved) >= min_sites and not self.waiting

    def public(self) -> dict[str, Any]:
        return {"approved": list(self.approved), "waiting": dict(self.waiting), "unreachable": dict(self.unreachable),
                "refusing": dict(self.refusing)}


def check_approvals(transport: Any, job: str, plan: Plan, sites: tuple[str, ...] | None, timeout: float = 10.0) -> ApprovalCheck:
    """Ask every wanted (or every connected) site whether it may run ``plan``."""
    connected = set(transport.sites())
    targets = sorted(sites) if sites else sorted(connected)
    meta = {"plan": plan.to_meta()}
    requests = {s: Message(MessageKind.TASK_CHECK, 0, job, meta) for s in targets if s in connected}
    unreachable = {s: NOT_CONNECTED for s in targets if s not in connected}
    ex = transport.exchange(requests, timeout) if requests else None
    approved, waiting, refusing = [], {}, {}
    if ex is not None:
        unreachable.update({s: f"no answer: {why}" for s, why in ex.dropped.items()})
        for s, reply in ex.replies.items():
            if reply.kind is not MessageKind.TASK_CHECK_REPLY:
                unreachable[s] = f"answered {reply.kind.value}"
            elif reply.meta.get("approved") is True:
                approved.append(s)
                if reply.meta.get("refusal"):
                    refusing[s] = str(reply.meta["refusal"])
            elif reply.meta.get("refused") is True:  # the site's admin refused the task: nothing to wait for
                refusing[s] = str(reply.meta.get("reason", "refused by the site's admin"))
            else:
                waiting[s] = str(reply.meta.get("reason", "not approved"))
    return ApprovalCheck(tuple(sorted(approved)), waiting, unreachable, refusing)


class ApprovalWait:
    """The wait of one job for its approvals, polled by the coordinator's scheduler.

    The scheduler polls every waiting job in turn, so a job whose sites have not approved yet does
    not hold up a later job whose sites have.  Only time spent polling counts against
    ``timeout`` (the gap between two polls is capped at ``2 * interval``): a job that waited
    behind a running job is not failed for that.
    """

    def __init__(self, job: str, plan: Plan, *, sites: tuple[str, ...] | None, min_sites: int, timeout: float,
                 interval: float = 2.0, clock: Callable[[], float] = time.monotonic):
        self.job, self.plan, self.sites, self.min_sites = job, plan, sites, min_sites
        self.timeout, self.interval, self._clock = timeout, interval, clock
        self.waited = 0.0
        self.since = time.time()
        self._last: float | None = None
        self.check: ApprovalCheck | None = None

    def due(self) -> bool:
        """Whether it is time to ask the sites again."""
        return self._last is None or self._clock() - self._last >= self.interval

    def poll(self, transport: Any) -> bool:
        """Ask once; True when the job may start.  Raises RoundAborted once the timeout is spent
        with fewer than ``min_sites`` approvals (with enough, it starts with those that approved)."""
        now = self._clock()
        if self._last is not None:
            self.waited += min(now - self._last, 2 * self.interval)
        self._last = now
        check = self.check = check_approvals(transport, self.job, self.plan, self.sites)
        if check.ready(self.min_sites):
            return True
        if self.waited < self.timeout:
            return False
        if len(check.approved) >= self.min_sites:
            return True  # go on with the sites that approved; the others drop out of rounds
        holding = {**check.waiting, **check.unreachable}
        who = "; ".join(f"{s}: {why}" for s, why in sorted(holding.items())) or "no site connected"
        raise RoundAborted(f"job {self.job}: waited {self.timeout:g} s for {self.min_sites} site(s) to approve plan "
                           f"{self.plan.content_hash()[:12]}, {len(check.approved)} did ({', '.join(check.approved) or 'none'}); "
                           f"waiting for {who}")


__all__ = ["ApprovalCheck", "ApprovalWait", "check_approvals"]
