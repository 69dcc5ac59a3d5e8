"""Every role × endpoint × action against the default policy, plus 401/422 paths and the audit trail."""
from __future__ import annotations

import datetime as dt

import numpy as np
import pytest

from .support import FEATS, FEATURES, Harness, make_harness, record_body

P = "cardio-0001"

# (method, path, json body) per endpoint × action
CALLS = {
    "read-record": ("GET", f"/records/{P}", None),
    "replace-record": ("PUT", f"/records/{P}", record_body("cardio", care_notes="replaced")),
    "patch-record": ("PATCH", f"/records/{P}", {"care_notes": "turn every 2 h"}),
    "read-nursing": ("GET", f"/nursing/{P}", None),
    "predict": ("POST", "/predict", {"features": FEATS}),
    "read-model": ("GET", "/model", None),
}

# role → call → (status, rule that decided)
EXPECTED = {
    "doctor": {
        "read-record": (200, "doctor-records"), "replace-record": (200, "doctor-records"),
        "patch-record": (200, "doctor-records"), "read-nursing": (200, "doctor-nursing-view"),
        "predict": (403, "default-deny"), "read-model": (200, "model-card-public"),
    },
    "nurse": {
        "read-record": (403, "nurse-no-full-record"), "replace-record": (403, "nurse-read-only"),
        "patch-record": (403, "nurse-read-only"), "read-nursing": (200, "nurse-nursing-view"),
        "predict": (403, "default-deny"), "read-model": (200, "model-card-public"),
    },
    "ai-model": {
        "read-record": (403, "agent-never-records"), "replace-record": (403, "agent-never-records"),
        "patch-record": (403, "agent-never-records"), "read-nursing": (403, "agent-never-records"),
        "predict": (200, "agent-inference"), "read-model": (200, "model-card-public"),
    },
}
MATRIX = [(role, call, *EXPECTED[role][call]) for role in EXPECTED for call in CALLS]


def _call(h: Harness, call: str, headers: dict[str, str] | None = None):
    method, path, body = CALLS[call]
    return h.client.request(method, path, json=body, headers=headers or {})


@pytest.mark.parametrize("role,call,status,rule", MATRIX, ids=[f"{r}-{c}" for r, c, *_ in MATRIX])
def test_role_endpoint_action(shared: Harness, role: str, call: str, status: int, rule: str):
    r = _call(shared, call, shared.auth(role, subject=f"{role}-7", ward="cardio"))
    assert r.status_code == status, r.text
    if status == 403:
        body = r.json()
        assert body["rule"] == rule and body["decision"] == "deny" and rule in body["detail"]
    last = [e for e in shared.audit_entries() if e.details.get("stage") == "authz"][-1]
    assert last.subject == f"{role}-7"
    assert last.details["rule"] == rule
    assert last.details["decision"] == ("permit" if status == 200 else "deny")
    assert last.details["role"] == role


def test_full_record_and_nursing_view_contents(harness: Harness):
    full = harness.client.get(f"/records/{P}", headers=harness.auth("doctor")).json()
    assert full["name"] == "Jane Roe" and full["diagnosis"] == "stable angina" and full["cholesterol"] == 241
    view = harness.client.get(f"/nursing/{P}", headers=harness.auth("nurse")).json()
    # de-identified: no direct identifiers, no birth date, no physician-only content; age generalised
    for hidden in ("name", "birth_date", "diagnosis", "physician_notes", "cholesterol", "st_depression", "chest_pain"):
        assert hidden not in view
    assert view["age_band"] == "60-69"  # born 1958-03-14, seen 2026-11-25
    assert view["allergies"] == ["penicillin"] and view["care_notes"] == "fall risk at night"
    assert "Jane" not in str(view)


def test_updates_are_stored_and_versioned(harness: Harness):
    doc = harness.auth("doctor")
    r = harness.client.patch(f"/records/{P}", json={"medications": ["aspirin 100 mg", "bisoprolol 5 mg"]}, headers=doc)
    assert r.status_code == 200 and r.json()["version"] == 2
    assert harness.gw.store.get(P).medications == ["aspirin 100 mg", "bisoprolol 5 mg"]
    r = harness.client.put("/records/new-0003", json=record_body("icu"), headers=doc)
    assert r.status_code == 200 and r.json()["version"] == 1
    writes = [e for e in harness.audit_entries() if e.details.get("stage") == "write"]
    assert [w.details["pseudonym"] for w in writes] == [P, "new-0003"]
    assert writes[0].details["fields"] == ["medications"]


def test_denied_update_changes_nothing(harness: Harness):
    before = harness.gw.store.get(P)
    r = harness.client.patch(f"/records/{P}", json={"care_notes": "x"}, headers=harness.auth("nurse"))
    assert r.status_code == 403
    assert harness.gw.store.get(P) == before


def test_predict_returns_model_risk_and_card(shared: Harness):
    r = shared.client.post("/predict", json={"features": FEATS}, headers=shared.auth("ai-model"))
    assert r.status_code == 200
    body = r.json()
    w, b = shared.params[:13], shared.params[13]
    x = np.array([FEATS[f] for f in FEATURES], dtype=np.float32)
    expected = 1.0 / (1.0 + np.exp(-(float(w @ x) + float(b))))
    assert body["risk"] == pytest.approx(expected, rel=1e-5)
    assert body["positive"] == (expected >= 0.5)
    card = body["model"]
    assert card["training_sites"] == ["cleveland", "hungary", "switzerland", "va-long-beach"]
    assert card["rounds"] == 20 and card["epsilon"] == 2.5 and card["delta"] == 1e-5
    assert card["features"] == list(FEATURES)


