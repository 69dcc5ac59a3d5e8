"""Coordinator state in SQLite: round numbers never reused, a round never applied twice."""
from __future__ import annotations

import sqlite3

import numpy as np
import pytest

from insitu.coordinator.store import JobStatus, JobStore
from insitu.errors import ProtocolError


def apply(store, r, version, value=1.0):
    return store.apply_round("j", r, expected_version=version, params=np.full(3, value, np.float32), state={"m": np.zeros(3)},
                             participants=("a", "b"), dropped={"c": "timed out"}, metrics={}, evaluation=None, seconds=0.1)


def test_rounds_reserved_applied_once_and_recovered(tmp_path):
    store = JobStore(tmp_path / "c.db")
    store.add_job("j", {"x": 1}, "h" * 64, 3, "ops")
    r1 = store.begin_round("j")
    assert apply(store, r1, 0) == 1
    with pytest.raises(ProtocolError, match="model version is 1, expected 0"):
        apply(store, r1, 0)
    with pytest.raises(ProtocolError, match="is applied; it cannot be applied"):
        apply(store, r1, 1)
    r2 = store.begin_round("j")  # the coordinator dies during this round
    store.close()
    store = JobStore(tmp_path / "c.db")
    assert store.recover() == 1
    r3 = store.begin_round("j")
    assert (r1, r2, r3) == (1, 2, 3)
    with pytest.raises(ProtocolError):
        apply(store, r2, 1)  # an interrupted round is never applied
    apply(store, r3, 1, value=2.0)
    version, rnd, params, state = store.latest_model("j")
    assert (version, rnd) == (2, 3) and params.tolist() == [2.0, 2.0, 2.0] and "m" in state
    assert [r["status"] for r in store.rounds("j")] == ["applied", "interrupted", "applied"]
    assert store.model_rounds("j") == [(1, 1), (2, 3)]


def test_tampered_model_detected_and_cancel(tmp_path):
    store = JobStore(tmp_path / "c.db")
    store.add_job("j", {}, "h" * 64, 3, "ops")
    apply(store, store.begin_round("j"), 0)
    db = sqlite3.connect(tmp_path / "c.db")
    db.execute("UPDATE models SET params = X'00' WHERE job='j'")
    db.commit()
    with pytest.raises(ProtocolError, match="checksum"):
        store.latest_model("j")
    assert store.cancel("j").status is JobStatus.CANCELLED


def test_blame_of_aborted_rounds_survives_a_restart_and_moves_with_an_archived_name(tmp_path):
    store = JobStore(tmp_path / "c.db")
    store.add_job("j", {"x": 1}, "h" * 64, 3, "ops")
    for _ in range(2):
        r = store.begin_round("j")
        store.abort_round("j", r, "secure aggregation aborted by site m", {"m": "bad reveal"}, ("m",))
    r = store.begin_round("j")
    store.abort_round("j", r, "too few sites", {"c": "timed out"})  # no culprit: nobody is blamed
    store.abort_round("j", 1, "again", {}, ("c",))  # an ended round is not aborted (nor blamed) twice
    store.close()
    store = JobStore(tmp_path / "c.db")
    assert store.blame("j") == {"m": [1, 2]}
    store.set_status("j", JobStatus.CANCELLED)
    store.add_job("j", {"x": 1}, "h" * 64, 3, "ops")  # the name is free again: the old job becomes j~1
    assert store.blame("j") == {} and store.blame("j~1") == {"m": [1, 2]}
