"""`insitu kit`: every file of a consortium kit loads with the loader that will read it, with the right roles."""
from __future__ import annotations

import socket
import ssl
import threading
import tomllib

import pytest
from typer.testing import CliRunner

from insitu.cli import app
from insitu.errors import ConfigError, SecurityError
from insitu.kit import write_kit
from insitu.net.channel import dial
from insitu.net.pki import Credentials, Role, identity_of


def _role(pem_path) -> Role:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert = x509.load_pem_x509_certificate(pem_path.read_bytes())
    return identity_of(cert.public_bytes(serialization.Encoding.DER)).role


def test_kit_configs_load_and_certificates_carry_their_roles(tmp_path):
    res = CliRunner().invoke(app, ["kit", "cleveland", "st-marys", "--out", str(tmp_path / "kit"), "--coordinator", "coord.example.org:9443"])
    assert res.exit_code == 0, res.output
    root = tmp_path / "kit"
    from insitu.coordinator.jobs import JobSpec
    from insitu.coordinator.service import CoordinatorConfig
    from insitu.gateway.config import GatewayConfig
    from insitu.site.policy import DataSource, SitePolicy

    co = CoordinatorConfig.load(root / "coordinator" / "coordinator.toml")
    assert co.port == 9443 and co.host == "0.0.0.0" and co.cert.exists() and co.crl.exists()
    assert _role(co.cert) is Role.COORDINATOR
    from insitu.coordinator.dashboard import DashboardConfig

    dash = DashboardConfig.load(root / "coordinator" / "coordinator.toml")
    assert dash.port == 8445 and dash.audit_key.exists() and dash.audit_key.with_suffix(".pub").exists()
    op = tomllib.loads((root / "operator" / "operator.toml").read_text())["operator"]
    assert op["coordinator"] == "coord.example.org:9443" and _role(root / "operator" / op["cert"]) is Role.OPERATOR
    assert (root / "operator" / op["key"]).stat().st_mode & 0o077 == 0  # private keys are 0600
    job = JobSpec.from_dict(tomllib.loads((root / "operator" / "job.toml").read_text()))
    assert job.sites == ("cleveland", "st-marys") and job.approval_timeout > 0
    heart = SitePolicy.load(root / "sites" / "cleveland" / "site.toml")
    assert heart.source is DataSource.HEART and heart.data["hospital"] == "cleveland" and heart.coordinator == ("coord.example.org", 9443)
    assert _role(heart.cert) is Role.SITE
    other = SitePolicy.load(root / "sites" / "st-marys" / "site.toml")
    assert other.source is DataSource.CSV and other.data["train"].endswith("data/train.csv")
    gw = GatewayConfig.load(root / "gateway" / "gateway.toml")
    assert _role(gw.cert) is Role.GATEWAY and gw.token_public_key.exists() and gw.audit_key.exists()
    assert gw.model_run_dir == root / "gateway" / "model"
    assert (root / "ca" / "ca.key").exists() and "ca.key" not in {p.name for p in root.rglob("*") if "ca" not in p.parts}
    for cfg in root.rglob("*.toml"):
        text = cfg.read_text()
        assert text.startswith("# ") and tomllib.loads(text)  # a commented template that parses


def test_kit_refuses_to_overwrite_and_bad_names(tmp_path):
    write_kit(tmp_path / "k", ["hungary"])
    with pytest.raises(ConfigError, match="not empty"):
        write_kit(tmp_path / "k", ["hungary"])
    with pytest.raises(ConfigError, match="party name 'St Marys'"):
        write_kit(tmp_path / "k2", ["St Marys"])
    with pytest.raises(ConfigError, match="distinct"):
        write_kit(tmp_path / "k3", ["a", "a"])
    with pytest.raises(ConfigError, match="HOST:PORT"):
        write_kit(tmp_path / "k4", ["a"], coordinator="nohost")


def test_a_site_refuses_the_gateway_certificate_as_its_coordinator(tmp_path):
    """The gateway's certificate is a TLS server's from the same CA: a site must still not take it for the coordinator."""
    kit = write_kit(tmp_path / "k", ["hungary"])
    gw = tmp_path / "k" / "gateway" / "tls"
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(str(gw / "gateway.pem"), str(gw / "gateway.key"))
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]

    def serve() -> None:
        conn, _ = srv.accept()
        try:
            ctx.wrap_socket(conn, server_side=True).recv(1)
        except (OSError, ssl.SSLError):
            pass
        finally:
            conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    site = tmp_path / "k" / "sites" / "hungary" / "pki"
    with pytest.raises(SecurityError, match="role gateway"):
        dial("127.0.0.1", port, Credentials(site / "hungary.pem", site / "hungary.key", site / "ca.pem"), timeout=10)
    t.join(10)
    srv.close()
    assert kit.sites == {"hungary": tmp_path / "k" / "sites" / "hungary" / "site.toml"}
