"""The audit log detects every edit, deletion, insertion, reordering and re-signing.

The attacker here has full write access to the database (triggers disabled, rows rewritten with
SQL) and knows the entry format, but not the writer's private key.  Both backends run the same
tests: SQLite always, PostgreSQL against the real server of .ci/services.sh.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from insitu.audit import AuditAction, AuditHead, AuditLog
from insitu.audit.keys import load_private_key, load_public_keys, write_keypair
from insitu.audit.log import _ENTRY_DOMAIN, _entry_bytes, _head_bytes, database_url
from insitu.errors import ConfigError, SecurityError


class Store:
    """One audit log plus raw SQL access for the attacker."""

    def __init__(self, target: str, prefix: str, key: Ed25519PrivateKey) -> None:
        self.target, self.prefix, self.key = target, prefix, key
        self.log = AuditLog.open(target, key, "site-a", table_prefix=prefix)
        self.keys = {"site-a": key.public_key()}
        self.engine = sa.create_engine(database_url(target))
        self.entries = f"{prefix}_entries"
        self.head = f"{prefix}_head"

    def fill(self, n: int) -> None:
        self.log.append_many([(AuditAction.DATA_ACCESS, f"visits-{i}", {"rows": i, "cols": ["age", "zip"]})
                              for i in range(n)])

    def verify(self, **kw):
        return AuditLog.read(self.target, table_prefix=self.prefix).verify(self.keys, **kw)

    def _disable_triggers(self, conn: sa.Connection) -> None:
        if conn.dialect.name == "sqlite":
            for op in ("update", "delete"):
                conn.exec_driver_sql(f'DROP TRIGGER IF EXISTS "{self.entries}_no_{op}"')
        else:
            conn.exec_driver_sql(f'ALTER TABLE "{self.entries}" DISABLE TRIGGER USER')

    def rows(self) -> list[dict]:
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(sa.text(f'SELECT * FROM "{self.entries}" ORDER BY seq'))]

    def rewrite(self, rows: list[dict]) -> None:
        """Replace every entry with ``rows`` (what an attacker with DB access can do)."""
        with self.engine.begin() as conn:
            self._disable_triggers(conn)
            conn.exec_driver_sql(f'DELETE FROM "{self.entries}"')
            if rows:
                cols = list(rows[0])
                conn.execute(sa.text(f'INSERT INTO "{self.entries}" ({", ".join(cols)}) '
                                     f'VALUES ({", ".join(":" + c for c in cols)})'), rows)

    def set_head(self, seq: int, entry_hash: str, signer: Ed25519PrivateKey) -> None:
        sig = signer.sign(_head_bytes(self.log.log_id, seq, entry_hash)).hex()
        with self.engine.begin() as conn:
            conn.execute(sa.text(f'UPDATE "{self.head}" SET seq=:s, entry_hash=:h, signature=:g'),
                         {"s": seq, "h": entry_hash, "g": sig})

    def forge_chain(self, rows: list[dict], start: int, signer: Ed25519PrivateKey) -> list[dict]:
        """Renumber from ``start`` (0-based) and recompute hashes and signatures with ``signer``."""
        out = [dict(r) for r in rows]
        prev = out[start - 1]["entry_hash"] if start > 0 else None
        for i in range(start, len(out)):
            r = out[i]
            r["seq"] = i + 1
            if prev is not None:
                r["prev_hash"] = prev
            body = _entry_bytes(self.log.log_id, r["seq"], r["ts"], r["writer"], r["action"], r["subject"],
                                json.loads(r["details"]), r["prev_hash"])
            r["entry_hash"] = hashlib.sha256(body).hexdigest()
            r["signature"] = signer.sign(_ENTRY_DOMAIN + body).hex()
            prev = r["entry_hash"]
        return out

    def close(self) -> None:
        self.log.close()
        self.engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    key = Ed25519PrivateKey.generate()
    if request.param == "sqlite":
        s = Store(str(tmp_path / "audit.db"), "audit", key)
    else:
        url = request.getfixturevalue("pg_url")
        prefix = request.getfixturevalue("pg_prefix")
        s = Store(url, prefix, key)
    yield s
    if request.param == "postgresql":
        with s.engine.begin() as conn:
            for t in ("entries", "head", "meta"):
                conn.exec_driver_sql(f'DROP TABLE IF EXISTS "{s.prefix}_{t}" CASCADE')
            conn.exec_driver_sql(f'DROP FUNCTION IF EXISTS "{s.prefix}_entries_append_only"() CASCADE')
    s.close()


def test_intact_log_verifies_and_reads_back(store):
    store.fill(5)
    e = store.log.append("round.participation", "round-3", {"epsilon": 0.25, "ok": True})
    assert e.seq == 6 and e.action is AuditAction.ROUND_PARTICIPATION
    report = store.verify()
    assert report.ok and report.entries_checked == 6 and report.writers == ("site-a",)
    assert report.head == store.log.head() == AuditHead(6, e.entry_hash)
    listed = list(AuditLog.read(store.target, table_prefix=store.prefix).entries(start=6))
    assert listed == [e]


def test_database_refuses_update_and_delete(store):
    store.fill(2)
    with pytest.raises(sa.exc.DBAPIError, match="append-only"):
        with store.engine.begin() as conn:
            conn.exec_driver_sql(f'UPDATE "{store.entries}" SET subject = \'x\' WHERE seq = 1')
    with pytest.raises(sa.exc.DBAPIError, match="append-only"):
        with store.engine.begin() as conn:
            conn.exec_driver_sql(f'DELETE FROM "{store.entries}" WHERE seq = 2')
    assert store.verify().ok


def test_edited_entry_is_named(store):
    store.fill(6)
    rows = store.rows()
    rows[2]["details"] = json.dumps({"rows": 999, "cols": ["age", "zip"]})
    store.rewrite(rows)
    r = store.verify()
    assert not r.ok and r.first_bad_seq == 3 and "edited" in r.reason


def test_edit_with_recomputed_hashes_fails_signature(store):
    store.fill(6)
    rows = store.rows()
    rows[2]["subject"] = "nothing-to-see"
    attacker = Ed25519PrivateKey.generate()
    forged = store.forge_chain(rows, 2, attacker)
    store.rewrite(forged)
    store.set_head(6, forged[-1]["entry_hash"], attacker)
    r = store.verify()
    assert not r.ok and r.first_bad_seq == 3 and "signature" in r.reason


def test_deleted_middle_entry(store):
    store.fill(6)
    rows = store.rows()
    del rows[3]
    store.rewrite(rows)
    r = store.verify()
    assert not r.ok and r.first_bad_seq == 4 and "deleted" in r.reason


def test_deleted_middle_entry_with_renumbering(store):
    store.fill(6)
    rows = store.rows()
    del rows[3]
    for i, row in enumerate(rows):
        row["seq"] = i + 1
    store.rewrite(rows)
    r = store.verify()
    assert not r.ok and r.first_bad_seq == 4


def test_truncated_tail_detected_by_signed_head(store):
    store.fill(6)
    store.rewrite(store.rows()[:-2])
    r = store.verify()
    assert not r.ok and "deleted from the end" in r.reason


def test_truncation_with_old_head_copy_needs_published_checkpoint(store):
    """An attacker who kept an old signed head can roll the log back; a published head catches it."""
    store.fill(4)
    with store.engine.connect() as conn:
        old_head = dict(conn.execute(sa.text(f'SELECT * FROM "{store.head}"')).one()._mapping)
    store.fill(3)
    checkpoint = store.log.head()
    store.rewrite(store.rows()[:4])
    with store.engine.begin() as conn:
        conn.execute(sa.text(f'UPDATE "{store.head}" SET seq=:seq, entry_hash=:entry_hash, '
                             f'signature=:signature WHERE id=1'), old_head)
    assert store.verify().ok  # the documented limit without an external checkpoint
    r = store.verify(expect_head=checkpoint)
    assert not r.ok and r.first_bad_seq == 7 and "checkpoint" in r.reason


def test_inserted_entry_signed_with_attacker_key(store):
    store.fill(5)
    rows = store.rows()
    fake = dict(rows[1], subject="approved-by-nobody", details=json.dumps({"injected": True}, separators=(",", ":")))
    rows.insert(2, fake)
    attacker = Ed25519PrivateKey.generate()
    forged = store.forge_chain(rows, 2, attacker)
    store.rewrite(forged)
    store.set_head(len(forged), forged[-1]["entry_hash"], attacker)
    r = store.verify()
    assert not r.ok and r.first_bad_seq == 3 and "signature" in r.reason


def test_appended_entry_with_attacker_key(store):
    store.fill(3)
    rows = store.rows()
    rows.append(dict(rows[-1], subject="extra"))
    attacker = Ed25519PrivateKey.generate()
    forged = store.forge_chain(rows, 3, attacker)
    store.rewrite(forged)
    r = store.verify()
    assert not r.ok and r.first_bad_seq == 4 and "signature" in r.reason


def test_reordered_entries(store):
    store.fill(6)
    rows = store.rows()
    rows[1]["seq"], rows[4]["seq"] = rows[4]["seq"], rows[1]["seq"]
    store.rewrite(rows)
    r = store.verify()
    assert not r.ok and r.first_bad_seq == 2


def test_whole_log_resigned_with_wrong_key(store):
    store.fill(4)
    attacker = Ed25519PrivateKey.generate()
    forged = store.forge_chain(store.rows(), 0, attacker)
    store.rewrite(forged)
    store.set_head(4, forged[-1]["entry_hash"], attacker)
    r = store.verify()
    assert not r.ok and r.first_bad_seq == 1 and "signature" in r.reason


def test_unpinned_writer_may_not_open_the_log(store):
    store.fill(2)
    with pytest.raises(SecurityError, match="writer 'gateway' is not pinned in this audit log's signed manifest"):
        AuditLog.open(store.target, Ed25519PrivateKey.generate(), "gateway", table_prefix=store.prefix)
    assert store.verify().ok and store.verify().entries_checked == 2


def test_append_refuses_when_head_and_entries_disagree(store):
    store.fill(3)
    store.rewrite(store.rows()[:-1])
    with pytest.raises(SecurityError, match="does not match its newest entry"):
        store.log.append("deid.run", "visits", {})


# -- property: any single tampering of any entry, in any of five ways, is detected ---------------
TAMPERS = ["edit", "edit_rehash", "delete", "insert", "swap", "resign"]


@settings(max_examples=24, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(2, 8), data=st.data(), how=st.sampled_from(TAMPERS))
def test_any_tampering_is_detected(tmp_path_factory, n, data, how):
    path = tmp_path_factory.mktemp("prop") / "audit.db"
    s = Store(str(path), "audit", Ed25519PrivateKey.generate())
    try:
        s.fill(n)
        rows = s.rows()
        i = data.draw(st.integers(0, n - 1), label="position")
        attacker = Ed25519PrivateKey.generate()
        if how == "edit":
            rows[i]["details"] = json.dumps({"rows": -1})
        elif how == "edit_rehash":
            rows[i]["subject"] = "changed"
            rows = s.forge_chain(rows, i, attacker)
        elif how == "delete":
            del rows[i]
        elif how == "insert":
            rows.insert(i, dict(rows[i], subject="inserted"))
            rows = s.forge_chain(rows, i, attacker)
        elif how == "swap":
            j = data.draw(st.integers(0, n - 1).filter(lambda j: j != i), label="other")
            rows[i], rows[j] = rows[j], rows[i]
            for k, r in enumerate(rows):
                r["seq"] = k + 1
        elif how == "resign":
            rows = s.forge_chain(rows, i, attacker)
        s.rewrite(rows)
        if rows and how in ("edit_rehash", "insert", "resign"):
            s.set_head(len(rows), rows[-1]["entry_hash"], attacker)
        assert not s.verify().ok
    finally:
        s.close()


# -- API contract -------------------------------------------------------------------------------
def test_bad_input_is_refused_before_writing(tmp_path):
    log = AuditLog.open(tmp_path / "a.db", Ed25519PrivateKey.generate(), "site-a")
    with pytest.raises(ConfigError, match="unknown audit action"):
        log.append("made.up", "x", {})
    with pytest.raises(ConfigError, match="JSON"):
        log.append(AuditAction.EPSILON_SPEND, "round-1", {"epsilon": float("nan")})
    with pytest.raises(ConfigError, match="JSON"):
        log.append_many([(AuditAction.DEID_RUN, "ok", {}), (AuditAction.DEID_RUN, "bad", {"x": object()})])
    with pytest.raises(ConfigError, match="writer name"):
        AuditLog.open(tmp_path / "a.db", Ed25519PrivateKey.generate(), "../etc")
    assert log.head().seq == 0
    with pytest.raises(SecurityError, match="read-only"):
        AuditLog.read(tmp_path / "a.db").append(AuditAction.DEID_RUN, "x", {})
    with pytest.raises(ConfigError, match="does not exist"):
        AuditLog.read(tmp_path / "missing.db")


def test_key_files_roundtrip_and_loose_permissions_refused(tmp_path):
    key_path, pub_path = write_keypair(tmp_path / "keys", "site-a")
    assert oct(key_path.stat().st_mode & 0o777) == "0o600"
    log = AuditLog.open(tmp_path / "a.db", key_path, "site-a")
    log.append(AuditAction.MODEL_RELEASE, "model-v1", {"sha256": "ab" * 32})
    assert AuditLog.read(tmp_path / "a.db").verify(load_public_keys(tmp_path / "keys")).ok
    with pytest.raises(ConfigError, match="already exists"):
        write_keypair(tmp_path / "keys", "site-a")
    os.chmod(key_path, 0o644)
    with pytest.raises(SecurityError, match="chmod 600"):
        load_private_key(key_path)


def test_public_namespace():
    import insitu.audit as audit

    assert sorted(audit.__all__) == sorted(n for n in dir(audit) if not n.startswith("_") and n[0].isupper())


_WORKER = """
import sys
from insitu.audit import AuditLog, AuditAction
log = AuditLog.open(sys.argv[1], sys.argv[2], sys.argv[3])
for i in range(int(sys.argv[4])):
    log.append(AuditAction.ROUND_PARTICIPATION, f"round-{i}", {"writer": sys.argv[3]})
