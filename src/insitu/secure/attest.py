"""Signed key advertisements: an active coordinator cannot substitute a site's secure-aggregation keys
(nor the keys homomorphic key dealing seals the shared private key under).

In Bonawitz et al.'s protocol every message between two sites travels through the
coordinator.  If the public keys a site advertises are not authenticated, a coordinator
that deviates can hand each site its own keys instead of its peers' ("man in the middle"),
open every sealed share and so rebuild every mask.  With a consortium PKI the fix is the
malicious-server variant of the paper: each site signs its two fresh X25519 keys, together
with the job, the round and the round's setup (group, degree, threshold, fixed point) and its commitment to a graph-seed share, with
the private key of its TLS certificate, and sends the certificate along; every receiving
site checks

* the certificate was issued by the consortium CA (the one its own TLS trusts), is within
  its validity period, carries the ``site`` role, and names exactly the site whose keys
  these claim to be;
* the ECDSA-P256/SHA-256 signature covers exactly these keys in this job, round and setup
  (a replay of last round's keys, or keys moved to another site, fail);

and refuses the round otherwise, naming the site whose advertisement failed.  The
coordinator cannot forge a signature without a site's private key.

The same certificate key signs secure aggregation's consistency statements (the survivor set
each survivor was shown, see :mod:`insitu.secure.secagg`), so a coordinator cannot forge a
site's agreement to a survivor set either.

Not covered: revocation (sites do not hold the CRL; the coordinator checks it at the TLS
handshake).
"""
from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from insitu.errors import ConfigError, ProtocolError, SecurityError
from insitu.secure._primitives import context

LABEL = b"insitu-secagg-keys-v1"
MAX_CERT_BYTES = 8192
MAX_SIG_CHARS = 128  # base64 of a DER ECDSA P-256 signature is 96-100 characters


def transcript(job: str, round_: int, site: str, setup_digest: bytes, c_pk: bytes, s_pk: bytes, *extra: bytes) -> bytes:
    """What a site signs: its keys bound to the job, round, its name and the round's setup, and
    ``extra`` advertised values (secure aggregation: the commitment to its graph-seed share)."""
    return context(LABEL, job, round_, site, setup_digest, c_pk, s_pk, *extra)


def he_transcript(job: str, round_: int, site: str, scheme: str, x_pk: bytes) -> bytes:
    """What a site signs in homomorphic key dealing: the X25519 key the private key is sealed under."""
    return context(b"insitu-he-keys-v1", job, round_, site, scheme, x_pk)


@dataclass(frozen=True)
class KeySigner:
    """A site's signing half: its certificate (PEM) and the matching ECDSA P-256 private key."""

    cert_pem: bytes
    key: ec.EllipticCurvePrivateKey

    @classmethod
    def load(cls, cert: str | Path, key: str | Path) -> "KeySigner":
        try:
            cert_pem = Path(cert).read_bytes()
            x509.load_pem_x509_certificate(cert_pem)
            priv = serialization.load_pem_private_key(Path(key).read_bytes(), password=None)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot load the site certificate {cert} / key {key} for signing secure-aggregation keys: {exc}") from None
        if not isinstance(priv, ec.EllipticCurvePrivateKey):
            raise ConfigError(f"site key {key} is not an ECDSA key")
        return cls(cert_pem, priv)

    def sign(self, message: bytes) -> bytes:
        return self.key.sign(message, ec.ECDSA(hashes.SHA256()))


