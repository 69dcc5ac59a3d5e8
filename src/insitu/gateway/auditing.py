"""Group commit in front of the audit log: every request still waits for its entry to be durable.

A gateway must not answer before its decision is in the audit log, and an
``AuditLog.append`` is one durable transaction (an fsync).  With many requests
in flight, one fsync per request caps throughput at the disk's sync rate.  The
classic fix is group commit: whichever request finds no write in progress
becomes the leader, takes every entry queued so far and writes them with one
``append_many`` (one transaction, all or none); the others wait for the batch
holding their entry.  No entry is acknowledged before it is committed, and a
failed batch fails every request in it — the caller then refuses service.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Mapping, Protocol


class BatchLog(Protocol):
    def append_many(self, items: list[tuple[Any, str, Mapping[str, Any]]]) -> list[Any]: ...


@dataclass(eq=False)
class _Pending:
    action: Any
    subject: str
    details: Mapping[str, Any]
    done: bool = False
    result: Any = None
    error: BaseException | None = None


class GroupCommitAudit:
    """``append`` blocks until the entry is committed; concurrent appends share one transaction."""

    def __init__(self, log: BatchLog, max_batch: int = 512):
        self.log = log
        self.max_batch = max_batch
        self._cond = threading.Condition()
        self._queue: list[_Pending] = []
        self._writing = False
        self.batches = 0  # how many transactions were written (for tests and benchmarks)

    def append(self, action: Any, subject: str, details: Mapping[str, Any]) -> Any:
        item = _Pending(action, subject, dict(details))
        with self._cond:
            self._queue.append(item)
            while not item.done:
                if self._writing:
                    self._cond.wait()
                    continue
                batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch:]
                self._writing = True
                self._cond.release()
                try:
                    results: list[Any] = self.log.append_many([(p.action, p.subject, p.details) for p in batch])
                    error: BaseException | None = None
                except BaseException as exc:  # noqa: BLE001 - handed to every waiter of the batch
                    results, error = [None] * len(batch), exc
                finally:
                    self._cond.acquire()
                for p, r in zip(batch, results):
                    p.done, p.result, p.error = True, r, error
                self.batches += 1
                self._writing = False
                self._cond.notify_all()
        if item.error is not None:
            raise item.error
        return item.result


__all__ = ["GroupCommitAudit"]
