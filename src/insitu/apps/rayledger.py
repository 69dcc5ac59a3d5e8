"""Differential privacy on the Ray backend: each site's ledger where the site is, mirrored by the driver.

A DP site refuses or charges a round *itself*, before it trains: its budget guard and its ledger
live in the Ray worker that holds the site, built by the one builder exactly as in-process.  The
driver keeps the run's ledger (the one ``--privacy-ledger`` persists and the privacy report reads)
as a mirror of the sites' own:

* **seed** — before a worker builds its sites it gets each site's budget and every release the
  site already made (a persisted ledger, the moments release of ``--normalize federated``), and
  replays them into its own ledger, so the site's budget check starts from the driver's state;
* **news** — every batch of replies a worker sends back carries, beside the replies, what its
  sites charged or refused since its last batch (a charge made for a reply that came too late is
  carried by the next one).  The driver charges the same events to its ledger, in the order an
  in-process run would, and checks that its ε equals the one the site computed;
* **lost replies** — a TRAIN request whose worker died or did not answer in time is charged in
  the driver at once as if the site had trained (the most it could have spent; fail closed, as the
  ledger is: it never under-counts).  A worker that died is asked nothing more;
* **settle** — at the end the driver reads every live worker's ledger and checks it against its
  own: every charge a site made is in the driver's ledger with the same ε; charges the driver
  assumed for lost replies and no site confirmed are listed in the report.

What travels here is the simulator's own plumbing between processes of one machine or cluster,
never a site's egress: the sites' replies are exactly those the egress contract declares.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

from insitu.errors import BudgetExceeded, ConfigError, SecurityError
from insitu.federation.dp import BudgetGuard, DPReport
from insitu.privacy import Budget, LedgerRecord, PrivacyEvent, PrivacyLedger

log = logging.getLogger("insitu.ray")

#: two computations of the same composition agree to this (the accountant is deterministic; this only
#: absorbs a different floating-point summation order on another machine of a cluster)
TOLERANCE = 1e-9


@dataclass(frozen=True)
class SiteLedgerSeed:
    """One site's ledger as the driver holds it when the run starts: its budget and every release
    it already made (job, round, events), oldest first."""

    site: str
    budget: Budget
    past: tuple[tuple[str, int, tuple[PrivacyEvent, ...]], ...] = ()

    @classmethod
    def of(cls, ledger: PrivacyLedger, site: str) -> "SiteLedgerSeed":
        return cls(site, ledger.budget(site), tuple((r.job, r.round, r.events) for r in ledger.records(site)))


def worker_ledger(seeds: Iterable[SiteLedgerSeed]) -> PrivacyLedger:
    """The ledger of a worker's sites (in the worker's memory), starting from the driver's state:
    each budget set, each past release charged again in its order (which recomputes every total)."""
    ledger = PrivacyLedger(":memory:")
    for seed in seeds:
        ledger.set_budget(seed.site, seed.budget)
        for job, round_, events in seed.past:
            try:
                ledger.charge(seed.site, job, round_, events)
            except BudgetExceeded as exc:
                raise ConfigError(f"site {seed.site}: its past releases do not fit its budget when replayed in its Ray "
                                  f"worker ({exc})") from None
    return ledger


@dataclass(frozen=True)
class SiteCharge:
    """A round a site charged to its own ledger, in its worker."""

    site: str
    job: str
    round: int
    events: tuple[PrivacyEvent, ...]
    epsilon_round: float
    epsilon_total: float

    @classmethod
    def of(cls, rec: LedgerRecord) -> "SiteCharge":
        return cls(rec.site, rec.job, rec.round, tuple(rec.events), rec.epsilon_round, rec.epsilon_total)


@dataclass(frozen=True)
class SiteRefusal:
    """A round a site refused in its worker (past its budget, or too few noise shares announced)."""

    site: str
    round: int
    reason: str


class LedgerWatch:
    """Worker side: what a worker's DP sites charged and refused, reported once each (``news``), and the
    whole of this job's charges in the worker's ledger (``state``, read when the driver settles)."""

    def __init__(self, guards: Mapping[str, BudgetGuard], ledger: PrivacyLedger, job: str):
        self.guards, self.ledger, self.job = dict(guards), ledger, job
        self._told: set[tuple[str, str, int]] = set()
        # what the seeds replayed (earlier jobs, this run's preprocessing releases) is the driver's already
        self._seeded = max((r.seq for r in ledger.records()), default=0)

    def news(self) -> list[SiteCharge | SiteRefusal]:
        out: list[SiteCharge | SiteRefusal] = []
        for sid, guard in self.guards.items():
            for r, rec in sorted(guard.charged.items()):
                if ("charge", sid, r) not in self._told:
                    self._told.add(("charge", sid, r))
                    out.append(SiteCharge.of(rec))
            for r, why in sorted(guard.refused.items()):
                if ("refusal", sid, r) not in self._told:
                    self._told.add(("refusal", sid, r))
                    out.append(SiteRefusal(sid, r, why))
        return out

    def state(self) -> list[SiteCharge]:
        """Every charge this job's sites made here, read from the ledger itself (not the guards)."""
        return [SiteCharge.of(rec) for rec in self.ledger.records(job=self.job) if rec.site in self.guards and rec.seq > self._seeded]


