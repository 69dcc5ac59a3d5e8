"""Tokens: issue/verify, and every way a token can be bad gives 401 (audited)."""
from __future__ import annotations

import base64
import datetime as dt
import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from .support import ISSUER, T0, Harness
from insitu.errors import AuthError, ConfigError
from insitu.gateway.policy import Role
from insitu.gateway.tokens import TokenIssuer, TokenVerifier, parse_ttl

P = "cardio-0001"


def test_token_roundtrip_carries_claims():
    key = Ed25519PrivateKey.generate()
    tok = TokenIssuer(key, ISSUER, dt.timedelta(hours=12)).issue("nurse-ann", "nurse", dt.timedelta(hours=8),
                                                                ward="cardio", shift="07:00-19:00", now=T0)
    c = TokenVerifier(key.public_key(), ISSUER, dt.timedelta(hours=12)).verify(tok, T0 + dt.timedelta(hours=1))
    assert (c.subject, c.role, c.ward, c.shift) == ("nurse-ann", Role.NURSE, "cardio", "07:00-19:00")
    assert c.expires_at - c.issued_at == 8 * 3600


def test_issuer_refuses_bad_requests():
    iss = TokenIssuer(Ed25519PrivateKey.generate(), ISSUER, dt.timedelta(hours=12))
    with pytest.raises(ConfigError, match="lifetime"):
        iss.issue("a", "nurse", dt.timedelta(hours=13))
    with pytest.raises(ConfigError, match="role"):
        iss.issue("a", "admin", dt.timedelta(hours=1))
    with pytest.raises(ConfigError, match="shift"):
        iss.issue("a", "nurse", dt.timedelta(hours=1), shift="7-19")
    with pytest.raises(ConfigError, match="subject"):
        iss.issue("a b", "nurse", dt.timedelta(hours=1))
    assert parse_ttl("90s") == dt.timedelta(seconds=90) and parse_ttl("2d") == dt.timedelta(days=2)
    with pytest.raises(ConfigError):
        parse_ttl("8 hours")


def _tamper(token: str, **changes) -> str:
    prefix, payload, sig = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims.update(changes)
    new = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"{prefix}.{new}.{sig}"


def _bad_tokens(h: Harness) -> dict[str, str]:
    good = h.token("nurse", subject="nurse-ann")
    other_key = TokenIssuer(Ed25519PrivateKey.generate(), ISSUER, dt.timedelta(hours=12))
    other_issuer = TokenIssuer(h.issuer.key, "another-gateway", dt.timedelta(hours=12))
    long_lived = TokenIssuer(h.issuer.key, ISSUER, dt.timedelta(days=30))
    return {
        "forged-other-key": other_key.issue("dr-evil", "doctor", dt.timedelta(hours=1), now=h.clock()),
        "role-escalated-payload": _tamper(good, role="doctor"),
        "ward-changed-payload": _tamper(good, ward="icu"),
        "signature-stripped": good.rsplit(".", 1)[0] + ".",
        "other-issuer": other_issuer.issue("dr-x", "doctor", dt.timedelta(hours=1), now=h.clock()),
        "too-long-lived": long_lived.issue("dr-x", "doctor", dt.timedelta(days=20), now=h.clock()),
        "garbage": "not-a-token",
        "huge": "insitu1." + "A" * 5000 + ".A",
    }


def test_every_bad_token_is_401_and_audited(harness: Harness):
    bad = _bad_tokens(harness)
    for name, tok in bad.items():
        r = harness.client.get(f"/nursing/{P}", headers={"Authorization": f"Bearer {tok}"})
        assert r.status_code == 401, name
        assert r.headers["www-authenticate"] == "Bearer"
    entries = harness.audit_entries()
    assert len(entries) == len(bad)
    assert all(e.subject == "anonymous" and e.details["stage"] == "authn" and e.details["decision"] == "deny" for e in entries)
    assert "signature does not verify" in entries[0].details["reason"]


def test_expired_token_is_401(harness: Harness):
    tok = harness.token("doctor", ttl=dt.timedelta(minutes=15))
    h = {"Authorization": f"Bearer {tok}"}
    harness.clock.now = T0 + dt.timedelta(minutes=14, seconds=59)
    assert harness.client.get(f"/records/{P}", headers=h).status_code == 200
    harness.clock.now = T0 + dt.timedelta(minutes=15)
    r = harness.client.get(f"/records/{P}", headers=h)
    assert r.status_code == 401 and "expired" in r.json()["detail"]


def test_token_from_the_future_is_401(harness: Harness):
    tok = harness.issuer.issue("dr-x", "doctor", dt.timedelta(hours=1), now=T0 + dt.timedelta(hours=2))
    r = harness.client.get(f"/records/{P}", headers={"Authorization": f"Bearer {tok}"})
    assert r.status_code == 401 and "not valid yet" in r.json()["detail"]


@pytest.mark.parametrize("header", [None, "Basic ZG9jOnB3", "Bearer", "Token abc"])
def test_missing_or_wrong_scheme_is_401(shared: Harness, header):
    for method, path in (("GET", f"/records/{P}"), ("GET", f"/nursing/{P}"), ("POST", "/predict"),
                         ("GET", "/model"), ("PATCH", f"/records/{P}")):
        r = shared.client.request(method, path, headers={"Authorization": header} if header else {})
        assert r.status_code == 401, (method, path, header)


def test_verifier_unit_errors_are_auth_errors():
    key = Ed25519PrivateKey.generate()
    v = TokenVerifier(key.public_key(), ISSUER, dt.timedelta(hours=1))
    for tok in ("", "a.b.c", "insitu1.%%%.AAAA", "insitu1..", "insitu1.e30.AAAA"):
        with pytest.raises(AuthError):
            v.verify(tok, T0)
