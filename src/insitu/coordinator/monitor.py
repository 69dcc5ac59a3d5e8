"""What an operator watches: a job's progress and ETA, its log, and the consortium's sites.

* :class:`JobLogHandler` keeps every line the coordinator logs about a job (``job NAME ...``)
  in the job store's ``job_log`` table, so ``insitu job logs NAME`` shows the job's history after
  the fact and across restarts; nothing in the round loop had to learn about it.
* :func:`progress` turns the stored round records into rounds done, seconds per round and an
  estimated time to completion.
* :func:`site_rows` joins the live channel registry (online, last heart-beat, certificate
  expiry, each site's declared privacy limit) with what the rounds recorded (last round joined,
  why a site dropped, ε spent), so that a killed site shows as offline *with its reason*.

Everything here is read from what the coordinator already holds; nothing is asked of the sites.
"""
from __future__ import annotations

import logging
import statistics
import time
from typing import Any, Mapping

ENDED = ("done", "failed", "cancelled")


class JobLogHandler(logging.Handler):
    """Copies log records about a job (``"job %s ..."`` with the job id first) into the job store."""

    def __init__(self, store: Any):
        super().__init__(level=logging.INFO)
        self.store = store

    def emit(self, record: logging.LogRecord) -> None:
        try:
            job = _job_of(record)
            if job:
                self.store.log_event(job, record.levelname.lower(), record.getMessage(), record.created)
        except Exception:  # a log line must never break the coordinator
            self.handleError(record)


def _job_of(record: logging.LogRecord) -> str | None:
    args = record.args if isinstance(record.args, tuple) else ()
    msg = str(record.msg)
    if msg.startswith("job %s") and args:
        return str(args[0])
    if msg.startswith("operator %s: %s %s") and len(args) >= 3 and args[1] == "cancel":
        return str(args[2]) if isinstance(args[2], str) and args[2] else None
    return None


def install(store: Any, logger: str = "insitu.coordinator") -> JobLogHandler:
    handler = JobLogHandler(store)
    logging.getLogger(logger).addHandler(handler)
    if logging.getLogger(logger).getEffectiveLevel() > logging.INFO:
        logging.getLogger(logger).setLevel(logging.INFO)
    return handler


def progress(job: Mapping[str, Any], rounds: list[Mapping[str, Any]], now: float | None = None) -> dict[str, Any]:
    """Rounds applied of the target, mean wall seconds per round attempt (recent ones) and the ETA."""
    now = now or time.time()
    done = [r for r in rounds if r.get("ended") and r.get("started")]
    recent = [r["ended"] - r["started"] for r in done[-10:]]
    per_round = statistics.fmean(recent) if recent else None
    left = max(0, int(job["rounds_target"]) - int(job["rounds_applied"]))
    status = job["status"]
    eta = None
    if status not in ENDED and per_round is not None and status == "running":
        running = next((r for r in reversed(rounds) if r.get("status") == "started"), None)
        in_flight = (now - running["started"]) if running else 0.0
        eta = max(0.0, left * per_round - min(in_flight, per_round))
    started = rounds[0]["started"] if rounds and rounds[0].get("started") else None
    ended = done[-1]["ended"] if done and status in ENDED else None
    return {"rounds_left": left, "seconds_per_round": per_round, "eta_seconds": eta,
            "elapsed_seconds": ((ended or now) - started) if started else None}


def traffic(spec: Mapping[str, Any], rounds: list[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean bytes per site per applied round, up (updates) and down (the model: dense or a delta, the job's
    ``downlink``), over the sites that took part in each round."""
    up = [v for r in rounds for v in (r.get("bytes_up") or {}).values()]
    down = [v for r in rounds for v in (r.get("bytes_down") or {}).values()]
    return {"downlink": spec.get("downlink", "dense"),
            "bytes_up_per_site_round": statistics.fmean(up) if up else None,
            "bytes_down_per_site_round": statistics.fmean(down) if down else None}


def site_rows(live: list[Mapping[str, Any]], rounds: list[Mapping[str, Any]] | None = None) -> list[dict[str, Any]]:
    """One row per site: the live registry joined with the job's rounds (if given)."""
    rows: dict[str, dict[str, Any]] = {str(r["site"]): dict(r) for r in live}
    for r in rounds or []:
        for s in (*r.get("participants", []), *r.get("dropped", {})):
            rows.setdefault(s, {"site": s, "online": False, "offline_reason": "not connected since the coordinator started"})
    for r in rounds or []:
        ev = (r.get("evaluation") or {}).get("sites") or {}
        for s in rows:
            row = rows[s]
            if s in r.get("participants", []):
                row["last_round"] = r["round"]
                row.pop("dropped_reason", None)
            if s in r.get("dropped", {}):
                row["dropped_reason"] = f"round {r['round']}: {r['dropped'][s]}"
            if s in ev and ev[s].get("n"):
                row["accuracy"], row["loss"] = ev[s].get("accuracy"), ev[s].get("loss")
            if s in (r.get("train_loss") or {}):
                row["train_loss"] = r["train_loss"][s]
            if s in (r.get("epsilon") or {}):
                row["epsilon"] = r["epsilon"][s]
    for row in rows.values():
        info = row.get("info") or {}
        if "epsilon_budget" in info:
            row["epsilon_budget"] = info["epsilon_budget"]
    return [rows[k] for k in sorted(rows)]


def ago(t: float | None, now: float | None = None) -> str:
    """'3 s ago', '5 min ago' for a wall-clock time; '' for None."""
    if not t:
        return ""
    d = max(0.0, (now or time.time()) - t)
    return f"{d:.0f} s ago" if d < 120 else f"{d / 60:.0f} min ago" if d < 7200 else f"{d / 3600:.1f} h ago"


def duration(s: float | None) -> str:
    if s is None:
        return "–"
    s = max(0.0, s)
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


__all__ = ["JobLogHandler", "install", "progress", "site_rows", "ago", "duration"]
