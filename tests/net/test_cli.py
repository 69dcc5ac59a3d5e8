"""The ca / job / site commands, through their typer apps (thin layers over the library)."""
from __future__ import annotations

from typer.testing import CliRunner

from insitu.coordinator.cli import job_app
from insitu.coordinator.jobs import JobSpec
from insitu.net.cli import app as ca_app
from insitu.net.pki import CertificateAuthority, RevocationList, Role, identity_of

runner = CliRunner()


def ok(app, *args):
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return res.output


def test_ca_commands_issue_sign_revoke(tmp_path):
    ca_dir = tmp_path / "ca"
    ok(ca_app, "init", "--out", ca_dir)
    ok(ca_app, "issue", "--ca", ca_dir, "--name", "ops", "--role", "operator", "--out", tmp_path / "ops")
    ok(ca_app, "csr", "--name", "hospital-c", "--out", tmp_path / "hc")
    assert not (ca_dir / "hospital-c.key").exists()  # the key stays with the party
    ok(ca_app, "sign", tmp_path / "hc" / "hospital-c.csr", "--ca", ca_dir, "--role", "site")
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert = x509.load_pem_x509_certificate((tmp_path / "hc" / "hospital-c.pem").read_bytes())
    ident = identity_of(cert.public_bytes(serialization.Encoding.DER))
    assert (ident.name, ident.role) == ("hospital-c", Role.SITE)
    ok(ca_app, "revoke", "--ca", ca_dir, "--name", "hospital-c")
    assert RevocationList(ca_dir / "crl.pem", ca_dir / "ca.pem").is_revoked(ident.serial)
    assert "hospital-c" in ok(ca_app, "list", "--ca", ca_dir)
    res = runner.invoke(ca_app, ["issue", "--ca", str(ca_dir), "--name", "x", "--role", "root", "--out", str(tmp_path)])
    assert res.exit_code != 0
    assert len(CertificateAuthority(ca_dir).issued()) == 2


def test_job_hash_matches_the_task_sites_approve(tmp_path):
    job = tmp_path / "job.toml"
    job.write_text('name = "h"\ndataset = "heart"\nrounds = 2\nlr = 0.02\n')
    out = ok(job_app, "hash", job)
    assert out.strip() == JobSpec.from_dict({"name": "h", "dataset": "heart", "rounds": 2, "lr": 0.02}).plan.content_hash()


def test_coordinator_heart_schema_matches_the_loader():
    from insitu.coordinator.jobs import HEART_SCHEMA
    from insitu.data.heart import FEATURES

    assert HEART_SCHEMA == tuple(FEATURES)
