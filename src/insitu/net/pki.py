"""The consortium PKI: one root CA, role-bearing certificates, a published revocation list.

Every party of a deployment (hospital site, coordinator, operator) holds an
X.509 certificate issued by the consortium's root CA.  What a party may do
follows from its certificate alone, never from what it says in a message:

* the **name** is the subject common name (``hospital-a``);
* the **role** is written twice, as the subject organizational unit and in a
  dedicated extension under :data:`ROLE_OID`; both must agree, so a
  certificate from some other hierarchy with a look-alike OU does not pass;
* the **extended key usage** matches the role: the coordinator and the
  gateway are TLS servers, sites and operators are TLS clients.  A site
  dials only a ``coordinator`` certificate, so a gateway's cannot stand in
  for the coordinator.

Revocation is a CRL signed by the CA (``crl.pem`` in the CA directory); the
coordinator reloads it when the file changes and refuses revoked peers at
the handshake.  Keys are ECDSA P-256 (what every TLS 1.3 stack accepts for
client certificates); private keys are written ``0600``.

The CA directory::

    ca/ca.pem  ca/ca.key  ca/crl.pem  ca/index.json   (issued serials, names, roles, revocations)
"""
from __future__ import annotations

import datetime as dt
import enum
import ipaddress
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from insitu.errors import ConfigError, SecurityError, parse_choice

#: private-enterprise-style arc for insitu; ``.1`` holds the role as a UTF-8 string.
ROLE_OID = x509.ObjectIdentifier("1.3.6.1.4.1.59999.1.1")
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{0,62}$")
CA_FILES = ("ca.pem", "ca.key", "crl.pem", "index.json")
CRL_DAYS = 30


class Role(str, enum.Enum):
    """What a certificate's holder may do."""

    SITE = "site"  # a hospital node: answers rounds, may not run jobs
    OPERATOR = "operator"  # submits, cancels and watches jobs
    COORDINATOR = "coordinator"  # the TLS server the others dial
    GATEWAY = "gateway"  # the medical-agent gateway's HTTPS server; sites do not accept it as a coordinator


_EKU = {
    Role.SITE: [ExtendedKeyUsageOID.CLIENT_AUTH],
    Role.OPERATOR: [ExtendedKeyUsageOID.CLIENT_AUTH],
    Role.COORDINATOR: [ExtendedKeyUsageOID.SERVER_AUTH],
    Role.GATEWAY: [ExtendedKeyUsageOID.SERVER_AUTH],
}
#: roles whose certificate is a TLS server's, with the host names clients dial in its SAN.
SERVER_ROLES = (Role.COORDINATOR, Role.GATEWAY)


@dataclass(frozen=True)
class Identity:
    """Who is on the other end of a channel, read from its verified certificate."""

    name: str
    role: Role
    serial: int


@dataclass(frozen=True)
class Credentials:
    """Paths a party needs to open a channel: its certificate and key, and the CA to trust."""

    cert: Path
    key: Path
    ca: Path


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise ConfigError(f"party name {name!r} must be lower-case letters, digits, '.' or '-' (1-63 chars), e.g. hospital-a")
    return name


def _role(role: str | Role) -> Role:
    return parse_choice(Role, role, "role")