@dataclass
class LedgerMirror:
    """Driver side: the run's ledger kept equal to the sites' own, and the budget guards the
    privacy report reads (their ``charged``/``refused`` filled from the sites' news).

    ``guards`` are made by :func:`insitu.builder.site_dp` from the plan and each site's record
    count, exactly as the site's own guard is; they never run in the driver."""

    ledger: PrivacyLedger
    job: str
    guards: dict[str, BudgetGuard]
    #: (site, round) → why a charge was assumed for a lost reply and not (yet) confirmed by the site
    assumed: dict[tuple[str, int], str] = field(default_factory=dict)

    @classmethod
    def of(cls, plan: Any, sites: Sequence[Any], ledger: PrivacyLedger | None, job: str) -> "LedgerMirror":
        from insitu.builder import site_dp

        guards = {sd.name: site_dp(plan, sd.name, sd.n_train, ledger, job) for sd in sites}
        return cls(ledger, job, guards)  # type: ignore[arg-type]  # site_dp refused a missing ledger

    def seed(self, site: str) -> SiteLedgerSeed:
        return SiteLedgerSeed.of(self.ledger, site)

    def apply(self, news: Iterable[SiteCharge | SiteRefusal]) -> None:
        """Record what the sites did, in the given order."""
        for item in news:
            guard = self._guard(item.site)
            if isinstance(item, SiteRefusal):
                if item.round in guard.charged:
                    log.warning("site %s refused round %d in its worker after the driver charged it for a lost reply; "
                                "the charge stays (the ledger never under-counts)", item.site, item.round)
                guard.refused[item.round] = item.reason
                continue
            if item.job != self.job:
                raise SecurityError(f"site {item.site} reports a charge for job {item.job!r} in run {self.job!r}")
            held = guard.charged.get(item.round)
            if held is not None:  # assumed for a lost reply (or reported again when settling)
                if tuple(held.events) != tuple(item.events):
                    raise SecurityError(f"site {item.site} round {item.round}: the site charged {item.events}, the driver "
                                        f"holds {held.events}")
                self._compare(item, held)
                if self.assumed.pop((item.site, item.round), None) is not None:
                    log.warning("site %s confirmed round %d, charged in the driver when its reply was lost", item.site, item.round)
                continue
            try:
                rec = self.ledger.charge(item.site, item.job, item.round, item.events)
            except BudgetExceeded as exc:
                raise SecurityError(f"site {item.site} spent round {item.round} in its Ray worker, but the driver's ledger "
                                    f"refuses to record it ({exc}); the driver's record would under-count, so the run stops") from None
            guard.charged[item.round] = rec
            self._compare(item, rec)

    def assume(self, site: str, round_: int, why: str) -> None:
        """A TRAIN request to ``site`` got no reply (its worker died or was late): charge what the round
        would have cost, unless the site's budget would have refused it too (same ledger state)."""
        guard = self._guard(site)
        if round_ in guard.charged or round_ in guard.refused:
            return
        try:
            rec = self.ledger.charge(site, self.job, round_, guard.events)
        except BudgetExceeded:
            return  # the site's own check (on the same state) refuses this round too
        guard.charged[round_] = rec
        self.assumed[(site, round_)] = why
        log.warning("site %s: no reply for round %d (%s); its ε for that round is charged in the driver (fail closed)",
                    site, round_, why)

    def settle(self, states: Mapping[str, list[SiteCharge] | None]) -> None:
        """Check the driver's ledger against each worker's (``states``: the charges of each site's worker,
        None where the worker is gone).  A charge the driver lacks is recorded; a driver charge no
        site made is an error unless it was assumed for a lost reply."""
        for sid in self.guards:
            state = states.get(sid)
            if state is None:
                continue  # the worker is gone: the driver keeps what it recorded, assumed charges included
            mine = [c for c in state if c.site == sid]
            self.apply(sorted(mine, key=lambda c: c.round))
            made = {c.round for c in mine}
            extra = sorted(r for r in self._guard(sid).charged if r not in made and (sid, r) not in self.assumed)
            if extra:
                raise SecurityError(f"the driver's ledger holds round(s) {extra} of site {sid} that the site never charged")

    def report(self, plan: Any, settle: Callable[[], None]) -> "MirroredDPReport":
        return MirroredDPReport(plan, self.guards, self.ledger, self.job, mirror=self, settle=settle)

    def _guard(self, site: str) -> BudgetGuard:
        guard = self.guards.get(site)
        if guard is None:
            raise SecurityError(f"a Ray worker reports privacy charges of {site!r}, which is not a site of this run")
        return guard

    def _compare(self, charge: SiteCharge, rec: LedgerRecord) -> None:
        if abs(rec.epsilon_total - charge.epsilon_total) <= TOLERANCE * max(1.0, abs(charge.epsilon_total)):
            return
        if rec.epsilon_total > charge.epsilon_total and any(s == charge.site for s, _ in self.assumed):
            return  # the driver counts a round it assumed for a lost reply: more, never less
        raise SecurityError(f"site {charge.site} round {charge.round}: the site's ledger says ε={charge.epsilon_total!r} in "
                            f"total, the driver's {rec.epsilon_total!r}")


class MirroredDPReport(DPReport):
    """The privacy report of a Ray run: settles the mirror with the workers' ledgers before it reads the
    driver's, and lists the charges assumed for lost replies (absent when there were none)."""

    def __init__(self, plan: Any, guards: Mapping[str, BudgetGuard], ledger: PrivacyLedger, run_id: str, *,
                 mirror: LedgerMirror, settle: Callable[[], None]):
        super().__init__(plan, guards, ledger, run_id)
        self.mirror, self._settle = mirror, settle

    def final(self, protocol: Any = None) -> dict[str, Any]:
        self._settle()
        out = super().final(protocol)
        if self.mirror.assumed:
            out["privacy"]["assumed_charges"] = [{"site": s, "round": r, "reason": why} for (s, r), why in sorted(self.mirror.assumed.items())]
        return out


__all__ = ["LedgerMirror", "LedgerWatch", "MirroredDPReport", "SiteCharge", "SiteLedgerSeed", "SiteRefusal", "worker_ledger"]
