"""`insitu deid apply/check/rotate` end to end on files, with the audit log recording the run."""
from __future__ import annotations

import json

import pandas as pd
import tomli_w
from typer.testing import CliRunner

from insitu.audit import AuditAction, AuditLog
from insitu.audit.keys import load_public_keys
from insitu.deid.cli import app
from insitu.errors import DataError, PolicyViolation

from .helpers import POLICY, SCHEMA, visits

runner = CliRunner()


def _setup(tmp_path, policy=POLICY, n=300):
    (tmp_path / "schema.toml").write_text(tomli_w.dumps(SCHEMA))
    (tmp_path / "deid.toml").write_text(tomli_w.dumps(policy))
    visits(n, seed=5).to_csv(tmp_path / "visits.csv", index=False)
    r = runner.invoke(app, ["keygen", "--secret", str(tmp_path / "site.secret"),
                            "--keyring", str(tmp_path / "fields.keyring")])
    assert r.exit_code == 0, r.output
    from insitu.audit.keys import write_keypair

    write_keypair(tmp_path / "keys", "site-a")


def _apply(tmp_path, out, *extra):
    return runner.invoke(app, ["apply", "--policy", str(tmp_path / "deid.toml"), "--source", str(tmp_path / "visits.csv"),
                               "--out", str(out), "--secret", str(tmp_path / "site.secret"),
                               "--keyring", str(tmp_path / "fields.keyring"), *extra])


def test_apply_writes_output_and_audits(tmp_path):
    _setup(tmp_path)
    out = tmp_path / "out.csv"
    r = _apply(tmp_path, out, "--audit-log", str(tmp_path / "audit.db"), "--audit-key",
               str(tmp_path / "keys/site-a.key"), "--writer", "site-a", "--report", str(tmp_path / "rep.json"))
    assert r.exit_code == 0, r.output
    assert "prosecutor risk" in r.output
    frame = pd.read_csv(out, dtype=str)
    assert "name" not in frame.columns and "target" in frame.columns
    assert frame["diagnosis"].str.startswith("gcm2.k1.").all()
    assert frame["diagnosis"].str.len().nunique() == 1  # padded: one token length per column
    assert "padded to 64 bytes" in r.output and "row order: keyed random" in r.output
    report = json.loads((tmp_path / "rep.json").read_text())
    assert report["tokens"]["diagnosis"] == {"max_bytes": 64, "token_chars": len(frame["diagnosis"][0])}
    assert set(report["intervals"]["singling_out"]) == {"none", "week", "month", "quarter", "year"}
    assert not set(frame["mrn"]) & set(visits(300, seed=5)["mrn"])
    log = AuditLog.read(tmp_path / "audit.db")
    assert log.verify(load_public_keys(tmp_path / "keys")).ok
    actions = [e.action for e in log.entries()]
    assert actions == [AuditAction.DATA_ACCESS, AuditAction.DEID_RUN]
    run = list(log.entries(action="deid.run"))[0].details
    assert run == json.loads((tmp_path / "rep.json").read_text())
    # rotation then a second apply with the same secret gives the same pseudonyms
    r = runner.invoke(app, ["rotate", "--target", str(out), "--keyring", str(tmp_path / "fields.keyring"),
                            "--new-key-id", "k2", "--id-column", "mrn"])
    assert r.exit_code == 0, r.output
    rotated = pd.read_csv(out, dtype=str)
    assert rotated["diagnosis"].str.startswith("gcm2.k2.").all()
    assert set(rotated["diagnosis"].str.len()) == set(frame["diagnosis"].str.len())  # same padding, same length
    assert _apply(tmp_path, tmp_path / "again.db").exit_code == 0
    import sqlite3

    again = pd.read_sql("SELECT mrn FROM deidentified", sqlite3.connect(tmp_path / "again.db"))
    assert set(again["mrn"]) == set(frame["mrn"])


def test_unreachable_policy_writes_nothing(tmp_path):
    strict = {**POLICY, "deid": {**POLICY["deid"], "k": 100, "max_suppression": 0.0},
              "generalize": {**POLICY["generalize"], "age": {"hierarchy": "age_band", "levels": [5]}}}
    _setup(tmp_path, strict)
    out = tmp_path / "out.csv"
    r = _apply(tmp_path, out)
    assert isinstance(r.exception, PolicyViolation)
    assert not out.exists() and list(tmp_path.glob(".out.csv*")) == []
    r = runner.invoke(app, ["check", "--policy", str(tmp_path / "deid.toml"), "--source", str(tmp_path / "visits.csv")])
    assert isinstance(r.exception, PolicyViolation) and "uniqueness" in r.output


def test_schema_not_matching_source_writes_nothing(tmp_path):
    _setup(tmp_path)
    visits(50).drop(columns=["zip", "sex"]).to_csv(tmp_path / "visits.csv", index=False)
    out = tmp_path / "out.csv"
    r = _apply(tmp_path, out)
    assert isinstance(r.exception, DataError) and "['zip', 'sex']" in str(r.exception)
    assert not out.exists()


def test_value_longer_than_max_bytes_writes_nothing(tmp_path):
    short = {**POLICY, "sensitive": {"diagnosis": {"encrypt": True, "diversity": True, "max_bytes": 2}}}
    _setup(tmp_path, short)
    out = tmp_path / "out.csv"
    r = _apply(tmp_path, out)
    assert isinstance(r.exception, DataError)
    assert "'diagnosis'" in str(r.exception) and "max_bytes to at least 3" in str(r.exception)
    assert not any(code in str(r.exception) for code in ("I10", "E11", "J45", "C50", "F32"))
    assert not out.exists()
