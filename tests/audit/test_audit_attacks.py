"""Attacks on the audit log's genesis, canonical form and pinned writer keys.

The attacker has write access to the database (and to the verifier's keys folder where said), but
no private key of a pinned writer.  Each attack must make ``verify`` fail with a reason naming it;
the honest states next to them (a brand-new empty log, a writer the owner pinned) must verify.
"""
from __future__ import annotations

import hashlib
import json
import sqlite3

import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from typer.testing import CliRunner

from insitu.audit import AuditAction, AuditHead, AuditLog
from insitu.audit.cli import app as audit_cli
from insitu.audit.keys import load_public_keys, save_public_key, write_keypair
from insitu.audit.log import _ENTRY_DOMAIN, _canonical, _entry_bytes, _head_bytes
from insitu.errors import ConfigError, SecurityError


@pytest.fixture
def site(tmp_path):
    """A log owned by site-a with site-b pinned, three entries each; keys/ holds both .pub files."""
    keys = tmp_path / "keys"
    ka, _ = write_keypair(keys, "site-a")
    kb, _ = write_keypair(keys, "site-b")
    db = tmp_path / "audit.db"
    a = AuditLog.open(db, ka, "site-a", writers={"site-b": load_public_keys(keys)["site-b"]})
    b = AuditLog.open(db, kb, "site-b")
    for i in range(3):
        a.append(AuditAction.DATA_ACCESS, f"visits-{i}", {"rows": i})
        b.append(AuditAction.GATEWAY_DECISION, f"GET /records/{i}", {"decision": "deny", "rule": "default-deny"})
    a.close()
    b.close()
    return db, keys


def verify(db, keys, **kw):
    with AuditLog.read(db) as log:
        return log.verify(load_public_keys(keys), **kw)


def sql(db, *statements, params=()):
    con = sqlite3.connect(db)
    for trig in ("audit_entries_no_update", "audit_entries_no_delete"):
        con.execute(f"DROP TRIGGER IF EXISTS {trig}")
    for st in statements:
        con.execute(st, params) if params else con.execute(st)
    con.commit()
    con.close()


def test_honest_logs_verify(site, tmp_path):
    db, keys = site
    r = verify(db, keys)
    assert r.ok and r.entries_checked == 6 and r.owner == "site-a" and r.pinned == ("site-a", "site-b")
    fresh = AuditLog.open(tmp_path / "new.db", Ed25519PrivateKey.generate(), "gateway")
    r = fresh.verify({"gateway": fresh._signer.public_key()})
    assert r.ok and r.entries_checked == 0 and r.head.seq == 0  # a new, empty log is intact


# -- 1. emptied or truncated-to-empty ------------------------------------------------------------


def test_emptied_log_does_not_verify(site):
    db, keys = site
    sql(db, "DELETE FROM audit_entries", "DELETE FROM audit_head")
    r = verify(db, keys)
    assert not r.ok and "signed head record is missing" in r.reason


def test_entries_deleted_head_kept(site):
    db, keys = site
    sql(db, "DELETE FROM audit_entries")
    r = verify(db, keys)
    assert not r.ok and "signed head names entry #6 but the log ends at #0" in r.reason


def test_entries_and_genesis_deleted(site):
    db, keys = site
    sql(db, "DELETE FROM audit_entries", "DELETE FROM audit_head", "DELETE FROM audit_meta WHERE key LIKE 'genesis%'")
    r = verify(db, keys)
    assert not r.ok and r.first_bad_seq == 0 and "no signed genesis record" in r.reason
    with pytest.raises(SecurityError, match="no signed genesis record"):
        AuditLog.open(db, keys / "site-a.key", "site-a")  # nor may anyone append to it


def test_every_table_dropped(site):
    db, keys = site
    sql(db, "DROP TABLE audit_entries", "DROP TABLE audit_head", "DROP TABLE audit_meta")
    with pytest.raises(ConfigError, match="holds no insitu audit log"):
        verify(db, keys)
    r = CliRunner().invoke(audit_cli, ["verify", "--log", str(db), "--keys", str(keys)])
    assert r.exit_code != 0 and "holds no insitu audit log" in str(r.exception)


def test_emptied_log_with_a_head_forged_at_zero(site):
    db, keys = site
    with AuditLog.read(db) as log:
        genesis = log.genesis()
    attacker = Ed25519PrivateKey.generate()
    sig = attacker.sign(_head_bytes(genesis.log_id, 0, genesis.hash)).hex()
    con = sqlite3.connect(db)
    con.execute("DROP TRIGGER audit_entries_no_delete")
    con.execute("DELETE FROM audit_entries")
    con.execute("UPDATE audit_head SET seq = 0, entry_hash = ?, writer = 'site-a', signature = ?", (genesis.hash, sig))
    con.commit()
    con.close()
    r = verify(db, keys)
    assert not r.ok and "head signature is not 'site-a''s" in r.reason


