"""A deployable gateway directory (certs, keys, records, model, config) and a real server process."""
from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from insitu.net.pki import CertificateAuthority, Credentials, Role

from .support import record_body, write_run_dir

INSITU = [str(Path(sys.executable).with_name("insitu"))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Deployment:
    dir: Path
    config: Path
    ca: CertificateAuthority
    server: Credentials
    port: int

    @property
    def ca_pem(self) -> Path:
        return self.ca.dir / "ca.pem"

    def issue_client(self, name: str) -> Credentials:
        """A client certificate from the consortium CA (the gateway maps its CN to a role)."""
        return self.ca.issue(name, Role.OPERATOR, self.dir / "clients")

    def client_context(self, cert: Credentials | None = None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca_pem))
        if cert is not None:
            ctx.load_cert_chain(str(cert.cert), str(cert.key))
        return ctx

    def cli(self, *args: str) -> str:
        """Run `insitu gateway ARGS --config ...` in this process (the server is the only subprocess)."""
        from typer.testing import CliRunner

        from insitu.cli import app

        res = CliRunner().invoke(app, ["gateway", *args, "--config", str(self.config)])
        if res.exit_code != 0:
            raise RuntimeError(f"exit {res.exit_code}: {res.output} {res.exception!r}")
        return res.stdout.strip()


def make_deployment(d: Path, client_certs: str = "optional") -> Deployment:
    from insitu.audit.keys import write_keypair

    ca = CertificateAuthority.init(d / "ca")
    # the gateway's own role: a TLS-server certificate that sites would refuse as a coordinator
    server = ca.issue("gateway", Role.GATEWAY, d / "tls", hosts=("127.0.0.1", "localhost"))
    write_run_dir(d / "run")
    write_keypair(d / "keys", "gateway")
    port = free_port()
    cfg = d / "gateway.toml"
    cfg.write_text(f"""
[server]
host = "127.0.0.1"
port = {port}
cert = "tls/gateway.pem"
key = "tls/gateway.key"
ca = "ca/ca.pem"
crl = "ca/crl.pem"
client_certs = "{client_certs}"

[tokens]
issuer = "gateway.test"
public_key = "keys/token.pub"
private_key = "keys/token.key"
max_ttl = "12h"

[records]
url = "sqlite:///records.db"

[model]
run_dir = "run"

[audit]
path = "audit.db"
key = "keys/gateway.key"
writer = "gateway"

[[mtls.clients]]
cn = "agent-triage"
role = "ai-model"

[[mtls.clients]]
cn = "agent-nightly"
role = "ai-model"

[[mtls.clients]]
cn = "dr-house"
role = "doctor"
ward = "cardio"
""")
    dep = Deployment(d, cfg, ca, server, port)
    dep.cli("keygen")
    return dep


def seed_records(dep: Deployment) -> None:
    from insitu.gateway.config import GatewayConfig
    from insitu.gateway.records import RecordBody, RecordStore
    import datetime as dt

    store = RecordStore(GatewayConfig.load(dep.config).records_url)
    store.put("cardio-0001", RecordBody(**record_body("cardio")), dt.datetime.now(dt.timezone.utc))
    store.engine.dispose()


def start_server(dep: Deployment, timeout: float = 120.0) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([*INSITU, "gateway", "serve", "--config", str(dep.config)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ctx = dep.client_context()
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"gateway exited: {proc.stdout.read() if proc.stdout else ''}")
        try:
            with socket.create_connection(("127.0.0.1", dep.port), timeout=1) as raw:
                with ctx.wrap_socket(raw, server_hostname="127.0.0.1"):
                    return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("gateway did not start listening in time")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
