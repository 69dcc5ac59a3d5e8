"""The site's answer to an onboarding check: may this plan run here?  Nothing is trained or charged.

A coordinator asks every site before a job's first round (:class:`MessageKind.TASK_CHECK`
carrying the plan).  The site answers from its admin's approvals and its own rules:

* ``approved = false`` with the reason when the task's content hash is not approved (or lies
  outside an approval's ranges or this site's limits); the task is listed in ``pending.json``
  at once, so the admin finds it in ``insitu site pending`` and the site console before any
  round was refused;
* ``approved = false, refused = true`` when the admin refused the task on purpose
  (``insitu site refuse``): the coordinator does not wait for this site;
* ``approved = true`` and ``refusal`` when the task is approved but a rule would still refuse
  its rounds (no DP under a privacy budget, a DP task without one): no approval can change
  that, so the coordinator does not wait for it;
* ``approved = true`` otherwise.

The answer reveals nothing the site's refusal of a round would not reveal.
"""
from __future__ import annotations

from typing import Any

from insitu.errors import ConfigError, PolicyViolation, ProtocolError, TaskNotApproved
from insitu.federation.egress import Declared, Egress, Release
from insitu.federation.messages import Message, MessageKind
from insitu.plan import Plan

#: what a check reply may carry, all public: the plan's hash, the decision and the reason a refused
#: round would carry anyway (checked like every other reply before it leaves, see insitu.federation.egress)
TASK_CHECK_EGRESS = Egress({MessageKind.TASK_CHECK_REPLY: Declared(
    {k: Release.PUBLIC for k in ("plan_hash", "approved", "refused", "reason", "refusal")})})


def answer_task_check(node: Any, msg: Message) -> Message:
    """Answer a TASK_CHECK for ``node`` (a :class:`~insitu.site.node.SiteNode`)."""
    return TASK_CHECK_EGRESS.check(_answer(node, msg))


def _answer(node: Any, msg: Message) -> Message:
    extra = sorted(set(msg.meta) - {"plan"})
    if extra or msg.tensors:
        raise ProtocolError(f"task_check for job {msg.job!r} carries undeclared field(s) {extra + sorted(msg.tensors)}; a site reads only the plan")
    try:
        plan = Plan.from_meta(msg.require("plan", dict))
    except ConfigError as exc:
        raise ProtocolError(f"task_check for job {msg.job!r}: {exc}") from None
    h = plan.content_hash()
    meta: dict[str, Any] = {"plan_hash": h}
    try:
        node.check_task(plan)  # approval, ranges, schema, then the site's DP rule
    except TaskNotApproved as exc:
        if h in node.approvals.refused():  # refused on purpose: do not wait for this site
            return Message(MessageKind.TASK_CHECK_REPLY, 0, msg.job, {**meta, "approved": False, "refused": True, "reason": str(exc)})
        node.approvals.remember_refused(plan, str(exc), count=False, job=msg.job)
        return Message(MessageKind.TASK_CHECK_REPLY, 0, msg.job, {**meta, "approved": False, "reason": str(exc)})
    except PolicyViolation as exc:  # approved, but a rule of this site refuses it whatever is approved
        meta["refusal"] = str(exc)
    return Message(MessageKind.TASK_CHECK_REPLY, 0, msg.job, {**meta, "approved": True})


__all__ = ["answer_task_check", "TASK_CHECK_EGRESS"]