def test_no_model_loaded_is_503_after_authorization(tmp_path):
    h = make_harness(tmp_path, model=False)
    assert h.client.post("/predict", json={"features": {}}, headers=h.auth("ai-model")).status_code == 503
    assert h.client.get("/model", headers=h.auth("nurse")).status_code == 503
    assert h.client.get("/health").json() == {"status": "ok", "model_loaded": False}


@pytest.mark.parametrize("features,field", [
    ({k: v for k, v in FEATS.items() if k != "chol"}, "body.features.chol"),
    ({**FEATS, "name": 1.0}, "body.features.name"),
    ({**FEATS, "age": "old"}, "body.features.age"),
    ({**FEATS, "oldpeak": 1e9}, "body.features.oldpeak"),
])
def test_predict_malformed_vector_is_422_naming_field(shared: Harness, features, field):
    r = shared.client.post("/predict", json={"features": features}, headers=shared.auth("ai-model"))
    assert r.status_code == 422
    assert r.json()["field"] == field and field in r.json()["detail"]


def test_predict_rejects_nan_and_infinity(shared: Harness):
    raw = '{"features": {' + ", ".join(f'"{f}": {"NaN" if f == "age" else "0.1"}' for f in FEATURES) + "}}"
    r = shared.client.post("/predict", content=raw, headers={**shared.auth("ai-model"), "content-type": "application/json"})
    assert r.status_code == 422 and r.json()["field"] == "body.features.age"


@pytest.mark.parametrize("body,field", [
    ({"resting_bp": 900}, "body.resting_bp"),
    ({"ward": None}, "body.ward"),
    ({"sex": "unknown"}, "body.sex"),
    ({"password": "x"}, "body.password"),
    ({}, "body"),
])
def test_patch_malformed_is_422_naming_field(shared: Harness, body, field):
    r = shared.client.patch(f"/records/{P}", json=body, headers=shared.auth("doctor"))
    assert r.status_code == 422, r.text
    assert r.json()["field"] == field


def test_bad_pseudonym_is_422_and_unknown_is_404(shared: Harness):
    doc = shared.auth("doctor")
    r = shared.client.get("/records/a b", headers=doc)
    assert r.status_code == 422 and r.json()["field"] == "path.pseudonym"
    assert shared.client.get("/records/nobody-0009", headers=doc).status_code == 404
    # a role that may not read records gets 403, not 404: existence is not disclosed
    assert shared.client.get("/records/nobody-0009", headers=shared.auth("ai-model")).status_code == 403


def test_authorization_happens_before_body_validation(shared: Harness):
    r = shared.client.put(f"/records/{P}", json={"garbage": True}, headers=shared.auth("ai-model"))
    assert r.status_code == 403 and r.json()["rule"] == "agent-never-records"


def test_health_and_openapi_need_no_credentials(shared: Harness):
    assert shared.client.get("/health").json() == {"status": "ok", "model_loaded": True}
    spec = shared.client.get("/openapi.json").json()
    assert {"/records/{pseudonym}", "/nursing/{pseudonym}", "/predict", "/model", "/health"} <= set(spec["paths"])
    feats = spec["components"]["schemas"]["Features"]
    assert feats["required"] == list(FEATURES) and feats["additionalProperties"] is False


def test_audit_log_holds_allowed_and_denied_and_verifies(harness: Harness):
    harness.client.get(f"/records/{P}", headers=harness.auth("doctor", subject="dr-a"))
    harness.client.get(f"/records/{P}", headers=harness.auth("ai-model", subject="bot-b"))
    harness.client.get(f"/records/{P}")
    entries = harness.audit_entries()
    kinds = [(e.subject, e.details["stage"], e.details["decision"]) for e in entries]
    assert kinds == [("dr-a", "authz", "permit"), ("bot-b", "authz", "deny"), ("anonymous", "authn", "deny")]
    assert entries[0].details["pseudonym"] == P and entries[0].details["ward"] == "cardio"
    assert all(e.action.value == "gateway.decision" for e in entries)
    assert harness.verify_audit().ok


def test_audit_failure_refuses_service(harness: Harness):
    class Broken:
        def append(self, *a, **k):
            raise OSError("disk full")

    harness.gw.audit = Broken()
    r = harness.client.get(f"/records/{P}", headers=harness.auth("doctor"))
    assert r.status_code == 503 and "audit" in r.json()["detail"]


def test_oversized_body_is_413_before_parsing(shared: Harness):
    big = {"features": FEATS, "pad": "x" * 70_000}
    r = shared.client.post("/predict", json=big, headers=shared.auth("ai-model"))
    assert r.status_code == 413

    def chunks():  # no Content-Length: counted while streaming
        yield b'{"features": {'
        for _ in range(2000):
            yield b'"x": 1.0, ' * 10
    r = shared.client.post("/predict", content=chunks(), headers={**shared.auth("ai-model"), "content-type": "application/json"})
    assert r.status_code == 413
