"""Group commit: every append returns only after its entry is committed; failures reach every waiter."""
from __future__ import annotations

import threading
import time

import pytest

from insitu.audit import AuditLog
from insitu.audit.keys import generate_signing_key
from insitu.gateway.auditing import GroupCommitAudit


def test_concurrent_appends_all_land_in_fewer_transactions(tmp_path):
    key = generate_signing_key()
    log = AuditLog.open(tmp_path / "a.db", key, writer="gateway")

    class Slow:
        """A real log whose commits take a while, as an fsync under load does."""

        def append_many(self, items):
            time.sleep(0.02)
            return log.append_many(items)

    gc = GroupCommitAudit(Slow())
    results: dict[tuple[int, int], int] = {}

    def worker(t: int) -> None:
        for i in range(10):
            entry = gc.append("gateway.decision", f"t{t}", {"i": i})
            # returned means committed: it is readable now, by a fresh reader
            results[(t, i)] = entry.seq

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    entries = list(AuditLog.read(tmp_path / "a.db").entries())
    assert len(entries) == 80 and sorted(results.values()) == list(range(1, 81))
    for t in range(8):  # per thread, entries are in the order that thread appended them
        mine = [e.details["i"] for e in entries if e.subject == f"t{t}"]
        assert mine == list(range(10))
    assert gc.batches < 80  # commits were shared
    assert AuditLog.read(tmp_path / "a.db").verify({"gateway": key.public_key()}).ok


def test_a_failed_batch_fails_its_callers_and_the_next_batch_works():
    class Flaky:
        def __init__(self):
            self.calls = 0

        def append_many(self, items):
            self.calls += 1
            if self.calls == 1:
                raise OSError("disk full")
            return list(range(len(items)))

    gc = GroupCommitAudit(Flaky())
    with pytest.raises(OSError, match="disk full"):
        gc.append("gateway.decision", "a", {})
    assert gc.append("gateway.decision", "b", {}) == 0
