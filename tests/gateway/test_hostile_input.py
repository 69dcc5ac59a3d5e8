"""Hostile requests against the gateway: who is asked first, what is parsed, what is audited.

* credentials and the policy come before the body on every body route: a malformed body from
  no token, a garbage token or a denied role gets 401/403 (audited), never 400/422;
* a permitted caller's malformed body gets 400/413/415/422 naming the problem, and an audit entry;
* types are strict (``true`` is not a number, ``0`` not a boolean, ``false`` not a string);
* every refused request, on any path, leaves exactly one entry explaining it;
* the OpenAPI spec documents every status and limit; 405 lists every method of the path.
"""
from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from .support import FEATS, Harness, make_harness, record_body

P = "cardio-0001"
JSON = {"content-type": "application/json"}

#: (name, raw body, content type) — each malformed in one way
BAD_BODIES = [
    ("not JSON", b"{features: 1", "application/json"),
    ("non-UTF-8", b'{"features": {"age": "\xff\xfe"}}', "application/json"),
    ("UTF-16", json.dumps({"features": FEATS}).encode("utf-16"), "application/json"),
    ("nested 40 deep", b'{"features": {"age": ' + b"[" * 40 + b"]" * 40 + b"}}", "application/json"),
    ("nested 30,000 deep", b'{"features": ' + b"[" * 30_000 + b"]" * 30_000 + b"}", "application/json"),
    ("duplicate key", b'{"features": {"age": 0.1}, "features": {"age": 0.2}}', "application/json"),
    ("20,000 elements", json.dumps({"features": {"age": [0] * 20_000}}).encode(), "application/json"),
    ("form encoded", b"features=1", "application/x-www-form-urlencoded"),
    ("no content type", json.dumps({"features": FEATS}).encode(), ""),
    ("empty", b"", "application/json"),
]
#: what a permitted caller gets for each: (status, words the detail must contain)
EXPECTED = {
    "not JSON": (400, "request body is not valid JSON: Expecting property name enclosed in double quotes at line 1 column 2"),
    "non-UTF-8": (400, "request body is not UTF-8: byte 0xff at offset 22"),
    "UTF-16": (400, "request body is not UTF-8: byte 0xff at offset 0"),
    "nested 40 deep": (400, "request body nests deeper than 32 levels at features.age" + "[0]" * 29),
    "nested 30,000 deep": (400, "request body nests deeper than 32 levels"),
    "duplicate key": (400, "key 'features' appears twice in one object"),
    "20,000 elements": (400, "request body has more than 10000 elements (limit reached at features.age["),
    "form encoded": (415, "content type 'application/x-www-form-urlencoded' is not application/json"),
    "no content type": (415, "content type None is not application/json"),
    "empty": (422, "a JSON object (PredictRequest) is required"),
}
BODY_ROUTES = [("PUT", f"/records/{P}", "nurse"), ("PATCH", f"/records/{P}", "nurse"), ("POST", "/predict", "doctor")]


def send(h: Harness, method: str, path: str, raw: bytes, ctype: str, headers: dict[str, str] | None = None):
    hdrs = {**({"content-type": ctype} if ctype else {}), **(headers or {})}
    return h.client.request(method, path, content=raw, headers=hdrs)


def new_entries(h: Harness, before: int) -> list:
    return h.audit_entries()[before:]


@pytest.mark.parametrize("method,path,denied_role", BODY_ROUTES, ids=[f"{m} {p}" for m, p, _ in BODY_ROUTES])
def test_credentials_and_policy_come_before_the_body(harness: Harness, method, path, denied_role):
    """10 malformed bodies x 3 callers (none, garbage token, denied role) on each body route."""
    callers = [("no token", {}, 401), ("garbage token", {"Authorization": "Bearer not-a-token"}, 401),
               (denied_role, harness.auth(denied_role, ward="cardio"), 403)]
    for name, raw, ctype in BAD_BODIES:
        for who, headers, status in callers:
            before = len(harness.audit_entries())
            r = send(harness, method, path, raw, ctype, headers)
            assert r.status_code == status, (name, who, r.status_code, r.text)
            (entry,) = new_entries(harness, before)  # exactly one entry: the refused credential or decision
            assert entry.details["stage"] == ("authn" if status == 401 else "authz") and entry.details["decision"] == "deny"
    assert harness.gw.store.get(P).version == 1  # nothing was written
    assert harness.verify_audit().ok


