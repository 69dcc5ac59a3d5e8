"""The consortium PKI: roles bound into certificates, CSR enrolment, revocation lists."""
from __future__ import annotations

import datetime as dt
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from insitu.errors import ConfigError, SecurityError
from insitu.net.pki import ROLE_OID, CertificateAuthority, RevocationList, Role, create_csr, identity_of, load_csr


@pytest.fixture
def ca(tmp_path):
    return CertificateAuthority.init(tmp_path / "ca")


def der(path):
    return x509.load_pem_x509_certificate(path.read_bytes()).public_bytes(serialization.Encoding.DER)


def test_issued_certificate_carries_name_and_role(ca, tmp_path):
    creds = ca.issue("hospital-a", Role.SITE, tmp_path / "a")
    ident = identity_of(der(creds.cert))
    assert (ident.name, ident.role) == ("hospital-a", Role.SITE)
    assert stat.S_IMODE(creds.key.stat().st_mode) == 0o600
    assert stat.S_IMODE((ca.dir / "ca.key").stat().st_mode) == 0o600
    with pytest.raises(SecurityError, match="role site may not"):
        identity_of(der(creds.cert), expect={Role.OPERATOR})


def test_csr_flow_role_is_chosen_by_the_ca(ca, tmp_path):
    csr_path, key_path = create_csr("ops-1", tmp_path / "ops")
    cert = ca.sign(load_csr(csr_path), "operator")
    ident = identity_of(cert.public_bytes(serialization.Encoding.DER))
    assert (ident.name, ident.role) == ("ops-1", Role.OPERATOR)
    with pytest.raises(ConfigError, match="role: unknown value"):
        ca.sign(load_csr(csr_path), "admin")


def test_ou_and_role_extension_must_agree(ca):
    """A certificate whose OU says operator while its role extension says site is refused."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mallory"), x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "operator")]))
        .issuer_name(ca.cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.UnrecognizedExtension(ROLE_OID, b"site"), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    with pytest.raises(SecurityError, match="inconsistent"):
        identity_of(cert.public_bytes(serialization.Encoding.DER))


def test_revocation_list_published_and_verified(ca, tmp_path):
    a = ca.issue("hospital-a", Role.SITE, tmp_path / "a")
    b = ca.issue("hospital-b", Role.SITE, tmp_path / "b")
    crl = RevocationList(ca.dir / "crl.pem", ca.dir / "ca.pem")
    sa, sb = identity_of(der(a.cert)).serial, identity_of(der(b.cert)).serial
    assert not crl.is_revoked(sa)
    assert ca.revoke("hospital-a") == [sa]
    assert crl.refresh() and crl.is_revoked(sa) and not crl.is_revoked(sb)
    with pytest.raises(ConfigError, match="no unrevoked certificate"):
        ca.revoke("hospital-a")
    other = CertificateAuthority.init(tmp_path / "other")
    with pytest.raises(SecurityError, match="not signed by the consortium CA"):
        RevocationList(other.dir / "crl.pem", ca.dir / "ca.pem")


def test_ca_refuses_overwrite_and_bad_names(ca, tmp_path):
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        CertificateAuthority.init(ca.dir)
    with pytest.raises(ConfigError, match="party name"):
        ca.issue("Hospital A", Role.SITE, tmp_path / "x")
    with pytest.raises(ConfigError, match="not a CA directory"):
        CertificateAuthority(tmp_path / "nowhere")
