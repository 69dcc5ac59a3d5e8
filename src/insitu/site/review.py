"""What a site's data officer reviews: pending tasks (with the ε a round would cost), approvals,
refusals, the rounds the site trained and its privacy ledger.  Shared by ``insitu site pending``
and the site console (:mod:`insitu.site.console`); everything is read from the site's own state
directory and data, nothing from the coordinator."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from insitu.errors import ConfigError, ProtocolError
from insitu.plan import Plan
from insitu.site.policy import Approvals, SitePolicy


def privacy_cost(policy: SitePolicy, spec: Mapping[str, Any], n_train: list[int]) -> str:
    """What a pending plan would cost this site's privacy budget per round, by this site's own accountant
    (``n_train``: a one-element cache of this site's training-record count, filled on first need)."""
    from insitu.errors import InsituError
    from insitu.plan import Plan

    try:
        plan = Plan.from_meta(dict(spec))
    except InsituError as exc:
        return f"malformed: {exc}"[:80]
    dp = plan.dp
    if not dp.on:
        return "no DP" + (" (refused: this site has a budget)" if policy.epsilon_budget is not None else "")
    noise = f"σ={dp.noise_multiplier:g}" if dp.noise_multiplier is not None else f"target ε={dp.epsilon:g}"
    head = f"{dp.level.value}-level DP {noise}, clip {dp.clip:g}"
    if policy.epsilon_budget is None:
        return head + "; refused: no epsilon_budget here"
    from insitu.builder import dp_events
    from insitu.privacy import Budget, PrivacyLedger, epsilon_of
    from insitu.site.node import site_records

    if not n_train:
        n_train.append(site_records(policy)[0].n_train)
    events = dp_events(plan, n_train[0])[0]
    eps = epsilon_of(events, policy.delta)
    ledger = PrivacyLedger(Path(policy.state) / "privacy_ledger.sqlite")
    try:
        site = ledger.sites()[0] if ledger.sites() else None
        spent = ledger.spent(site, Budget(policy.epsilon_budget, policy.delta)) if site else 0.0
    finally:
        ledger.close()
    return f"{head}: first round ε={eps:.3g} (q={events[0].sampling_rate:.3g}); spent {spent:.3g} of {policy.epsilon_budget:g}"


def plan_fields(spec: Mapping[str, Any] | None) -> dict[str, Any]:
    """A plan's description flattened to ``task.lr``-style names, for a page or a table."""
    out: dict[str, Any] = {}

    def walk(d: Mapping[str, Any], prefix: str) -> None:
        for k, v in d.items():
            if isinstance(v, Mapping):
                walk(v, f"{prefix}{k}.")
            else:
                out[prefix + k] = v

    walk(spec or {}, "")
    return out


def plan_row(spec: Mapping[str, Any] | None) -> dict[str, str]:
    """The few fields of a plan an admin looks at first (``insitu site pending``)."""
    f = plan_fields(spec)
    dp = f.get("dp.level", "off")
    if dp != "off":
        dp += f" σ={f['dp.noise_multiplier']:g}" if isinstance(f.get("dp.noise_multiplier"), (int, float)) else \
            (f" ε={f['dp.epsilon']:g}" if isinstance(f.get("dp.epsilon"), (int, float)) else "")
    return {"model": _model(spec), "strategy": str(f.get("strategy.name", "?")), "lr": str(f.get("task.lr")),
            "local steps": str(f.get("task.local_steps")), "batch": str(f.get("task.batch_size")),
            "rounds": str(f.get("rounds")), "protection": str(f.get("protection.kind", "?")), "dp": dp}


def _model(spec: Mapping[str, Any] | None) -> str:
    """The model's name and size (``cnn, 56,129 parameters``); a specification reads ``spec, N parameters``
    (its layers are in ``--json`` and on the console)."""
    name = str(((spec or {}).get("task") or {}).get("model", "?"))
    try:
        return f"{name}, {Plan.from_meta(dict(spec or {})).task.param_count():,} parameters"
    except (ConfigError, ProtocolError, TypeError, ValueError):
        return name  # a malformed plan stays listed by its name, for the admin to see


def ledger_state(policy: SitePolicy) -> dict[str, Any]:
    """The site's privacy ledger: budget, ε spent so far, one row per DP round charged."""
    path = Path(policy.state) / "privacy_ledger.sqlite"
    if policy.epsilon_budget is None and not path.exists():
        return {"budget": None, "delta": policy.delta, "spent": 0.0, "records": []}
    from insitu.privacy import Budget, PrivacyLedger

    ledger = PrivacyLedger(path)
    try:
        sites = ledger.sites()
        site = sites[0] if sites else None
        budget = Budget(policy.epsilon_budget, policy.delta) if policy.epsilon_budget is not None else None
        spent = ledger.spent(site, budget) if site and budget else 0.0
        records = [r.as_dict() for r in ledger.records(site)] if site else []
    finally:
        ledger.close()
    return {"budget": policy.epsilon_budget, "delta": policy.delta, "spent": spent, "records": records}


def site_state(policy: SitePolicy, n_train: list[int], *, limit: int = 200) -> dict[str, Any]:
    """Everything the site console shows, newest first."""
    from insitu.site.journal import read_jsonl

    ap = Approvals(policy.state, policy.approved)
    pending = []
    for h, e in sorted(ap.waiting().items(), key=lambda kv: -kv[1].get("first_seen", 0)):
        pending.append({"hash": h, "id": h[:12], "job": e.get("job"), "spec": e.get("spec"), "fields": plan_fields(e.get("spec")),
                        "first_seen": e.get("first_seen"),
                        "rounds_refused": e.get("count", 0), "reason": e.get("last_reason", ""),
                        "privacy": privacy_cost(policy, e.get("spec") or {}, n_train)})
    approved = [{"hash": h, "ranges": e.get("ranges") or {}, "approved_at": e.get("approved_at"), "spec": e.get("spec")}
                for h, e in ap.entries().items()]
    refused = [{"hash": h, **e} for h, e in ap.refused().items()]
    state = Path(policy.state)
    from insitu.site.policy import HYPER_PARAMETERS

    return {
        "rangeable": list(HYPER_PARAMETERS),
        "pending": pending,
        "approved": sorted(approved, key=lambda e: -(e["approved_at"] or 0)),
        "refused_tasks": sorted(refused, key=lambda e: -(e.get("refused_at") or 0)),
        "rounds": list(reversed(read_jsonl(state / "rounds.jsonl", limit))),
        "refusals": list(reversed(read_jsonl(state / "refusals.jsonl", limit))),
        "ledger": ledger_state(policy),
        "policy": {"coordinator": f"{policy.coordinator[0]}:{policy.coordinator[1]}", "epsilon_budget": policy.epsilon_budget,
                   "delta": policy.delta, "min_secagg_group": policy.min_secagg_group,
                   "ranges": {k: [r.low, r.high] for k, r in policy.ranges.items()}, "source": policy.source.value},
    }


__all__ = ["privacy_cost", "ledger_state", "site_state", "plan_fields", "plan_row"]