def _write_private(path: Path, data: bytes, *, exclusive: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | (os.O_EXCL if exclusive else os.O_TRUNC), 0o600)
    except FileExistsError:
        raise ConfigError(f"{path} already exists; refusing to overwrite a private key "
                          "(move it away, or choose another --out)") from None
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, 0o600)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# -- the CA ----------------------------------------------------------------------------------------
class CertificateAuthority:
    """A consortium root CA held in one directory."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        missing = [f for f in CA_FILES if not (self.dir / f).exists()]
        if missing:
            raise ConfigError(f"{self.dir} is not a CA directory (missing {missing}); create one with `insitu ca init --out {self.dir}`")
        self.cert = x509.load_pem_x509_certificate((self.dir / "ca.pem").read_bytes())
        key = serialization.load_pem_private_key((self.dir / "ca.key").read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise SecurityError(f"{self.dir / 'ca.key'} is not an ECDSA key")
        self.key = key

    @classmethod
    def init(cls, directory: str | Path, *, name: str = "insitu consortium root", days: int = 3650) -> "CertificateAuthority":
        """Create a new root CA; refuses to overwrite an existing one."""
        d = Path(directory)
        if (d / "ca.key").exists():
            raise ConfigError(f"{d} already holds a CA key; refusing to overwrite it (choose another --out)")
        if days < 1:
            raise ConfigError(f"CA validity must be at least 1 day, got {days}")
        d.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name), x509.NameAttribute(NameOID.ORGANIZATION_NAME, "insitu")])
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        _write_private(d / "ca.key", _key_pem(key))
        (d / "ca.pem").write_bytes(_cert_pem(cert))
        (d / "index.json").write_text(json.dumps({"issued": []}, indent=1))
        ca = cls.__new__(cls)
        ca.dir, ca.cert, ca.key = d, cert, key
        ca.publish_crl()
        return ca

    # -- index ---------------------------------------------------------------------------------
    def _index(self) -> dict:
        return json.loads((self.dir / "index.json").read_text())

    def _save_index(self, index: dict) -> None:
        _atomic_write(self.dir / "index.json", json.dumps(index, indent=1).encode())

    def issued(self) -> list[dict]:
        return list(self._index()["issued"])

    # -- issuing -------------------------------------------------------------------------------
    def sign(
        self,
        csr: x509.CertificateSigningRequest,
        role: str | Role,
        *,
        days: int = 365,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
        hosts: tuple[str, ...] = ("localhost", "127.0.0.1"),
    ) -> x509.Certificate:
        """Sign a CSR for the role given here (the CSR's own claims about role are ignored)."""
        role = _role(role)
        if not csr.is_signature_valid:
            raise SecurityError("certificate signing request has an invalid signature")
        cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if len(cns) != 1:
            raise ConfigError("certificate signing request must carry exactly one common name")
        name = _check_name(str(cns[0].value))
        pub = csr.public_key()
        if not isinstance(pub, ec.EllipticCurvePublicKey) or pub.curve.name != "secp256r1":
            raise SecurityError(f"{name}: only ECDSA P-256 keys are accepted")
        now = _now()
        start = not_before or now - dt.timedelta(minutes=5)
        end = not_after or now + dt.timedelta(days=days)
        if end <= start:
            raise ConfigError(f"{name}: certificate would end ({end}) before it starts ({start})")
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([
                x509.NameAttribute(NameOID.COMMON_NAME, name),
                x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role.value),
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "insitu"),
            ]))
            .issuer_name(self.cert.subject)
            .public_key(pub)
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, True, False, False, False, False), critical=True)
            .add_extension(x509.ExtendedKeyUsage(_EKU[role]), critical=False)
            .add_extension(x509.UnrecognizedExtension(ROLE_OID, role.value.encode()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
        )
        if role in SERVER_ROLES:
            sans: list[x509.GeneralName] = []
            for h in hosts:
                try:
                    sans.append(x509.IPAddress(ipaddress.ip_address(h)))
                except ValueError:
                    sans.append(x509.DNSName(h))
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        index = self._index()
        index["issued"].append({
            "name": name, "role": role.value, "serial": str(cert.serial_number),
            "not_after": end.isoformat(), "revoked": None,
        })
        self._save_index(index)
        return cert

    def issue(self, name: str, role: str | Role, out: str | Path, **kw) -> Credentials:
        """Create a key pair and a certificate for ``name``; writes NAME.key, NAME.pem, ca.pem into ``out``."""
        _check_name(name)
        key = ec.generate_private_key(ec.SECP256R1())
        cert = self.sign(make_csr(name, key), role, **kw)
        out = Path(out)
        _write_private(out / f"{name}.key", _key_pem(key))
        (out / f"{name}.pem").write_bytes(_cert_pem(cert))
        (out / "ca.pem").write_bytes(_cert_pem(self.cert))
        return Credentials(out / f"{name}.pem", out / f"{name}.key", out / "ca.pem")

    # -- revocation ----------------------------------------------------------------------------
    def revoke(self, name: str) -> list[int]:
        """Revoke every certificate issued to ``name`` and republish the CRL; returns the serials."""
        index = self._index()
        hits = [e for e in index["issued"] if e["name"] == name and e["revoked"] is None]
        if not hits:
            known = sorted({e["name"] for e in index["issued"]})
            raise ConfigError(f"no unrevoked certificate issued to {name!r} (issued names: {known})")
        stamp = _now().isoformat()
        for e in hits:
            e["revoked"] = stamp
        self._save_index(index)
        self.publish_crl()
        return [int(e["serial"]) for e in hits]

    def publish_crl(self) -> Path:
        now = _now()
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.cert.subject)
            .last_update(now - dt.timedelta(minutes=5))
            .next_update(now + dt.timedelta(days=CRL_DAYS))
        )
        for e in self._index()["issued"]:
            if e["revoked"]:
                builder = builder.add_revoked_certificate(
                    x509.RevokedCertificateBuilder()
                    .serial_number(int(e["serial"]))
                    .revocation_date(dt.datetime.fromisoformat(e["revoked"]))
                    .build()
                )
        crl = builder.sign(self.key, hashes.SHA256())
        path = self.dir / "crl.pem"
        _atomic_write(path, crl.public_bytes(serialization.Encoding.PEM))
        return path


