"""The coordinator's web dashboard, over HTTPS against a real-process consortium on 127.0.0.1.

Who gets in (operator certificate, or a one-time login link minted with it) and who does not
(a site certificate, even beside an operator's session; a revoked operator; an anonymous visitor;
TLS 1.2), CSRF on state changes, the live stream, submit and cancel, the model download and the
audit chain it is signed into.  The browser test (test_browser.py) drives the same pages in Chromium.
"""
from __future__ import annotations

import io
import json
import ssl
import zipfile

import httpx
import numpy as np
import pytest

from insitu.coordinator.jobs import JobSpec
from insitu.net.pki import Credentials, Role

pytestmark = pytest.mark.slow

HEART = {"name": "dash-heart", "dataset": "heart", "rounds": 3, "seed": 0, "min_sites": 3, "round_timeout": 60.0}
SITES = ("cleveland", "hungary", "switzerland")


@pytest.fixture(scope="module")
def dep(tmp_path_factory, dashboard_deployment):
    h = JobSpec.from_dict(HEART).plan.content_hash()
    yield from dashboard_deployment(tmp_path_factory.mktemp("dash-consortium"), SITES, {s: [h] for s in SITES})


def ctx(dep, creds: Credentials | None = None, *, tls12: bool = False) -> ssl.SSLContext:
    c = ssl.create_default_context(cafile=str(dep.root / "ca" / "ca.pem"))
    if creds is not None:
        c.load_cert_chain(str(creds.cert), str(creds.key))
    if tls12:
        c.maximum_version = ssl.TLSVersion.TLSv1_2
    return c


def client(dep, creds: Credentials | None = None) -> httpx.Client:
    return httpx.Client(base_url=dep.dash, verify=ctx(dep, creds), timeout=20, follow_redirects=False)


def login(dep) -> httpx.Client:
    url = dep.operator("login")["url"]
    c = client(dep)
    r = c.get(url[len(dep.dash):])
    assert r.status_code == 303 and r.headers["location"] == "/"
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "Secure" in cookie and "SameSite=Strict" in cookie
    return c


def test_anonymous_visitor_and_tls12_refused(dep):
    with client(dep) as c:
        r = c.get("/")
        assert r.status_code == 401 and "insitu coordinator login" in r.text and "<script" not in r.text
        assert c.get("/api/overview").status_code == 401
        assert c.get("/static/dashboard.js").status_code == 401  # not even the assets
        assert c.get("/api/stream").status_code == 401
    with pytest.raises(httpx.ConnectError):
        httpx.get(dep.dash + "/", verify=ctx(dep, tls12=True))


def test_site_certificate_refused_even_with_an_operator_session(dep):
    site = dep.creds("cleveland")
    with client(dep, site) as c:
        for path in ("/", "/api/overview", "/static/insitu.js"):
            r = c.get(path)
            assert r.status_code == 403 and "role site" in r.text, (path, r.text)
        assert c.post("/api/jobs", json={"toml": 'name = "x"'}, headers={"X-Insitu-CSRF": "x"}).status_code == 403
    op = login(dep)
    cookie = op.cookies.get("insitu_session")
    with client(dep, site) as c:
        c.cookies.set("insitu_session", cookie)
        assert c.get("/api/overview").status_code == 403


def test_operator_certificate_sees_the_consortium(dep):
    with client(dep, dep.creds("ops")) as c:
        r = c.get("/")
        assert r.status_code == 200 and "/static/dashboard.js" in r.text
        csp = r.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and r.headers["x-content-type-options"] == "nosniff"
        assert c.get("/api/session").json() == {"operator": "ops", "via": "certificate", "csrf": "certificate"}
        ov = c.get("/api/overview").json()
        assert [s["site"] for s in ov["sites"]] == sorted(SITES) and all(s["online"] for s in ov["sites"])
        assert all(s["cert_not_after"] > ov["now"] for s in ov["sites"]) and ov["audit"]["configured"]
        for asset in ("dashboard.js", "insitu.js", "insitu.css"):
            body = c.get(f"/static/{asset}").text
            assert "http://" not in body.replace("http://www.w3.org/2000/svg", "") and "https://" not in body  # nothing from a CDN
        assert c.get("/static/..%2F..%2Fdashboard.py").status_code == 404


