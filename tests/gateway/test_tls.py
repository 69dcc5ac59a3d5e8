"""A real `insitu gateway serve` process on 127.0.0.1: TLS 1.3 only, tokens and client certificates."""
from __future__ import annotations

import shutil
import ssl
import subprocess

import httpx
import pytest

from insitu.net.pki import CertificateAuthority, Role
from ._deploy import make_deployment, seed_records, start_server, stop_server
from .support import FEATS


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    dep = make_deployment(tmp_path_factory.mktemp("deploy"))
    seed_records(dep)
    proc = start_server(dep)
    yield dep
    stop_server(proc)


def _s_client(port: int, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "localhost", *flags],
                          input="", capture_output=True, text=True, timeout=20)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl binary not installed")
def test_openssl_tls12_refused_tls13_accepted(deployed):
    old = _s_client(deployed.port, "-tls1_2")
    # the server aborts the handshake: no certificate sent, no cipher agreed, s_client exits non-zero
    assert old.returncode != 0
    assert "no peer certificate available" in old.stdout and "Cipher is (NONE)" in old.stdout
    new = _s_client(deployed.port, "-tls1_3", "-CAfile", str(deployed.ca_pem))
    assert new.returncode == 0, new.stderr
    assert "TLSv1.3" in new.stdout and "Verify return code: 0 (ok)" in new.stdout


def test_python_tls12_client_refused(deployed):
    ctx = deployed.client_context()
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"https://127.0.0.1:{deployed.port}/health", verify=ctx)


def test_token_over_tls(deployed):
    token = deployed.cli("token", "--role", "doctor", "--subject", "dr-who", "--ttl", "5m")
    url = f"https://127.0.0.1:{deployed.port}"
    with httpx.Client(base_url=url, verify=deployed.client_context()) as c:
        assert c.get("/records/cardio-0001").status_code == 401
        r = c.get("/records/cardio-0001", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200 and r.json()["name"] == "Jane Roe"
        nurse = deployed.cli("token", "--role", "nurse", "--subject", "nurse-ann", "--ttl", "5m")
        r = c.get("/records/cardio-0001", headers={"Authorization": f"Bearer {nurse}"})
        assert r.status_code == 403 and r.json()["rule"] == "nurse-no-full-record"


def test_client_certificate_is_an_alternative_to_tokens(deployed):
    url = f"https://127.0.0.1:{deployed.port}"
    agent = deployed.issue_client("agent-triage")
    with httpx.Client(base_url=url, verify=deployed.client_context(agent)) as c:
        r = c.post("/predict", json={"features": FEATS})
        assert r.status_code == 200 and 0.0 < r.json()["risk"] < 1.0
        r = c.get("/records/cardio-0001")
        assert r.status_code == 403 and r.json()["rule"] == "agent-never-records"
    doctor = deployed.issue_client("dr-house")
    with httpx.Client(base_url=url, verify=deployed.client_context(doctor)) as c:
        assert c.get("/records/cardio-0001").status_code == 200
    stranger = deployed.issue_client("not-enrolled")  # valid CA certificate, but no gateway attributes
    with httpx.Client(base_url=url, verify=deployed.client_context(stranger)) as c:
        r = c.get("/model")
        assert r.status_code == 401 and "not enrolled" in r.json()["detail"]


def test_certificate_from_another_ca_fails_the_handshake(deployed, tmp_path):
    rogue_ca = CertificateAuthority.init(tmp_path / "rogue")
    rogue = rogue_ca.issue("agent-triage", Role.OPERATOR, tmp_path / "rogue-out")  # right name, wrong issuer
    with pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)):
        with httpx.Client(verify=deployed.client_context(rogue)) as c:
            c.post(f"https://127.0.0.1:{deployed.port}/predict", json={"features": FEATS})


def test_revoked_client_certificate_is_401(deployed):
    url = f"https://127.0.0.1:{deployed.port}"
    cert = deployed.issue_client("agent-nightly")
    with httpx.Client(base_url=url, verify=deployed.client_context(cert)) as c:
        assert c.get("/model").status_code == 200
    deployed.ca.revoke("agent-nightly")  # republishes ca/crl.pem; the gateway reloads it when it changes
    with httpx.Client(base_url=url, verify=deployed.client_context(cert)) as c:
        r = c.get("/model")
        assert r.status_code == 401 and "revoked" in r.json()["detail"]


def test_server_process_audited_mtls_and_token_decisions(deployed):
    from insitu.audit import AuditLog
    from insitu.audit.keys import load_public_keys

    log = AuditLog.read(deployed.dir / "audit.db")
    entries = list(log.entries())
    methods = {e.details.get("auth") for e in entries if e.details.get("stage") == "authz"}
    assert {"token", "mtls"} <= methods
    assert any(e.details.get("stage") == "authn" for e in entries)
    assert log.verify(load_public_keys(deployed.dir / "keys")).ok
