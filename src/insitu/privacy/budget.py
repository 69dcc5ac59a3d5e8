"""A site's privacy budget and its ledger, persisted in SQLite.

The ledger holds one immutable record per round a site took part in: what was released
(the round's :class:`PrivacyEvent` s), the ε that round added, and the site's total ε after
it.  Totals are recomputed from the stored events by composition (never by adding per-round
ε's, which would over-count under PLD/RDP), so the ledger alone is enough to rebuild a site's
accountant after a restart.

"Check before you spend": :meth:`PrivacyLedger.charge` dry-runs the round against the budget
and refuses with :class:`BudgetExceeded` *before* anything is recorded or released; the site
calls it before it trains.  A charged round stays charged even if training then fails
(fail closed: the ledger never under-counts).

SQLite triggers reject UPDATE and DELETE on ledger rows: records are written once.  When an
audit log is attached (anything with ``append(action, subject, details)``, e.g.
:class:`insitu.audit.AuditLog`), every charge and budget change is also written there.
"""
from __future__ import annotations

import json
import math
import sqlite3
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol, Sequence

from insitu.errors import BudgetExceeded, ConfigError
from insitu.privacy.accounting import AccountantKind, PrivacyEvent, epsilon_of

SCHEMA = """
CREATE TABLE IF NOT EXISTS budgets (
    site TEXT PRIMARY KEY,
    epsilon REAL NOT NULL,
    delta REAL NOT NULL,
    accountant TEXT NOT NULL,
    set_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS ledger (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    site TEXT NOT NULL,
    job TEXT NOT NULL,
    round INTEGER NOT NULL,
    mechanism TEXT NOT NULL,
    events TEXT NOT NULL,
    epsilon_round REAL NOT NULL,
    epsilon_total REAL NOT NULL,
    delta REAL NOT NULL,
    accountant TEXT NOT NULL,
    recorded_at TEXT NOT NULL,
    UNIQUE (site, job, round)
);
CREATE TRIGGER IF NOT EXISTS ledger_no_update BEFORE UPDATE ON ledger
BEGIN SELECT RAISE(ABORT, 'privacy ledger records are immutable'); END;
CREATE TRIGGER IF NOT EXISTS ledger_no_delete BEFORE DELETE ON ledger
BEGIN SELECT RAISE(ABORT, 'privacy ledger records are immutable'); END;
"""


class AuditSink(Protocol):
    def append(self, action: Any, subject: str, details: Any = None) -> Any: ...


@dataclass(frozen=True)
class Budget:
    """A site's limit: total ε at ``delta`` over everything it ever releases."""

    epsilon: float
    delta: float = 1e-5
    accountant: AccountantKind = AccountantKind.PLD

    def __post_init__(self) -> None:
        if not (self.epsilon > 0 and math.isfinite(self.epsilon)):
            raise ConfigError(f"privacy budget ε must be a positive number, got {self.epsilon!r}")
        if not (0 < self.delta < 1):
            raise ConfigError(f"privacy budget δ must be in (0, 1), got {self.delta!r}")
        object.__setattr__(self, "accountant", AccountantKind(self.accountant))


@dataclass(frozen=True)
class LedgerRecord:
    seq: int
    site: str
    job: str
    round: int
    mechanism: str
    events: tuple[PrivacyEvent, ...]
    epsilon_round: float
    epsilon_total: float
    delta: float
    accountant: AccountantKind
    recorded_at: str

    def as_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "site": self.site, "job": self.job, "round": self.round, "mechanism": self.mechanism,
                "events": [e.to_dict() for e in self.events], "epsilon_round": self.epsilon_round,
                "epsilon_total": self.epsilon_total, "delta": self.delta, "accountant": self.accountant.value,
                "recorded_at": self.recorded_at}


@dataclass(frozen=True)
class Quote:
    """What a round would cost, computed without recording it."""

    site: str
    round: int
    epsilon_round: float
    epsilon_before: float
    epsilon_after: float
    budget: Budget

    @property
    def remaining(self) -> float:
        return max(0.0, self.budget.epsilon - self.epsilon_before)

    @property
    def allowed(self) -> bool:
        return self.epsilon_after <= self.budget.epsilon

    def refusal(self) -> str:
        return (f"site {self.site}: round {self.round} would spend ε={self.epsilon_round:.3g}; site budget has "
                f"{self.remaining:.3g} left (limit {self.budget.epsilon:g} at δ={self.budget.delta:g}, "
                f"spent {self.epsilon_before:.3g})")


def describe(events: Sequence[PrivacyEvent]) -> str:
    return " + ".join(e.describe() for e in events)


