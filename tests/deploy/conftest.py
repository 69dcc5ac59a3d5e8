"""Shared pieces of the deployment tests."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import pytest


def write_gateway(root: Path, run_dir: Path, ca, issuer: str = "gateway.test") -> tuple[Path, int]:
    """A gateway directory serving ``run_dir`` on a free loopback port: its TLS certificate from the
    consortium CA (role ``gateway``), token keys (``insitu gateway keygen``) and an audit key."""
    from typer.testing import CliRunner

    from insitu.audit.keys import write_keypair
    from insitu.cli import app
    from insitu.net import sandbox
    from insitu.net.pki import Role

    gw = root / "gateway"
    ca.issue("gateway", Role.GATEWAY, gw / "tls")
    write_keypair(gw / "keys", "gateway")
    port = sandbox.free_port()
    cfg = gw / "gateway.toml"
    cfg.write_text(f"""[server]
host = "127.0.0.1"
port = {port}
cert = "tls/gateway.pem"
key = "tls/gateway.key"
ca = "tls/ca.pem"
client_certs = "none"
[tokens]
issuer = "{issuer}"
public_key = "keys/token.pub"
private_key = "keys/token.key"
[records]
url = "sqlite:///records.db"
[model]
run_dir = "{run_dir}"
[audit]
path = "audit.db"
key = "keys/gateway.key"
writer = "gateway"
""")
    res = CliRunner().invoke(app, ["gateway", "keygen", "--config", str(cfg)])
    assert res.exit_code == 0, res.output
    return cfg, port


@pytest.fixture
def gateway_dir() -> Callable[..., tuple[Path, int]]:
    """``write_gateway`` as a fixture (tests/deploy has no package to import it from)."""
    return write_gateway


def dashboard_consortium(root: Path, sites: Sequence[str], approved: Mapping[str, Sequence[str]]) -> Iterator:
    """A running consortium (coordinator with its web dashboard, one process per site), yielded as the
    sandbox with ``dash`` (the dashboard's https URL); ``approved`` maps each site to its approved
    plan hashes. Stopped when the generator closes (use it from a module fixture)."""
    from insitu.audit.keys import write_keypair
    from insitu.net import sandbox

    sb = sandbox.create(root, sites)
    for s in sites:
        sb.write_site_config(s, approved=approved[s])
    write_keypair(root / "keys", "coordinator")
    sb.dashboard = {"port": 0, "port_file": "dashboard.port", "audit_log": "audit.db", "audit_key": "keys/coordinator.key"}
    up = running(sb)
    next(up)
    try:
        sb.dash = f"https://127.0.0.1:{sb.dashboard_port()}"
        yield sb
    finally:
        up.close()


def running(sb, timeout: float = 90) -> Iterator:
    """Start the sandbox's coordinator and every site process, yield it once all sites are connected
    (a failure shows each site's log tail), and stop everything when the generator closes."""
    try:
        sb.start_all()
        logs = lambda: {s: (sb.root / f"site-{s}.log").read_text()[-2000:] for s in sb.sites if (sb.root / f"site-{s}.log").exists()}  # noqa: E731
        assert sb.wait_sites(len(sb.sites), timeout=timeout) == sorted(sb.sites), logs()
        yield sb
    finally:
        sb.stop()


@pytest.fixture(scope="session")
def consortium_running() -> Callable[..., Iterator]:
    """``running`` as a fixture (module fixtures: ``yield from consortium_running(sandbox.create(...))``)."""
    return running


@pytest.fixture(scope="session")
def dashboard_deployment() -> Callable[..., Iterator]:
    """``dashboard_consortium`` as a fixture, usable from module-scoped ones."""
    return dashboard_consortium


def predict_when_up(port: int, body: dict, token: str, ca_pem: Path, proc, log: Path, timeout: float = 120):
    """POST ``body`` to a starting gateway's /predict on 127.0.0.1:``port`` until it answers (the
    gateway process ``proc`` must stay alive; its ``log`` is shown if it dies), the response returned."""
    import ssl
    import time

    import httpx

    tls = ssl.create_default_context(cafile=str(ca_pem))
    deadline = time.monotonic() + timeout
    while True:
        try:
            return httpx.post(f"https://127.0.0.1:{port}/predict", json=body, headers={"Authorization": f"Bearer {token}"},
                              verify=tls, timeout=10)
        except httpx.TransportError:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "gateway did not come up"
            time.sleep(0.3)


@pytest.fixture(scope="session")
def gateway_predict() -> Callable[..., object]:
    """``predict_when_up`` as a fixture."""
    return predict_when_up