"""


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_concurrent_appends_from_processes_keep_one_chain(request, tmp_path, backend):
    keys = tmp_path / "keys"
    paths = {w: write_keypair(keys, w)[0] for w in ("site-a", "site-b", "site-c")}
    if backend == "sqlite":
        db = str(tmp_path / "audit.db")
    else:  # a fresh database-wide log: the worker uses the default prefix, so use a new schema-free DB name
        url = request.getfixturevalue("pg_url")
        db = url
        eng = sa.create_engine(url)
        with eng.begin() as conn:
            for t in ("entries", "head", "meta"):
                conn.exec_driver_sql(f'DROP TABLE IF EXISTS "audit_{t}" CASCADE')
        eng.dispose()
    # create once, pinning the three writers in the signed genesis
    AuditLog.open(db, paths["site-a"], "site-a", writers=load_public_keys(keys)).close()
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, db, str(p), w, "8"])
             for w, p in paths.items()]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
    report = AuditLog.read(db).verify(load_public_keys(keys))
    assert report.ok and report.entries_checked == 24
    assert report.writers == ("site-a", "site-b", "site-c")


def test_one_log_shared_by_threads(tmp_path):
    """A gateway shares one AuditLog across request threads; appends must still form one chain."""
    from concurrent.futures import ThreadPoolExecutor

    key = Ed25519PrivateKey.generate()
    log = AuditLog.open(tmp_path / "audit.db", key, "gateway")
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda i: log.append(AuditAction.GATEWAY_DECISION, f"req-{i}", {"i": i}), range(40)))
    report = log.verify({"gateway": key.public_key()})
    assert report.ok and report.entries_checked == 40
    assert sorted(e.details["i"] for e in log.entries()) == list(range(40))