# -- the parties' side -----------------------------------------------------------------------------
def make_csr(name: str, key: ec.EllipticCurvePrivateKey) -> x509.CertificateSigningRequest:
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, _check_name(name))]))
        .sign(key, hashes.SHA256())
    )


def create_csr(name: str, out: str | Path) -> tuple[Path, Path]:
    """A party's half of enrolment: a fresh key (stays here) and a CSR to hand to the CA."""
    key = ec.generate_private_key(ec.SECP256R1())
    out = Path(out)
    request = make_csr(name, key).public_bytes(serialization.Encoding.PEM)  # a bad name fails before any file
    _write_private(out / f"{name}.key", _key_pem(key), exclusive=True)  # never replaces an existing key
    csr_path = out / f"{name}.csr"
    csr_path.write_bytes(request)
    return csr_path, out / f"{name}.key"


def load_csr(path: str | Path) -> x509.CertificateSigningRequest:
    try:
        return x509.load_pem_x509_csr(Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read certificate signing request {path}: {exc}") from None


def identity_of(der: bytes | None, *, expect: set[Role] | None = None) -> Identity:
    """The identity in a peer certificate that TLS already verified against the CA.

    Refuses a certificate whose OU and role extension disagree or are missing."""
    if not der:
        raise SecurityError("peer presented no certificate")
    cert = x509.load_der_x509_certificate(der)
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    ous = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    try:
        ext = cert.extensions.get_extension_for_oid(ROLE_OID).value
        ext_role = ext.value.decode()  # type: ignore[attr-defined]
    except x509.ExtensionNotFound:
        raise SecurityError("peer certificate carries no insitu role extension") from None
    if len(cns) != 1 or len(ous) != 1 or ous[0].value != ext_role:
        raise SecurityError("peer certificate's name or role is missing or inconsistent")
    role = parse_choice(Role, ext_role, "peer certificate role", SecurityError)
    if expect is not None and role not in expect:
        raise SecurityError(f"{cns[0].value}: role {role.value} may not do this (needs {sorted(r.value for r in expect)})")
    return Identity(str(cns[0].value), role, cert.serial_number)


class RevocationList:
    """The CA's CRL, verified against the CA certificate and reloaded when its file changes."""

    def __init__(self, crl_path: str | Path, ca_path: str | Path):
        self.path = Path(crl_path)
        self.ca = x509.load_pem_x509_certificate(Path(ca_path).read_bytes())
        self._mtime = -1.0
        self._revoked: frozenset[int] = frozenset()
        self.refresh()

    def refresh(self) -> bool:
        """Reload if changed; returns True when it did.  A CRL not signed by the CA is refused."""
        try:
            mtime = self.path.stat().st_mtime_ns
        except OSError as exc:
            raise SecurityError(f"revocation list {self.path} cannot be read: {exc}") from None
        if mtime == self._mtime:
            return False
        crl = x509.load_pem_x509_crl(self.path.read_bytes())
        if not crl.is_signature_valid(self.ca.public_key()):  # type: ignore[arg-type]
            raise SecurityError(f"revocation list {self.path} is not signed by the consortium CA")
        self._revoked = frozenset(r.serial_number for r in crl)
        self._mtime = mtime
        return True

    def is_revoked(self, serial: int) -> bool:
        return serial in self._revoked

    @property
    def version(self) -> int:
        """Changes whenever a new CRL is loaded (its file's modification time)."""
        return int(self._mtime)


__all__ = ["Role", "Identity", "Credentials", "CertificateAuthority", "create_csr", "load_csr", "identity_of", "RevocationList", "ROLE_OID"]