@pytest.mark.parametrize("name,raw,ctype", BAD_BODIES, ids=[b[0] for b in BAD_BODIES])
def test_permitted_caller_gets_the_problem_named_and_audited(shared: Harness, name, raw, ctype):
    status, words = EXPECTED[name]
    before = len(shared.audit_entries())
    r = send(shared, "POST", "/predict", raw, ctype, shared.auth("ai-model", subject="bot-9"))
    assert r.status_code == status, r.text
    assert words in r.json()["detail"] and r.json()["field"] == "body"
    permit, outcome = new_entries(shared, before)
    assert permit.details["stage"] == "authz" and permit.details["decision"] == "permit"
    assert outcome.subject == "bot-9" and outcome.details["stage"] == "outcome"
    assert outcome.details["status"] == status and outcome.details["decision"] == "refuse"
    assert words in outcome.details["reason"] and outcome.details["field"] == "body"


def test_malformed_bodies_on_record_routes(harness: Harness):
    doc = harness.auth("doctor")
    for method in ("PUT", "PATCH"):
        for name, raw, ctype in BAD_BODIES:
            r = send(harness, method, f"/records/{P}", raw, ctype, doc)
            status, words = EXPECTED[name]
            assert r.status_code == status, (method, name, r.text)
            assert words.replace("PredictRequest", "RecordBody" if method == "PUT" else "RecordPatch") in r.json()["detail"]
    assert harness.gw.store.get(P).version == 1


# -- strict types ----------------------------------------------------------------------------------

STRICT_PUT = [
    ("resting_bp", True, "Input should be a valid integer"),
    ("resting_bp", "138", "Input should be a valid integer"),
    ("exercise_angina", 0, "Input should be a valid boolean"),
    ("fasting_blood_sugar_high", "false", "Input should be a valid boolean"),
    ("name", 0, "Input should be a valid string"),
    ("ward", False, "Input should be a valid string"),
    ("sex", False, "Input should be 'female' or 'male'"),
    ("chest_pain", 1, "Input should be"),
    ("st_depression", True, "Input should be a valid number"),
    ("st_depression", "1.4", "Input should be a valid number"),
    ("medications", "aspirin", "Input should be a valid array"),
    ("birth_date", 19580314, "a date YYYY-MM-DD"),
    ("birth_date", "1958-03-14T00:00:00", "a date YYYY-MM-DD"),
    ("birth_date", "1899-12-31", "a date YYYY-MM-DD"),
    ("birth_date", "1900-02-29", "a date YYYY-MM-DD"),  # not a leap year
]


@pytest.mark.parametrize("field,value,message", STRICT_PUT, ids=[f"{f}={v!r}" for f, v, _ in STRICT_PUT])
def test_strict_types_on_put(shared: Harness, field, value, message):
    r = shared.client.put(f"/records/{P}", json={**record_body("cardio"), field: value}, headers=shared.auth("doctor"))
    assert r.status_code == 422, r.text
    assert r.json()["field"] == f"body.{field}" and message in r.json()["detail"]


@pytest.mark.parametrize("value", [True, False, "0.5", None, [0.5], {"v": 0.5}])
def test_predict_feature_must_be_a_number(shared: Harness, value):
    r = shared.client.post("/predict", json={"features": {**FEATS, "age": value}}, headers=shared.auth("ai-model"))
    assert r.status_code == 422 and r.json()["field"] == "body.features.age", r.text


def test_integral_numbers_and_leap_days_are_accepted(harness: Harness):
    # JSON Schema calls 138.0 an integer; 2000-02-29 existed
    body = record_body("cardio", resting_bp=138.0, birth_date="2000-02-29")
    r = harness.client.put(f"/records/{P}", json=body, headers=harness.auth("doctor"))
    assert r.status_code == 200, r.text
    assert r.json()["resting_bp"] == 138 and r.json()["birth_date"] == "2000-02-29"
    r = harness.client.post("/predict", json={"features": {**FEATS, "age": 1}}, headers=harness.auth("ai-model"))
    assert r.status_code == 200  # an integer is a number


def test_empty_patch_is_422(shared: Harness):
    r = shared.client.patch(f"/records/{P}", json={}, headers=shared.auth("doctor"))
    assert r.status_code == 422 and r.json()["field"] == "body" and "at least one field" in r.json()["detail"]


# -- every request audited ---------------------------------------------------------------------------


