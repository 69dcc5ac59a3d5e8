"""The gateway's record comes from the consortium's record schema (`[records] schema`), not from
heart fields: PUT/PATCH validate against its columns and types, the nursing view follows the
columns' roles, imports read its columns; the built-in record stays the default."""
from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from insitu.audit import AuditLog
from insitu.audit.keys import generate_signing_key
from insitu.errors import ConfigError, DataError
from insitu.gateway.app import Gateway, create_app
from insitu.gateway.auditing import GroupCommitAudit
from insitu.gateway.config import GatewayConfig
from insitu.gateway.policy import PolicyDecisionPoint
from insitu.gateway.record_schema import HEART_RECORDS
from insitu.gateway.records import RecordStore, bodies_from_source
from insitu.gateway.tokens import TokenIssuer, TokenVerifier

from .support import ISSUER, T0, Clock, TestClient

SCHEMA = """
[columns.mrn]
role = "direct_identifier"
type = "string"
[columns.age]
role = "quasi_identifier"
type = "integer"
[columns.sex]
role = "quasi_identifier"
type = "string"
levels = ["female", "male"]
[columns.zip]
role = "quasi_identifier"
type = "string"
[columns.admitted]
role = "quasi_identifier"
type = "date"
[columns.diagnosis]
role = "sensitive"
type = "string"
[columns.chol]
role = "feature"
type = "float"
nullable = false
[columns.smoker]
role = "feature"
type = "boolean"
[columns.outcome]
role = "label"
type = "integer"
"""
RECORD = {"ward": "cardio", "mrn": "MRN-55120", "age": 64, "sex": "female", "zip": "10115", "admitted": "2026-11-02",
          "diagnosis": "stable angina", "chol": 241.0, "smoker": False, "outcome": 1}


@pytest.fixture()
def gw(tmp_path):
    (tmp_path / "schema.toml").write_text(SCHEMA)
    cfg = GatewayConfig.from_dict({"records": {"schema": "schema.toml"}}, base=tmp_path)
    key = Ed25519PrivateKey.generate()
    gateway = Gateway(pdp=PolicyDecisionPoint(()), verifier=TokenVerifier(key.public_key(), ISSUER, dt.timedelta(hours=12)),
                      store=RecordStore(f"sqlite:///{tmp_path / 'records.db'}", models=cfg.record_models()),
                      audit=GroupCommitAudit(AuditLog.open(tmp_path / "audit.db", generate_signing_key(), writer="gateway")),
                      clock=Clock())
    client = TestClient(create_app(gateway))
    issuer = TokenIssuer(key, ISSUER, dt.timedelta(hours=12))
    client.hdr = lambda role: {"Authorization": f"Bearer {issuer.issue(role + '-1', role, dt.timedelta(hours=1), now=T0)}"}
    client.cfg = cfg
    return client


def test_records_follow_the_consortium_schema(gw):
    r = gw.put("/records/pt-0001", json=RECORD, headers=gw.hdr("doctor"))
    assert r.status_code == 200, r.text
    rec = gw.get("/records/pt-0001", headers=gw.hdr("doctor")).json()
    assert {k: rec[k] for k in RECORD} == RECORD and rec["version"] == 1
    view = gw.get("/nursing/pt-0001", headers=gw.hdr("nurse")).json()
    # features and the label shown, quasi-identifiers generalised, identifiers and sensitive columns never
    assert view == {"pseudonym": "pt-0001", "ward": "cardio", "age": "60-69", "sex": "female", "chol": 241.0,
                    "smoker": False, "outcome": 1}
    r = gw.patch("/records/pt-0001", json={"chol": 198.5, "smoker": True}, headers=gw.hdr("doctor"))
    assert r.status_code == 200 and r.json()["chol"] == 198.5 and r.json()["version"] == 2
    nullable = {k: v for k, v in RECORD.items() if k not in ("zip", "diagnosis")}  # nullable columns may be left out
    assert gw.put("/records/pt-0002", json=nullable, headers=gw.hdr("doctor")).status_code == 200
    props = gw.get("/openapi.json").json()["components"]["schemas"]["RecordBody"]["properties"]
    assert set(props) == set(RECORD) and "chest_pain" not in props