def test_emptied_log_with_a_saved_head_zero_needs_a_published_checkpoint(site, tmp_path):
    """The documented limit: a copy of the genuine head #0 rolls the log back; a published head catches it."""
    keys = tmp_path / "k2"
    ka, _ = write_keypair(keys, "site-a")
    db = tmp_path / "fresh.db"
    log = AuditLog.open(db, ka, "site-a")
    con = sqlite3.connect(db)
    head0 = con.execute("SELECT seq, entry_hash, writer, signature FROM audit_head").fetchone()
    con.close()
    log.append(AuditAction.MODEL_RELEASE, "model-v1", {})
    published = log.head()
    log.close()
    con = sqlite3.connect(db)
    con.execute("DROP TRIGGER audit_entries_no_delete")
    con.execute("DELETE FROM audit_entries")
    con.execute("UPDATE audit_head SET seq = ?, entry_hash = ?, writer = ?, signature = ?", head0)
    con.commit()
    con.close()
    assert verify(db, keys).ok
    r = verify(db, keys, expect_head=published)
    assert not r.ok and "checkpoint #1" in r.reason


def test_replaced_genesis_naming_the_attacker_as_owner(site):
    db, keys = site
    attacker = Ed25519PrivateKey.generate()
    with AuditLog.read(db) as log:
        from insitu.audit import Genesis

        fake = Genesis.make(log.log_id, "site-a", attacker, {})
    con = sqlite3.connect(db)
    con.execute("UPDATE audit_meta SET value = ? WHERE key = 'genesis'", (fake.text,))
    con.execute("UPDATE audit_meta SET value = ? WHERE key = 'genesis_signature'", (fake.signature,))
    con.commit()
    con.close()
    r = verify(db, keys)
    assert not r.ok and r.first_bad_seq == 0 and "the log or the key was replaced" in r.reason


def test_verifier_without_the_owner_key(site):
    db, keys = site
    (keys / "site-a.pub").unlink()
    r = verify(db, keys)
    assert not r.ok and "holds no key for the log's owner 'site-a'" in r.reason


# -- 2. canonical JSON, duplicate keys -------------------------------------------------------------


def test_spliced_entry_with_duplicate_keys(site):
    db, keys = site
    con = sqlite3.connect(db)
    row = con.execute("SELECT * FROM audit_entries WHERE seq = 2").fetchone()
    cols = [d[0] for d in con.execute("SELECT * FROM audit_entries LIMIT 0").description]
    entry = dict(zip(cols, row))
    assert json.loads(entry["details"])["decision"] == "deny"
    # the same signed content for Python's json (last value wins) but "permit" for SQLite's JSON functions
    spliced = '{"decision":"permit","rule":"default-deny","decision":"deny"}'
    with AuditLog.read(db) as log:
        body = _entry_bytes(log.log_id, 2, entry["ts"], entry["writer"], entry["action"], entry["subject"],
                            json.loads(spliced), entry["prev_hash"])
    assert hashlib.sha256(body).hexdigest() == entry["entry_hash"]  # a check that re-parses with json.loads passes
    con.execute("DROP TRIGGER audit_entries_no_update")
    con.execute("UPDATE audit_entries SET details = ? WHERE seq = 2", (spliced,))
    con.commit()
    assert con.execute("SELECT json_extract(details, '$.decision') FROM audit_entries WHERE seq = 2").fetchone()[0] == "permit"
    con.close()
    r = verify(db, keys)
    assert not r.ok and r.first_bad_seq == 2 and "key 'decision' appears twice" in r.reason


def test_non_canonical_spelling_of_the_signed_details(site):
    db, keys = site
    sql(db, "UPDATE audit_entries SET details = '{\"rows\": 1}' WHERE seq = 3")  # same value, other bytes
    r = verify(db, keys)
    assert not r.ok and r.first_bad_seq == 3 and "not in canonical form" in r.reason


def test_duplicate_or_deep_details_refused_at_write(tmp_path):
    log = AuditLog.open(tmp_path / "a.db", Ed25519PrivateKey.generate(), "site-a")

    class Twin(str):  # a str key that a dict keeps apart from an equal one
        __hash__ = object.__hash__

        def __eq__(self, other):
            return self is other

    with pytest.raises(ConfigError, match="key 'decision' appears twice"):
        log.append(AuditAction.GATEWAY_DECISION, "x", {Twin("decision"): "permit", "decision": "deny"})
    deep: list = []
    for _ in range(40):
        deep = [deep]
    with pytest.raises(ConfigError, match="nests deeper than 32 levels"):
        log.append(AuditAction.GATEWAY_DECISION, "x", {"d": deep})
    assert log.head().seq == 0


