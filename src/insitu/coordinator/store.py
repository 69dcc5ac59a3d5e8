"""The coordinator's memory: jobs, round attempts, model versions and who joined which round.

SQLite (WAL, one writer) so a coordinator that is killed and restarted picks
up where it stopped.  The rules that make a restart safe:

* a round number is *reserved* (``begin_round``) and committed before any
  site hears of it, so a restarted coordinator never re-sends a number a site
  may already have trained (sites refuse replays);
* applying a round is one transaction: the round's record, the sites that
  joined, the new model version and the job's counter change together or not
  at all; ``models`` has a unique (job, round) key, so a round cannot be
  applied twice even by a buggy caller;
* a round left ``started`` by a crash is marked ``interrupted`` on start-up
  and never applied.
"""
from __future__ import annotations

import enum
import hashlib
import io
import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from insitu.errors import ConfigError, ProtocolError

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, spec TEXT NOT NULL, task_hash TEXT NOT NULL, status TEXT NOT NULL,
    submitted_by TEXT NOT NULL, created REAL NOT NULL, rounds_target INTEGER NOT NULL,
    rounds_applied INTEGER NOT NULL DEFAULT 0, next_round INTEGER NOT NULL DEFAULT 1,
    final TEXT, error TEXT);
CREATE TABLE IF NOT EXISTS rounds (
    job TEXT NOT NULL, round INTEGER NOT NULL, status TEXT NOT NULL, started REAL NOT NULL, ended REAL,
    participants TEXT, dropped TEXT, metrics TEXT, evaluation TEXT, seconds REAL, reason TEXT,
    PRIMARY KEY (job, round));
CREATE TABLE IF NOT EXISTS round_sites (
    job TEXT NOT NULL, round INTEGER NOT NULL, site TEXT NOT NULL, joined INTEGER NOT NULL, reason TEXT,
    PRIMARY KEY (job, round, site));
CREATE TABLE IF NOT EXISTS models (
    job TEXT NOT NULL, version INTEGER NOT NULL, round INTEGER NOT NULL, params BLOB NOT NULL,
    state BLOB NOT NULL, sha256 TEXT NOT NULL, created REAL NOT NULL,
    PRIMARY KEY (job, version), UNIQUE (job, round));
