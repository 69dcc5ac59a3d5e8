"""Signed bearer tokens: who (subject), as what (role), where (ward, shift), until when.

A token is ``insitu1.<payload>.<signature>`` with base64url parts; the payload
is canonical JSON and the signature is Ed25519 over ``insitu1.<payload>``.
Ed25519 rather than HMAC so the gateway holds only the public key: whoever
can read the gateway's configuration still cannot mint tokens.  Every failure
(malformed, forged, expired, not yet valid, wrong issuer, too long-lived) is
one :class:`~insitu.errors.AuthError` whose message says which.
"""
from __future__ import annotations

import base64
import datetime as dt
import json
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from insitu.errors import AuthError, ConfigError, parse_choice
from insitu.gateway.policy import Role, parse_shift

PREFIX = "insitu1"
MAX_TOKEN_BYTES = 4096
SUBJECT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
WARD_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,31}$")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    if not re.fullmatch(r"[A-Za-z0-9_-]*", text):
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class Claims:
    subject: str
    role: Role
    issuer: str
    issued_at: int
    expires_at: int
    token_id: str
    ward: str | None = None
    shift: str | None = None

    def to_payload(self) -> dict[str, Any]:
        d = {"sub": self.subject, "role": self.role.value, "iss": self.issuer, "iat": self.issued_at,
             "exp": self.expires_at, "jti": self.token_id}
        if self.ward is not None:
            d["ward"] = self.ward
        if self.shift is not None:
            d["shift"] = self.shift
        return d


def validate_identity(subject: str, role: str | Role, ward: str | None, shift: str | None) -> Role:
    if not SUBJECT_RE.match(subject or ""):
        raise ConfigError(f"subject {subject!r} must be 1-64 letters, digits or . _ @ -")
    r = parse_choice(Role, role, "role")
    if ward is not None and not WARD_RE.match(ward):
        raise ConfigError(f"ward {ward!r} must be 1-32 letters, digits or . _ -")
    if shift is not None:
        parse_shift(shift)
    return r


def generate_keypair(private_path: str | Path, public_path: str | Path) -> None:
    """A fresh Ed25519 token-signing key (0600) and its public half for the gateway."""
    key = Ed25519PrivateKey.generate()
    priv = Path(private_path)
    priv.parent.mkdir(parents=True, exist_ok=True)
    import os

    fd = os.open(priv, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()))
    Path(public_path).write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                                serialization.PublicFormat.SubjectPublicKeyInfo))


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read token signing key {path}: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"token signing key {path} is not an Ed25519 key")
    return key


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read token verification key {path}: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"token verification key {path} is not an Ed25519 public key")
    return key


class TokenIssuer:
    """Mints tokens; lives with whoever administers users, not on the gateway host."""

    def __init__(self, key: Ed25519PrivateKey, issuer: str, max_ttl: dt.timedelta):
        self.key, self.issuer, self.max_ttl = key, issuer, max_ttl

    def issue(self, subject: str, role: str | Role, ttl: dt.timedelta, *, ward: str | None = None,
              shift: str | None = None, now: dt.datetime | None = None) -> str:
        r = validate_identity(subject, role, ward, shift)
        if ttl <= dt.timedelta(0) or ttl > self.max_ttl:
            raise ConfigError(f"token lifetime {ttl} must be positive and at most {self.max_ttl} (tokens.max_ttl)")
        t = int((now or dt.datetime.now(dt.timezone.utc)).timestamp())
        claims = Claims(subject, r, self.issuer, t, t + int(ttl.total_seconds()), secrets.token_hex(8), ward, shift)
        payload = _b64(json.dumps(claims.to_payload(), sort_keys=True, separators=(",", ":")).encode())
        signed = f"{PREFIX}.{payload}"
        return f"{signed}.{_b64(self.key.sign(signed.encode()))}"


class TokenVerifier:
    """Checks signature, issuer, validity window and lifetime; returns the claims."""

    def __init__(self, public_key: Ed25519PublicKey, issuer: str, max_ttl: dt.timedelta):
        self.key, self.issuer, self.max_ttl = public_key, issuer, max_ttl

    def verify(self, token: str, now: dt.datetime) -> Claims:
        if len(token) > MAX_TOKEN_BYTES:
            raise AuthError(f"token is {len(token)} bytes; at most {MAX_TOKEN_BYTES}")
        parts = token.split(".")
        if len(parts) != 3 or parts[0] != PREFIX:
            raise AuthError(f"token is not of the form {PREFIX}.<payload>.<signature>")
        try:
            sig = _unb64(parts[2])
            raw = _unb64(parts[1])
        except (ValueError, TypeError):
            raise AuthError("token parts are not base64url") from None
        try:
            self.key.verify(sig, f"{parts[0]}.{parts[1]}".encode())
        except InvalidSignature:
            raise AuthError("token signature does not verify: forged, altered, or signed by another issuer") from None
        try:
            p = json.loads(raw)
            claims = Claims(
                subject=str(p["sub"]), role=Role(p["role"]), issuer=str(p["iss"]), issued_at=int(p["iat"]),
                expires_at=int(p["exp"]), token_id=str(p["jti"]), ward=p.get("ward"), shift=p.get("shift"),
            )
            validate_identity(claims.subject, claims.role, claims.ward, claims.shift)
        except (ValueError, KeyError, TypeError, ConfigError) as exc:
            raise AuthError(f"token payload is invalid: {exc}") from None
        t = now.timestamp()
        if claims.issuer != self.issuer:
            raise AuthError(f"token issued by {claims.issuer!r}, this gateway trusts {self.issuer!r}")
        if t >= claims.expires_at:
            ago = int(t - claims.expires_at)
            raise AuthError(f"token expired {ago} s ago; ask for a new one (insitu gateway token)")
        if t < claims.issued_at - 60:
            raise AuthError("token is not valid yet (issued in the future); check the issuer's clock")
        if claims.expires_at - claims.issued_at > self.max_ttl.total_seconds():
            raise AuthError(f"token lifetime exceeds this gateway's maximum {self.max_ttl}")
        return claims


_TTL_RE = re.compile(r"^(\d+)([smhd])$")


def parse_ttl(text: str) -> dt.timedelta:
    """``"90s"``, ``"15m"``, ``"8h"``, ``"2d"`` → timedelta."""
    m = _TTL_RE.match(str(text).strip())
    if not m:
        raise ConfigError(f"duration {text!r} must be a number with s, m, h or d, e.g. 8h")
    n, unit = int(m.group(1)), m.group(2)
    return dt.timedelta(**{{"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}[unit]: n})


__all__ = ["Claims", "TokenIssuer", "TokenVerifier", "generate_keypair", "load_private_key", "load_public_key", "parse_ttl"]