# -- 3. pinned writer keys --------------------------------------------------------------------------


def forge_append(db, writer: str, key: Ed25519PrivateKey, action: str = "data.access", details=None) -> None:
    """Append one entry as ``writer`` signed with ``key``, chain and head included (DB access only)."""
    with AuditLog.read(db) as log:
        log_id, head = log.log_id, log.head()
    text = _canonical(details or {"rows": 0}).decode()
    seq, ts = head.seq + 1, "2026-01-01T00:00:00.000000+00:00"
    body = _entry_bytes(log_id, seq, ts, writer, action, "forged", json.loads(text), head.entry_hash)
    h = hashlib.sha256(body).hexdigest()
    con = sqlite3.connect(db)
    con.execute("INSERT INTO audit_entries VALUES (?,?,?,?,?,?,?,?,?)",
                (seq, ts, writer, action, "forged", text, head.entry_hash, h, key.sign(_ENTRY_DOMAIN + body).hex()))
    con.execute("UPDATE audit_head SET seq = ?, entry_hash = ?, writer = ?, signature = ?",
                (seq, h, writer, key.sign(_head_bytes(log_id, seq, h)).hex()))
    con.commit()
    con.close()


def test_unpinned_writer_with_a_key_in_the_folder(site):
    db, keys = site
    mallory = Ed25519PrivateKey.generate()
    save_public_key(mallory.public_key(), keys / "mallory.pub")  # dropped into the verifier's folder
    forge_append(db, "mallory", mallory)
    r = verify(db, keys)
    assert not r.ok and r.first_bad_seq == 7
    assert "writer 'mallory' is not pinned in the log's signed manifest" in r.reason and "not enough" in r.reason
    assert r.ignored_keys == ("mallory",)


def test_replaced_key_file_of_a_pinned_writer(site):
    db, keys = site
    mallory = Ed25519PrivateKey.generate()
    save_public_key(mallory.public_key(), keys / "site-b.pub")  # overwrite site-b's key in the folder
    forge_append(db, "site-b", mallory)
    r = verify(db, keys)
    assert not r.ok and "the verifier's key for 'site-b'" in r.reason and "a key file was replaced" in r.reason


def test_writer_set_changed_by_a_non_owner(site, tmp_path):
    db, keys = site
    mallory = Ed25519PrivateKey.generate()
    with AuditLog.read(db) as log:
        pinned = log.writers()
    from insitu.audit.log import _raw_key

    details = {"writers": {**{n: _raw_key(k) for n, k in pinned.items()}, "mallory": _raw_key(mallory.public_key())}}
    from insitu.audit.keys import load_private_key

    forge_append(db, "site-b", load_private_key(keys / "site-b.key"), action="audit.writers", details=details)
    forge_append(db, "mallory", mallory)
    r = verify(db, keys)
    assert not r.ok and r.first_bad_seq == 7 and "writer set changed by 'site-b', not by the owner 'site-a'" in r.reason


def test_owner_pins_a_writer_and_only_the_owner_may(site):
    db, keys = site
    kg, pg = write_keypair(keys, "gateway")
    with pytest.raises(SecurityError, match="not pinned"):
        AuditLog.open(db, kg, "gateway")
    with AuditLog.open(db, keys / "site-b.key", "site-b") as b:
        with pytest.raises(SecurityError, match="only the log's owner 'site-a' may change its writers"):
            b.add_writer("gateway", load_public_keys(keys)["gateway"])
        with pytest.raises(ConfigError, match="written by AuditLog.add_writer only"):
            b.append("audit.writers", "gateway", {"writers": {}})
    r = CliRunner().invoke(audit_cli, ["add-writer", "--log", str(db), "--key", str(keys / "site-a.key"),
                                       "--owner", "site-a", "--writer", "gateway"])
    assert r.exit_code == 0, r.output
    with AuditLog.open(db, kg, "gateway") as g:
        g.append(AuditAction.GATEWAY_DECISION, "GET /model", {"decision": "permit"})
    r = verify(db, keys)
    assert r.ok and r.entries_checked == 8 and r.pinned == ("gateway", "site-a", "site-b")
    out = CliRunner().invoke(audit_cli, ["verify", "--log", str(db), "--keys", str(keys)]).output
    assert "intact: 8 entries" in out and "owner site-a" in out


def test_opening_with_a_key_other_than_the_pinned_one(site):
    db, keys = site
    with pytest.raises(SecurityError, match="but the log pins"):
        AuditLog.open(db, Ed25519PrivateKey.generate(), "site-b")