@dataclass
class PeerVerifier:
    """A site's checking half: the consortium CA certificate it trusts for TLS."""

    ca: x509.Certificate
    _ok: dict[bytes, tuple[str, ec.EllipticCurvePublicKey, dt.datetime]] = field(default_factory=dict)

    @classmethod
    def load(cls, ca: str | Path) -> "PeerVerifier":
        try:
            return cls(x509.load_pem_x509_certificate(Path(ca).read_bytes()))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot load the consortium CA certificate {ca}: {exc}") from None

    @staticmethod
    def _now() -> dt.datetime:
        return dt.datetime.now(dt.timezone.utc)

    def public_key(self, cert_pem: bytes, site: str) -> ec.EllipticCurvePublicKey:
        """The verified signing key of ``site`` from its certificate; SecurityError naming the fault."""
        from insitu.net.pki import Role, identity_of

        if len(cert_pem) > MAX_CERT_BYTES:
            raise SecurityError(f"certificate for site {site} is {len(cert_pem)} bytes, above {MAX_CERT_BYTES}")
        fp = hashlib.sha256(cert_pem).digest()
        hit = self._ok.get(fp)
        if hit is None:
            try:
                cert = x509.load_pem_x509_certificate(cert_pem)
            except ValueError as exc:
                raise SecurityError(f"certificate for site {site} cannot be parsed: {exc}") from None
            try:
                cert.verify_directly_issued_by(self.ca)
            except (ValueError, TypeError, InvalidSignature):
                raise SecurityError(f"certificate for site {site} was not issued by the consortium CA") from None
            ident = identity_of(cert.public_bytes(serialization.Encoding.DER), expect={Role.SITE})
            pub = cert.public_key()
            if not isinstance(pub, ec.EllipticCurvePublicKey):
                raise SecurityError(f"certificate for site {site} does not hold an ECDSA key")
            if self._now() < cert.not_valid_before_utc:
                raise SecurityError(f"certificate for site {site} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC")
            hit = (ident.name, pub, cert.not_valid_after_utc)
            self._ok[fp] = hit
        name, pub, not_after = hit
        if self._now() > not_after:
            raise SecurityError(f"certificate for site {site} expired on {not_after:%Y-%m-%d %H:%M} UTC")
        if name != site:
            raise SecurityError(f"keys claimed for site {site} come with the certificate of {name}")
        return pub

    def verify(self, cert_pem: bytes, signature: bytes, site: str, message: bytes) -> None:
        pub = self.public_key(cert_pem, site)
        try:
            pub.verify(signature, message, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            raise SecurityError(f"the secure-aggregation keys relayed for site {site} do not carry its signature "
                                "(substituted or altered by the coordinator, or replayed from another round)") from None


@dataclass(frozen=True)
class Attestation:
    """Both halves a deployed site holds: sign its own keys, check everyone else's."""

    signer: KeySigner
    verifier: PeerVerifier

    @classmethod
    def load(cls, cert: str | Path, key: str | Path, ca: str | Path) -> "Attestation":
        return cls(KeySigner.load(cert, key), PeerVerifier.load(ca))

    def sign_fields(self, message: bytes) -> dict[str, str]:
        """The ``cert`` and ``sig`` fields a site adds to its key advertisement."""
        return {"cert": self.signer.cert_pem.decode(), "sig": base64.b64encode(self.signer.sign(message)).decode()}

    def check_relayed(self, fields: Sequence[object], site: str, message: bytes) -> None:
        """Check the ``[cert, sig]`` the coordinator relayed with ``site``'s keys against ``message``."""
        cert, sig = (list(fields) + [None, None])[:2]
        if not isinstance(cert, str) or not isinstance(sig, str):
            raise ProtocolError(f"keys relayed for site {site} carry no certificate and signature; this site accepts only signed keys")
        try:
            signature = base64.b64decode(sig, validate=True)
        except (binascii.Error, ValueError):
            raise ProtocolError(f"signature relayed for site {site} is not base64") from None
        if not 8 <= len(signature) <= MAX_SIG_CHARS:
            raise ProtocolError(f"signature relayed for site {site} has {len(signature)} bytes; an ECDSA P-256 signature has 70-72")
        self.verifier.verify(cert.encode(), signature, site, message)


def relayable(meta: Mapping[str, Any]) -> list[str]:
    """Coordinator side: the ``[cert, sig]`` of a key advertisement to relay to the other sites
    (empty when the site did not sign: simulation).  The coordinator checks only their shape; the
    sites check the signature."""
    cert, sig = meta.get("cert"), meta.get("sig")
    if cert is None and sig is None:
        return []
    if not isinstance(cert, str) or not isinstance(sig, str) or len(cert) > MAX_CERT_BYTES or len(sig) > MAX_SIG_CHARS:
        raise ProtocolError("key advertisement carries a malformed certificate or signature")
    return [cert, sig]


__all__ = ["Attestation", "KeySigner", "PeerVerifier", "transcript", "he_transcript", "relayable"]