def test_login_link_works_once_and_state_changes_need_the_csrf_header(dep):
    url = dep.operator("login")["url"]
    path = url[len(dep.dash):]
    c = login(dep)
    s = c.get("/api/session").json()
    assert s["operator"] == "ops" and s["via"] == "login" and len(s["csrf"]) > 20
    with client(dep) as again:
        assert again.get(path).status_code == 303  # the fresh link
        assert again.get(path).status_code == 401  # used: refused
    toml = 'name = "dash-heart"\ndataset = "heart"\nrounds = 3\nmin_sites = 3\n'
    r = c.post("/api/jobs", json={"toml": toml})
    assert r.status_code == 403 and "X-Insitu-CSRF" in r.json()["error"]
    r = c.post("/api/jobs", json={"toml": toml}, headers={"X-Insitu-CSRF": s["csrf"], "Origin": "https://evil.example"})
    assert r.status_code == 403 and "cross-origin" in r.json()["error"]
    r = c.post("/api/jobs", json={"toml": "name = "}, headers={"X-Insitu-CSRF": s["csrf"]})
    assert r.status_code == 400 and "does not parse" in r.json()["error"]
    r = c.post("/api/jobs", json={"toml": toml}, headers={"X-Insitu-CSRF": s["csrf"]})
    assert r.status_code == 201 and r.json()["id"] == "dash-heart", r.text
    st = dep.wait_job("dash-heart", timeout=120)
    assert st["status"] == "done" and st["submitted_by"] == "ops"
    c.post("/api/logout", headers={"X-Insitu-CSRF": s["csrf"]})
    assert c.get("/api/overview").status_code == 401


def test_live_stream_sends_the_state(dep):
    with client(dep, dep.creds("ops")) as c:
        with c.stream("GET", "/api/stream", params={"job": "dash-heart"}) as r:
            assert r.headers["content-type"] == "text/event-stream"
            lines = []
            for line in r.iter_lines():
                lines.append(line)
                if line.startswith("data: "):
                    break
    assert "event: state" in lines
    state = json.loads(lines[-1][len("data: "):])
    assert state["job"]["id"] == "dash-heart" and state["job"]["status"] == "done"
    assert len(state["job"]["rounds"]) == 3 and {j["id"] for j in state["overview"]["jobs"]} >= {"dash-heart"}


def test_model_download_is_a_run_directory_signed_into_the_audit_chain(dep, tmp_path):
    with client(dep, dep.creds("ops")) as c:
        r = c.get("/api/jobs/dash-heart/model")
        assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
        assert 'filename="dash-heart-v3.zip"' in r.headers["content-disposition"]
        with zipfile.ZipFile(io.BytesIO(r.content)) as z:
            z.extractall(tmp_path)
        run = tmp_path / "dash-heart-v3"
        assert sorted(p.name for p in run.iterdir()) == ["model.npz", "plan.json", "rounds.jsonl", "summary.json", "task.json"]
        from insitu.compress.export import load_run_model

        model, task = load_run_model(run)
        assert task == JobSpec.from_dict(HEART).task
        with np.load(run / "model.npz") as z:
            assert z["params"].shape == (14,)
        # the release is in the coordinator's audit chain, which verifies; the page shows its state
        audit = c.get("/api/overview").json()["audit"]
        assert audit["ok"] is True and audit["entries"] >= 1 and audit["writers"] == ["coordinator"]
    from insitu.audit import AuditLog
    from insitu.audit.keys import load_public_keys

    with AuditLog.read(dep.root / "audit.db") as log:
        assert log.verify(load_public_keys(dep.root / "keys")).ok
        entries = list(log.entries())
    assert entries[-1].action.value == "model.release" and entries[-1].subject == "dash-heart"
    assert entries[-1].details["operator"] == "ops" and len(entries[-1].details["params_sha256"]) == 64
    with client(dep, dep.creds("ops")) as c:
        assert c.get("/api/jobs/no-such-job/model").status_code == 400


def test_cancel_a_waiting_job(dep):
    c = login(dep)
    csrf = c.get("/api/session").json()["csrf"]
    toml = 'name = "never"\ndataset = "heart"\nrounds = 2\nmin_sites = 3\nlr = 0.0777\n'  # no site approved this plan
    assert c.post("/api/jobs", json={"toml": toml}, headers={"X-Insitu-CSRF": csrf}).status_code == 201
    dep.wait_job("never", until=("waiting",), timeout=60)
    job = c.get("/api/jobs/never").json()
    assert job["status"] == "waiting" and sorted(job["approval"]["waiting"]) == sorted(SITES)
    r = c.post("/api/jobs/never/cancel", headers={"X-Insitu-CSRF": csrf})
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    assert dep.wait_job("never", timeout=30)["status"] == "cancelled"


def test_revoked_operator_refused(dep, tmp_path):
    ca = dep.ca
    creds = ca.issue("ops-2", Role.OPERATOR, tmp_path / "ops2")
    with client(dep, creds) as c:
        assert c.get("/api/session").json()["operator"] == "ops-2"
    ca.revoke("ops-2")
    with pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)):
        with client(dep, creds) as c:
            c.get("/api/session")