def test_every_refused_request_leaves_one_entry(harness: Harness):
    doc = harness.auth("doctor", subject="dr-z")
    refused = [
        # (what, request kwargs, status, reason words, subject)
        ("413 by Content-Length", dict(method="POST", url="/predict", content=b"x" * 70_000, headers=JSON), 413,
         "larger than 65536 bytes", "anonymous"),
        ("413 streamed", dict(method="PUT", url=f"/records/{P}", content=iter([b"x" * 40_000, b"y" * 40_000]), headers=JSON), 413,
         "larger than 65536 bytes", "anonymous"),
        ("unknown path", dict(method="GET", url="/admin", headers=doc), 404, "Not Found", "anonymous"),
        ("unknown method", dict(method="DELETE", url=f"/records/{P}", headers=doc), 405, "Method Not Allowed", "anonymous"),
        ("OPTIONS", dict(method="OPTIONS", url="/predict"), 405, "Method Not Allowed", "anonymous"),
        ("POST /health", dict(method="POST", url="/health"), 405, "Method Not Allowed", "anonymous"),
        ("bad pseudonym", dict(method="GET", url="/records/a%20b", headers=doc), 422, "invalid path.pseudonym", "dr-z"),
        ("missing record", dict(method="GET", url="/records/nobody-0009", headers=doc), 404, "no record with pseudonym nobody-0009", "dr-z"),
        ("patch missing record", dict(method="PATCH", url="/records/nobody-0009", json={"care_notes": "x"}, headers=doc), 404,
         "no record with pseudonym", "dr-z"),
    ]
    for what, kwargs, status, words, subject in refused:
        before = len(harness.audit_entries())
        r = harness.client.request(**kwargs)
        assert r.status_code == status, (what, r.text)
        outcomes = [e for e in new_entries(harness, before) if e.details["stage"] == "outcome"]
        assert len(outcomes) == 1, (what, new_entries(harness, before))
        (entry,) = outcomes
        assert entry.subject == subject and entry.details["status"] == status, what
        assert words in entry.details["reason"], (what, entry.details)
        assert entry.details["method"] == kwargs["method"]
    # public, successful requests are not logged
    before = len(harness.audit_entries())
    assert harness.client.get("/health").status_code == 200 and harness.client.get("/openapi.json").status_code == 200
    assert len(harness.audit_entries()) == before
    assert harness.verify_audit().ok


def test_permitted_requests_keep_one_entry_each(harness: Harness):
    before = len(harness.audit_entries())
    for _ in range(5):
        assert harness.client.post("/predict", json={"features": FEATS}, headers=harness.auth("ai-model")).status_code == 200
    assert len(harness.audit_entries()) - before == 5  # the decision only: no duplicate outcome entry


def test_server_error_is_audited_before_the_500(tmp_path):
    h = make_harness(tmp_path)

    class BrokenStore:
        def ward_of(self, pseudonym):
            raise RuntimeError("database on fire")

    h.gw.store = BrokenStore()  # type: ignore[assignment]
    client = TestClient(h.client.app, raise_server_exceptions=False)
    r = client.get(f"/records/{P}", headers=h.auth("doctor", subject="dr-q"))
    assert r.status_code == 500
    (entry,) = h.audit_entries()
    assert entry.subject == "dr-q" and entry.details["status"] == 500 and entry.details["stage"] == "outcome"


def test_unauditable_refusal_becomes_503(harness: Harness):
    class Broken:
        def append(self, *a, **k):
            raise OSError("disk full")

    harness.gw.audit = Broken()
    r = harness.client.get("/no-such-route")
    assert r.status_code == 503 and "audit log unavailable" in r.json()["detail"]
    r = harness.client.post("/predict", content=b"x" * 70_000, headers=JSON)
    assert r.status_code == 503


# -- OpenAPI and Allow -------------------------------------------------------------------------------


def test_allow_header_lists_every_method_of_the_path(shared: Harness):
    r = shared.client.options(f"/records/{P}")
    assert r.status_code == 405 and r.headers["allow"] == "GET, PATCH, PUT"
    assert shared.client.delete(f"/records/{P}").headers["allow"] == "GET, PATCH, PUT"
    assert shared.client.options("/predict").headers["allow"] == "POST"
    assert shared.client.post("/model").headers["allow"] == "GET"


def test_openapi_documents_every_status_body_and_limit(shared: Harness):
    spec = shared.client.get("/openapi.json").json()
    assert "65536 bytes" in spec["info"]["description"] and "32 levels" in spec["info"]["description"]
    schemas = spec["components"]["schemas"]
    for path, method, model in ((f"/records/{{pseudonym}}", "put", "RecordBody"),
                                (f"/records/{{pseudonym}}", "patch", "RecordPatch"), ("/predict", "post", "PredictRequest")):
        op = spec["paths"][path][method]
        assert op["requestBody"]["content"]["application/json"]["schema"] == {"$ref": f"#/components/schemas/{model}"}
        assert "65536 bytes" in op["requestBody"]["description"]
        assert {"400", "401", "403", "413", "415", "422", "503"} <= set(op["responses"]), (method, path)
        assert model in schemas
    for path, method in ((f"/records/{{pseudonym}}", "get"), ("/nursing/{pseudonym}", "get"), ("/model", "get")):
        assert {"401", "403", "413", "422", "503"} <= set(spec["paths"][path][method]["responses"])
    assert schemas["RecordPatch"]["minProperties"] == 1
    assert schemas["RecordBody"]["properties"]["birth_date"]["pattern"].startswith("^")
    assert schemas["Features"]["required"] and schemas["Features"]["additionalProperties"] is False