@pytest.mark.parametrize("change,field", [
    ({"chest_pain": "asymptomatic"}, "body.chest_pain"),  # a heart field is not a field of this schema
    ({"sex": "other"}, "body.sex"),
    ({"age": "old"}, "body.age"),
    ({"age": True}, "body.age"),
    ({"chol": float("nan")}, "body.chol"),
    ({"admitted": "2026-02-30"}, "body.admitted"),
    ({"chol": None}, "body.chol"),
])
def test_put_against_the_schema_refused_naming_the_field(gw, change, field):
    body = {**RECORD, **change}
    import json

    raw = json.dumps(body, allow_nan=True)
    r = gw.put("/records/pt-0003", content=raw, headers={**gw.hdr("doctor"), "content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert r.json()["field"].startswith(field), r.json()


def test_required_column_missing_and_empty_patch_refused(gw):
    r = gw.put("/records/pt-0004", json={k: v for k, v in RECORD.items() if k != "chol"}, headers=gw.hdr("doctor"))
    assert r.status_code == 422 and r.json()["field"] == "body.chol"
    gw.put("/records/pt-0004", json=RECORD, headers=gw.hdr("doctor"))
    assert gw.patch("/records/pt-0004", json={}, headers=gw.hdr("doctor")).status_code == 422
    r = gw.patch("/records/pt-0004", json={"age": None}, headers=gw.hdr("doctor"))
    assert r.status_code == 422 and r.json()["field"] == "body.age"
    assert gw.put("/records/pt-0004", json=RECORD, headers=gw.hdr("nurse")).status_code == 403


def test_import_reads_the_schema_columns(gw, tmp_path):
    import pandas as pd

    rows = [{"pseudonym": f"pt-{i:04d}", **RECORD, "age": 40 + i} for i in range(3)]
    pd.DataFrame(rows).to_csv(tmp_path / "site.csv", index=False)
    got = bodies_from_source(str(tmp_path / "site.csv"), models=gw.cfg.record_models())
    assert [p for p, _ in got] == ["pt-0000", "pt-0001", "pt-0002"] and got[2][1].age == 42
    pd.DataFrame([{**rows[0], "sex": "unknown"}, rows[1]]).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(DataError, match=r"row 1: invalid field\(s\) \['sex'\]; nothing was imported") as e:
        bodies_from_source(str(tmp_path / "bad.csv"), models=gw.cfg.record_models())
    assert "unknown" not in str(e.value)  # errors name rows and fields, never values
    pd.DataFrame([{k: v for k, v in rows[0].items() if k != "chol"}]).to_csv(tmp_path / "short.csv", index=False)
    with pytest.raises(DataError, match=r"lacks required column\(s\) \['chol'\]"):
        bodies_from_source(str(tmp_path / "short.csv"), models=gw.cfg.record_models())


def test_schema_columns_that_cannot_be_record_fields_are_refused(tmp_path):
    for name, words in (("ward", "clashes with the gateway's own field"), ("Blood-Pressure", "cannot be a gateway record field")):
        (tmp_path / "s.toml").write_text(f'[columns."{name}"]\nrole = "feature"\ntype = "float"\n')
        with pytest.raises(ConfigError, match=words):
            GatewayConfig.from_dict({"records": {"schema": "s.toml"}}, base=tmp_path).record_models()


def test_without_a_schema_the_built_in_record_stays(tmp_path):
    assert GatewayConfig.from_dict({}, base=tmp_path).record_models() is HEART_RECORDS
    assert RecordStore("sqlite:///:memory:").models is HEART_RECORDS