CREATE TABLE IF NOT EXISTS job_log (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, job TEXT NOT NULL, at REAL NOT NULL, level TEXT NOT NULL, message TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS job_log_job ON job_log (job, seq);
"""
#: jobs being set up (pending = 1 until the round loop starts) and how many times in a row the
#: coordinator stopped during a job's setup: a job that kills the process is failed, not retried forever
SETUP_SCHEMA = """
CREATE TABLE IF NOT EXISTS job_setups (job TEXT PRIMARY KEY, pending INTEGER NOT NULL, crashes INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS round_blame (job TEXT NOT NULL, round INTEGER NOT NULL, site TEXT NOT NULL, PRIMARY KEY (job, round, site));
"""


class JobStatus(str, enum.Enum):
    QUEUED = "queued"
    WAITING = "waiting"  # for the sites to approve its task (insitu.coordinator.onboarding)
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


class RoundStatus(str, enum.Enum):
    STARTED = "started"
    APPLIED = "applied"
    ABORTED = "aborted"
    INTERRUPTED = "interrupted"  # the coordinator stopped mid-round; never applied


ACTIVE = (JobStatus.QUEUED.value, JobStatus.WAITING.value, JobStatus.RUNNING.value)


@dataclass(frozen=True)
class JobRow:
    id: str
    spec: dict[str, Any]
    task_hash: str
    status: JobStatus
    submitted_by: str
    created: float
    rounds_target: int
    rounds_applied: int
    next_round: int
    final: dict[str, Any] | None
    error: str | None

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id, "status": self.status.value, "task_hash": self.task_hash, "submitted_by": self.submitted_by,
            "created": self.created, "rounds_target": self.rounds_target, "rounds_applied": self.rounds_applied,
            "next_round": self.next_round, "final": self.final, "error": self.error,
        }


def pack_arrays(arrays: Mapping[str, np.ndarray | None]) -> bytes:
    """Numeric arrays as an .npz blob (loaded back with ``allow_pickle=False``)."""
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items() if v is not None})
    return buf.getvalue()


def unpack_arrays(blob: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(blob), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


class JobStore:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        self._db.executescript(SETUP_SCHEMA)
        self._lock = threading.RLock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _tx(self):
        return _Tx(self._db, self._lock)

    # -- jobs ----------------------------------------------------------------------------------
    def add_job(self, job_id: str, spec: Mapping[str, Any], task_hash: str, rounds: int, by: str) -> JobRow:
        with self._tx() as db:
            old = db.execute("SELECT status, next_round FROM jobs WHERE id=?", (job_id,)).fetchone()
            first_round = 1
            if old is not None:
                if old[0] in ACTIVE:
                    raise ConfigError(f"a job named {job_id!r} is {old[0]}; choose another name, or cancel it first")
                first_round = old[1]  # round numbers go on, so sites never see a number of this name twice
                _archive(db, job_id)
            db.execute(
                "INSERT INTO jobs (id, spec, task_hash, status, submitted_by, created, rounds_target, next_round) VALUES (?,?,?,?,?,?,?,?)",
                (job_id, json.dumps(dict(spec)), task_hash, JobStatus.QUEUED.value, by, time.time(), rounds, first_round),
            )
        return self.job(job_id)

    def job(self, job_id: str) -> JobRow:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        if row is None:
            raise ConfigError(f"no job named {job_id!r}; `insitu job list` shows the jobs")
        return _job(row)

    def jobs(self) -> list[JobRow]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM jobs ORDER BY created").fetchall()
        return [_job(r) for r in rows]

    def active_jobs(self) -> list[JobRow]:
        """Queued, waiting and running jobs, oldest first."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT * FROM jobs WHERE status IN ({','.join('?' * len(ACTIVE))}) ORDER BY created", ACTIVE
            ).fetchall()
        return [_job(r) for r in rows]

    def next_active(self) -> JobRow | None:
        with self._lock:
            row = self._db.execute(
                f"SELECT * FROM jobs WHERE status IN ({','.join('?' * len(ACTIVE))}) ORDER BY created LIMIT 1", ACTIVE
            ).fetchone()
        return _job(row) if row else None

    def set_status(self, job_id: str, status: JobStatus, *, error: str | None = None, final: Mapping[str, Any] | None = None) -> None:
        """Move a job to ``status``; to waiting or running only from an active status, so a cancel
        that lands while the job is being set up or waits for approvals is never overwritten."""
        only_active = status.value in ACTIVE
        with self._tx() as db:
            db.execute(
                "UPDATE jobs SET status=?, error=COALESCE(?, error), final=COALESCE(?, final) WHERE id=?"
                + (f" AND status IN ({','.join('?' * len(ACTIVE))})" if only_active else ""),
                (status.value, error, json.dumps(dict(final)) if final is not None else None, job_id, *(ACTIVE if only_active else ())),
            )

    def cancel(self, job_id: str) -> JobRow:
        job = self.job(job_id)
        if job.status.value not in ACTIVE:
            raise ConfigError(f"job {job_id!r} is {job.status.value}; only queued, waiting or running jobs can be cancelled")
        self.set_status(job_id, JobStatus.CANCELLED)
        return self.job(job_id)

    # -- rounds --------------------------------------------------------------------------------
    def recover(self) -> int:
        """Mark rounds left 'started' by a crash as interrupted; returns how many."""
        with self._tx() as db:
            cur = db.execute(
                "UPDATE rounds SET status=?, ended=?, reason=? WHERE status=?",
                (RoundStatus.INTERRUPTED.value, time.time(), "coordinator stopped during the round; not applied", RoundStatus.STARTED.value),
            )
            return cur.rowcount

    def begin_setup(self, job_id: str) -> None:
        """Mark ``job_id`` as being set up; :meth:`end_setup` clears it once its round loop starts (or setup fails)."""
        with self._tx() as db:
            db.execute("INSERT INTO job_setups (job, pending) VALUES (?, 1) ON CONFLICT(job) DO UPDATE SET pending=1", (job_id,))

    def end_setup(self, job_id: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE job_setups SET pending=0, crashes=0 WHERE job=?", (job_id,))

    def recover_setups(self, limit: int) -> dict[str, str]:
        """At start-up: count a crash for every job whose setup the last run did not finish, and mark
        failed those with ``limit`` crashes in a row (returned with the reason stored for the operator)."""
        failed: dict[str, str] = {}
        with self._tx() as db:
            db.execute("UPDATE job_setups SET pending=0, crashes=crashes+1 WHERE pending=1")
            rows = db.execute("SELECT s.job, s.crashes FROM job_setups s JOIN jobs j ON j.id = s.job "
                              f"WHERE s.crashes >= ? AND j.status IN ({','.join('?' * len(ACTIVE))})", (limit, *ACTIVE)).fetchall()
            for job_id, crashes in rows:
                why = (f"the coordinator stopped {crashes} times in a row while setting this job up (out of memory or a crash "
                       "in a library); it was not retried again. Check the job's model and [task] shape, then submit it anew")
                db.execute("UPDATE jobs SET status=?, error=? WHERE id=?", (JobStatus.FAILED.value, why, job_id))
                failed[job_id] = why
        return failed

    def begin_round(self, job_id: str) -> int:
        """Reserve the job's next round number (committed before any site hears of it)."""
        with self._tx() as db:
            (r,) = db.execute("SELECT next_round FROM jobs WHERE id=?", (job_id,)).fetchone()
            db.execute("INSERT INTO rounds (job, round, status, started) VALUES (?,?,?,?)", (job_id, r, RoundStatus.STARTED.value, time.time()))
            db.execute("UPDATE jobs SET next_round=? WHERE id=?", (r + 1, job_id))
        return r

    def apply_round(
        self, job_id: str, round_: int, *, expected_version: int, params: np.ndarray, state: Mapping[str, np.ndarray | None],
        participants: tuple[str, ...], dropped: Mapping[str, str], metrics: Mapping[str, Any], evaluation: Mapping[str, Any] | None, seconds: float,
        culprits: tuple[str, ...] = (),
    ) -> int:
        """Record round ``round_`` as applied and store the model it produced; one transaction.
        ``culprits``: sites whose update the round refused (they count toward ``exclude_after``)."""
        blob = pack_arrays({"params": params})
        with self._tx() as db:
            (applied,) = db.execute("SELECT rounds_applied FROM jobs WHERE id=?", (job_id,)).fetchone()
            if applied != expected_version:
                raise ProtocolError(f"job {job_id}: model version is {applied}, expected {expected_version}; refusing to apply round {round_}")
            (rstatus,) = db.execute("SELECT status FROM rounds WHERE job=? AND round=?", (job_id, round_)).fetchone()
            if rstatus != RoundStatus.STARTED.value:
                raise ProtocolError(f"job {job_id}: round {round_} is {rstatus}; it cannot be applied")
            db.execute(
                "UPDATE rounds SET status=?, ended=?, participants=?, dropped=?, metrics=?, evaluation=?, seconds=? WHERE job=? AND round=?",
                (RoundStatus.APPLIED.value, time.time(), json.dumps(list(participants)), json.dumps(dict(dropped)),
                 json.dumps(metrics, default=float), json.dumps(evaluation, default=float) if evaluation is not None else None, seconds, job_id, round_),
            )
            for s in participants:
                db.execute("INSERT INTO round_sites VALUES (?,?,?,1,NULL)", (job_id, round_, s))
            for s, why in dropped.items():
                db.execute("INSERT OR REPLACE INTO round_sites VALUES (?,?,?,0,?)", (job_id, round_, s, why))
            for s in culprits:
                db.execute("INSERT OR IGNORE INTO round_blame VALUES (?,?,?)", (job_id, round_, s))
            db.execute(
                "INSERT INTO models VALUES (?,?,?,?,?,?,?)",
                (job_id, applied + 1, round_, blob, pack_arrays(state), hashlib.sha256(blob).hexdigest(), time.time()),
            )
            db.execute("UPDATE jobs SET rounds_applied=? WHERE id=?", (applied + 1, job_id))
        return applied + 1

    def abort_round(self, job_id: str, round_: int, reason: str, dropped: Mapping[str, str], culprits: tuple[str, ...] = ()) -> None:
        """Record round ``round_`` as aborted; ``culprits`` are the sites whose own messages made it fail."""
        with self._tx() as db:
            cur = db.execute(
                "UPDATE rounds SET status=?, ended=?, reason=?, dropped=? WHERE job=? AND round=? AND status=?",
                (RoundStatus.ABORTED.value, time.time(), reason, json.dumps(dict(dropped)), job_id, round_, RoundStatus.STARTED.value),
            )
            if cur.rowcount:
                for s in culprits:
                    db.execute("INSERT OR IGNORE INTO round_blame VALUES (?,?,?)", (job_id, round_, s))
            for s, why in dropped.items():
                db.execute("INSERT OR REPLACE INTO round_sites VALUES (?,?,?,0,?)", (job_id, round_, s, why))

    def blame(self, job_id: str) -> dict[str, list[int]]:
        """Each site named as the cause of an aborted round of the job, or whose update a round refused, with those rounds."""
        with self._lock:
            rows = self._db.execute("SELECT site, round FROM round_blame WHERE job=? ORDER BY round", (job_id,)).fetchall()
        out: dict[str, list[int]] = {}
        for site, r in rows:
            out.setdefault(site, []).append(r)
        return out

    def rounds(self, job_id: str) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT round, status, participants, dropped, evaluation, seconds, reason, metrics, started, ended FROM rounds WHERE job=? ORDER BY round", (job_id,)
            ).fetchall()
        out = []
        for r, status, parts, dropped, ev, secs, reason, metrics, started, ended in rows:
            m = json.loads(metrics) if metrics else {}
            # ε each site says it has spent in total after this round (its own ledger; DP jobs only)
            eps = {s: v["epsilon_total"] for s, v in m.items() if isinstance(v, dict) and isinstance(v.get("epsilon_total"), (int, float))}
            out.append({
                "round": r, "status": status, "participants": json.loads(parts) if parts else [],
                "dropped": json.loads(dropped) if dropped else {}, "evaluation": json.loads(ev) if ev else None,
                "seconds": secs, "reason": reason, **({"epsilon": eps} if eps else {}),
                "started": started, "ended": ended,
                # each site's own training loss, as it reported it (a public metric of the round)
                "train_loss": {s: v["train_loss"] for s, v in m.items() if isinstance(v, dict) and isinstance(v.get("train_loss"), (int, float))},
                # bytes the coordinator sent each site (the model, dense or delta) and received from it in this round
                **{k: {s: v[k] for s, v in m.items() if isinstance(v, dict) and isinstance(v.get(k), int)} for k in ("bytes_up", "bytes_down")},
            })
        return out

    # -- the job's log (what the coordinator logged about it; `insitu job logs`) -----------------
    def log_event(self, job_id: str, level: str, message: str, at: float | None = None) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO job_log (job, at, level, message) VALUES (?,?,?,?)", (job_id, at or time.time(), level, message))

    def events(self, job_id: str, after: int = 0, limit: int = 10000) -> list[dict[str, Any]]:
        """The job's log lines with sequence number > ``after`` (oldest first)."""
        with self._lock:
            rows = self._db.execute("SELECT seq, at, level, message FROM job_log WHERE job=? AND seq>? ORDER BY seq LIMIT ?",
                                    (job_id, after, limit)).fetchall()
        return [{"seq": q, "at": a, "level": lv, "message": m} for q, a, lv, m in rows]

    def latest_model(self, job_id: str) -> tuple[int, int, np.ndarray, dict[str, np.ndarray]] | None:
        """(version, round, params, strategy state) of the newest model, or None before round one."""
        with self._lock:
            row = self._db.execute(
                "SELECT version, round, params, state, sha256 FROM models WHERE job=? ORDER BY version DESC LIMIT 1", (job_id,)
            ).fetchone()
        return self._model_row(job_id, row)

    def model(self, job_id: str, version: int) -> tuple[int, int, np.ndarray, dict[str, np.ndarray]]:
        """(version, round, params, strategy state) of one stored model version."""
        with self._lock:
            row = self._db.execute("SELECT version, round, params, state, sha256 FROM models WHERE job=? AND version=?",
                                   (job_id, version)).fetchone()
        if row is None:
            raise ConfigError(f"job {job_id!r} has no model version {version}")
        return self._model_row(job_id, row)

    @staticmethod
    def _model_row(job_id: str, row: Any) -> tuple[int, int, np.ndarray, dict[str, np.ndarray]] | None:
        if row is None:
            return None
        version, round_, blob, state, digest = row
        if hashlib.sha256(blob).hexdigest() != digest:
            raise ProtocolError(f"job {job_id}: stored model version {version} fails its checksum")
        return version, round_, unpack_arrays(blob)["params"], unpack_arrays(state)

    def model_rounds(self, job_id: str) -> list[tuple[int, int]]:
        with self._lock:
            return [tuple(r) for r in self._db.execute("SELECT version, round FROM models WHERE job=? ORDER BY version", (job_id,))]


class _Tx:
    def __init__(self, db: sqlite3.Connection, lock: threading.RLock):
        self.db, self.lock = db, lock

    def __enter__(self) -> sqlite3.Connection:
        self.lock.acquire()
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, et, ev, tb) -> None:
        try:
            self.db.execute("COMMIT" if et is None else "ROLLBACK")
        finally:
            self.lock.release()


def _archive(db: sqlite3.Connection, job_id: str) -> str:
    """Free an ended job's name: its job, rounds and models move to ``NAME~K`` (K = 1, 2, ...; '~' is
    never part of a job name), where ``insitu job status NAME~K`` still finds them."""
    k = 1
    while db.execute("SELECT 1 FROM jobs WHERE id=?", (f"{job_id}~{k}",)).fetchone():
        k += 1
    new = f"{job_id}~{k}"
    for table in ("jobs", "rounds", "round_sites", "round_blame", "models", "job_log"):
        db.execute(f"UPDATE {table} SET {'id' if table == 'jobs' else 'job'}=? WHERE {'id' if table == 'jobs' else 'job'}=?", (new, job_id))
    return new


def _job(row) -> JobRow:
    (jid, spec, th, status, by, created, target, applied, nxt, final, error) = row
    return JobRow(jid, json.loads(spec), th, JobStatus(status), by, created, target, applied, nxt, json.loads(final) if final else None, error)


__all__ = ["JobStore", "JobRow", "JobStatus", "RoundStatus"]