class PrivacyLedger:
    """Budgets and spends of one or more sites in one SQLite file (a deployed site keeps its own)."""

    def __init__(self, path: str | Path, *, audit: AuditSink | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # one connection, used from whichever thread serves the site; the lock serialises it
        self._db = sqlite3.connect(str(self.path), isolation_level=None, timeout=30, check_same_thread=False)
        self._lock = threading.RLock()
        with self._lock:
            self._db.executescript(SCHEMA)
        self.audit = audit

    def close(self) -> None:
        self._db.close()

    def export(self, path: str | Path) -> None:
        """Copy the whole ledger to a new SQLite file (SQLite's online backup)."""
        dest = sqlite3.connect(str(path))
        try:
            self._db.backup(dest)
        finally:
            dest.close()

    def __enter__(self) -> "PrivacyLedger":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- budgets -------------------------------------------------------------------------------
    def set_budget(self, site: str, budget: Budget) -> None:
        spent = self.spent(site, budget)
        if spent > budget.epsilon:
            raise ConfigError(f"site {site} has already spent ε={spent:.3g}; a limit of {budget.epsilon:g} is below that")
        with self._lock:
            self._db.execute(
                "INSERT INTO budgets(site, epsilon, delta, accountant, set_at) VALUES (?,?,?,?,?) "
                "ON CONFLICT(site) DO UPDATE SET epsilon=excluded.epsilon, delta=excluded.delta, "
                "accountant=excluded.accountant, set_at=excluded.set_at",
                (site, budget.epsilon, budget.delta, budget.accountant.value, _now()),
            )
        if self.audit is not None:
            from insitu.audit import AuditAction

            self.audit.append(AuditAction.BUDGET_CHANGE, site, {"epsilon": budget.epsilon, "delta": budget.delta, "accountant": budget.accountant.value})

    def has_budget(self, site: str) -> bool:
        """Whether a budget was ever set for ``site`` in this ledger."""
        try:
            self.budget(site)
        except ConfigError:
            return False
        return True

    def budget(self, site: str) -> Budget:
        with self._lock:
            row = self._db.execute("SELECT epsilon, delta, accountant FROM budgets WHERE site=?", (site,)).fetchone()
        if row is None:
            raise ConfigError(f"site {site} has no privacy budget; set one (ε limit and δ) before any DP round")
        return Budget(row[0], row[1], AccountantKind(row[2]))

    def sites(self) -> list[str]:
        with self._lock:
            rows = self._db.execute("SELECT site FROM budgets UNION SELECT site FROM ledger ORDER BY 1").fetchall()
        return [r[0] for r in rows]

    # -- records -------------------------------------------------------------------------------
    def records(self, site: str | None = None, job: str | None = None) -> list[LedgerRecord]:
        q, args = "SELECT seq, site, job, round, mechanism, events, epsilon_round, epsilon_total, delta, accountant, recorded_at FROM ledger", []
        where = []
        if site is not None:
            where.append("site=?")
            args.append(site)
        if job is not None:
            where.append("job=?")
            args.append(job)
        if where:
            q += " WHERE " + " AND ".join(where)
        out = []
        with self._lock:
            rows = self._db.execute(q + " ORDER BY seq", args).fetchall()
        for r in rows:
            events = tuple(PrivacyEvent.from_dict(e) for e in json.loads(r[5]))
            out.append(LedgerRecord(r[0], r[1], r[2], r[3], r[4], events, r[6], r[7], r[8], AccountantKind(r[9]), r[10]))
        return out

    def _events(self, site: str) -> list[PrivacyEvent]:
        return [e for rec in self.records(site) for e in rec.events]

    def spent(self, site: str, budget: Budget | None = None) -> float:
        """The site's total ε so far, composed from its stored events at its budget's δ."""
        budget = budget or self.budget(site)
        return epsilon_of(self._events(site), budget.delta, budget.accountant)

    # -- check before you spend ------------------------------------------------------------------
    def quote(self, site: str, round_: int, events: Sequence[PrivacyEvent]) -> Quote:
        if not events:
            raise ConfigError("a DP round must release at least one event")
        budget = self.budget(site)
        past = self._events(site)
        before = epsilon_of(past, budget.delta, budget.accountant)
        after = epsilon_of([*past, *events], budget.delta, budget.accountant)
        return Quote(site, round_, after - before, before, after, budget)

    def check(self, site: str, round_: int, events: Sequence[PrivacyEvent]) -> Quote:
        quote = self.quote(site, round_, events)
        if not quote.allowed:
            raise BudgetExceeded(quote.refusal())
        return quote

    def charge(self, site: str, job: str, round_: int, events: Sequence[PrivacyEvent]) -> LedgerRecord:
        """Check the round against the budget and record it, atomically; raises BudgetExceeded
        (recording nothing) if it would go past the limit."""
        events = tuple(events)
        with self._lock:
            return self._charge(site, job, round_, events)

    def _charge(self, site: str, job: str, round_: int, events: tuple[PrivacyEvent, ...]) -> LedgerRecord:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            quote = self.check(site, round_, events)
            if self._db.execute("SELECT 1 FROM ledger WHERE site=? AND job=? AND round=?", (site, job, round_)).fetchone():
                raise BudgetExceeded(f"site {site}: round {round_} of job {job} was already charged; a round is released once")
            now = _now()
            cur = self._db.execute(
                "INSERT INTO ledger(site, job, round, mechanism, events, epsilon_round, epsilon_total, delta, accountant, recorded_at) "
                "VALUES (?,?,?,?,?,?,?,?,?,?)",
                (site, job, round_, describe(events), json.dumps([e.to_dict() for e in events]), quote.epsilon_round,
                 quote.epsilon_after, quote.budget.delta, quote.budget.accountant.value, now),
            )
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        rec = LedgerRecord(int(cur.lastrowid), site, job, round_, describe(events), events, quote.epsilon_round,
                           quote.epsilon_after, quote.budget.delta, quote.budget.accountant, now)
        if self.audit is not None:
            from insitu.audit import AuditAction

            self.audit.append(AuditAction.EPSILON_SPEND, site, {k: v for k, v in rec.as_dict().items() if k != "site"})
        return rec


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


__all__ = ["Budget", "LedgerRecord", "Quote", "PrivacyLedger", "describe"]
