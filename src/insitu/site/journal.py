"""The site's own record of the rounds it trained: ``state/rounds.jsonl``, one line per TRAIN answered.

What the site sent out is decided by its pipeline; this journal keeps, for the data officer,
what the site did: which job and round, which plan (by content hash), under which protection,
how many records it trained on, its training loss, and the ε it charged (DP tasks).  It holds
nothing about any record.  The site console and ``insitu site rounds`` read it.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

from insitu.federation.messages import Message

log = logging.getLogger("insitu.site")
_lock = threading.Lock()
FILE = "rounds.jsonl"


def record_round(state: Path, site: str, msg: Message, reply: Message, plan_hash: str, protection: str) -> dict[str, Any]:
    """Append one trained round to ``state/rounds.jsonl`` and log it."""
    metrics = {k: v for k, v in dict(reply.meta.get("metrics") or {}).items() if isinstance(v, (int, float, str, bool))}
    entry = {"at": time.time(), "site": site, "job": msg.job, "round": msg.round, "plan_hash": plan_hash,
             "protocol": protection, "metrics": metrics}
    with _lock, (Path(state) / FILE).open("a") as fh:
        fh.write(json.dumps(entry) + "\n")
    eps = f", ε {metrics['epsilon_round']:.3g} this round ({metrics['epsilon_total']:.3g} in total)" if "epsilon_total" in metrics else ""
    loss = f", train loss {metrics['train_loss']:.4f}" if isinstance(metrics.get("train_loss"), (int, float)) else ""
    log.info("trained job %s round %d (plan %s, %s): %s records%s%s", msg.job, msg.round, plan_hash[:12], entry["protocol"],
             metrics.get("num_samples", "?"), loss, eps)
    return entry


def read_jsonl(path: Path, limit: int | None = None) -> list[dict[str, Any]]:
    """The JSON lines of ``path`` (the last ``limit``), skipping a torn last line."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out[-limit:] if limit else out


__all__ = ["record_round", "read_jsonl", "FILE"]
