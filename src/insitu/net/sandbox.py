"""A whole consortium on one machine, as real processes on 127.0.0.1: for trying a deployment, tests and benchmarks.

:func:`create` writes a CA, certificates for a coordinator, an operator and
each site, and the three kinds of config file; :class:`Sandbox` starts and
stops ``insitu coordinator serve`` and ``insitu site serve`` processes over
them.  Nothing here is a stand-in: the processes are the ones a consortium
runs, talking mutual TLS 1.3 over loopback.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from insitu.errors import ConfigError
from insitu.net.pki import CertificateAuthority, Credentials, Role

SITES = ("cleveland", "hungary", "switzerland", "va-long-beach")
#: each process runs its command's own typer app (the same one `insitu` registers), which skips
#: importing unrelated sub-apps such as the gateway: start-up is dominated by imports.
_ENTRY = {"coordinator": "from insitu.coordinator.cli import app; app()", "site": "from insitu.site.cli import app; app()"}


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _table(name: str, items: Mapping[str, Any]) -> str:
    return f"[{name}]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in items.items() if v is not None)


@dataclass
class Sandbox:
    root: Path
    sites: tuple[str, ...]
    port: int = 0
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    heartbeat: float = 1.0
    dead_after: float = 15.0  # generous: a loaded CI machine can stall heart-beats for seconds
    backoff_max: float = 1.0
    operator_configs: set[str] = field(default_factory=set)
    #: tests only: fixed site secrets, so a deployment can be compared exactly with a simulation
    fixed_secrets: Mapping[str, bytes] = field(default_factory=dict)
    dashboard: Mapping[str, Any] | None = None  # a [dashboard] table for coordinator.toml (insitu.coordinator.dashboard)

    @property
    def ca(self) -> CertificateAuthority:
        return CertificateAuthority(self.root / "ca")

    def creds(self, name: str) -> Credentials:
        d = self.root / "pki" / name
        return Credentials(d / f"{name}.pem", d / f"{name}.key", d / "ca.pem")

    def write_coordinator_config(self) -> Path:
        path = self.root / "coordinator.toml"
        path.write_text(_table("coordinator", {
            "host": "127.0.0.1", "port": self.port, "port_file": "coordinator.port",
            "cert": "pki/coordinator/coordinator.pem", "key": "pki/coordinator/coordinator.key",
            "ca": "ca/ca.pem", "crl": "ca/crl.pem", "db": "coordinator.db",
            "heartbeat": self.heartbeat, "dead_after": self.dead_after,
        }) + (_table("dashboard", self.dashboard) if self.dashboard is not None else ""))
        return path

    def dashboard_port(self, timeout: float = 60.0) -> int:
        """The dashboard's port, once it listens (needs ``dashboard = {"port": 0, "port_file": "dashboard.port"}``)."""
        pf = self.root / "dashboard.port"
        deadline = time.monotonic() + timeout
        while not pf.exists():
            if time.monotonic() > deadline:
                raise ConfigError(f"the dashboard did not start within {timeout} s; see {self.root / 'coordinator.log'}")
            time.sleep(0.05)
        return int(pf.read_text())

    def write_site_config(self, name: str, *, approved: Iterable[str] = (), policy: Mapping[str, Any] | None = None, hospital: str | None = None,
                          data: Mapping[str, Any] | None = None) -> Path:
        """The site's site.toml; ``data`` is its [data] table (default: the heart hospital ``hospital`` or ``name``)."""
        path = self.root / "sites" / name / "site.toml"
        path.parent.mkdir(parents=True, exist_ok=True)
        rel = os.path.relpath(self.root / "pki" / name, path.parent)
        text = _table("site", {
            "coordinator": f"127.0.0.1:{self.port}", "cert": f"{rel}/{name}.pem", "key": f"{rel}/{name}.key",
            "ca": f"{rel}/ca.pem", "state": "state", "heartbeat": self.heartbeat, "dead_after": self.dead_after,
            "backoff_max": self.backoff_max,
        })
        text += _table("data", dict(data) if data is not None else {"source": "heart", "hospital": hospital or name})
        fixed = {"insecure_fixed_secret": self.fixed_secrets[name].hex()} if name in self.fixed_secrets else {}
        text += _table("policy", {"approved": list(approved), **fixed, **dict(policy or {})})
        path.write_text(text)
        return path

    def write_operator_config(self, name: str = "ops") -> Path:
        path = self.root / f"{name}.toml"
        self.operator_configs.add(name)
        path.write_text(_table("operator", {
            "coordinator": f"127.0.0.1:{self.port}", "cert": f"pki/{name}/{name}.pem",
            "key": f"pki/{name}/{name}.key", "ca": f"pki/{name}/ca.pem",
        }))
        return path

    # -- processes -----------------------------------------------------------------------------
    def _spawn(self, key: str, entry: str, args: list[str]) -> subprocess.Popen:
        log = open(self.root / f"{key}.log", "ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        proc = subprocess.Popen([sys.executable, "-c", _ENTRY[entry], *args], stdout=log, stderr=subprocess.STDOUT,
                                cwd=self.root, env=env, start_new_session=True, preexec_fn=_die_with_parent)
        self.procs[key] = proc
        return proc

    def start_coordinator(self, timeout: float = 90.0) -> int:
        """Start the coordinator; the first start picks a free port, later starts reuse it."""
        pf = self.root / "coordinator.port"
        pf.unlink(missing_ok=True)
        self.write_coordinator_config()
        proc = self._spawn("coordinator", "coordinator", ["serve", "--config", str(self.root / "coordinator.toml")])
        deadline = time.monotonic() + timeout
        while not pf.exists():
            if proc.poll() is not None:
                raise ConfigError(f"coordinator exited with {proc.returncode}; see {self.root / 'coordinator.log'}")
            if time.monotonic() > deadline:
                raise ConfigError(f"coordinator did not start within {timeout} s; see {self.root / 'coordinator.log'}")
            time.sleep(0.05)
        self.port = int(pf.read_text())
        self.write_coordinator_config()  # pin the port so a restart listens where the sites dial
        for op in sorted(self.operator_configs):
            self.write_operator_config(op)
        return self.port

    def start_all(self, timeout: float = 90.0) -> None:
        """Start the coordinator and every site at once (sites dial with back-off until it listens)."""
        if not self.port:
            self.port = free_port()
        self.write_coordinator_config()
        for s in self.sites:
            self.start_site(s)
        self.start_coordinator(timeout=timeout)

    def start_site(self, name: str) -> subprocess.Popen:
        cfg = self.root / "sites" / name / "site.toml"
        text = cfg.read_text()
        import re

        cfg.write_text(re.sub(r'coordinator = "127\.0\.0\.1:\d+"', f'coordinator = "127.0.0.1:{self.port}"', text))
        return self._spawn(f"site-{name}", "site", ["serve", "--config", str(cfg)])

    def kill(self, key: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs.pop(key, None)
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, sig)
            proc.wait(10)

    def stop(self) -> None:
        for key in list(self.procs):
            proc = self.procs[key]
            if proc.poll() is None:
                proc.terminate()
        for key in list(self.procs):
            try:
                self.procs[key].wait(3)
            except subprocess.TimeoutExpired:
                self.kill(key)
        self.procs.clear()

    def operator(self, op: str, args: Mapping[str, Any] | None = None, *, who: str = "ops") -> dict[str, Any]:
        from insitu.net.client import operator_call

        return operator_call("127.0.0.1", self.port, self.creds(who), op, args)

    def wait_sites(self, n: int, timeout: float = 60.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while True:
            have = self.operator("sites")["sites"]
            if len(have) >= n or time.monotonic() > deadline:
                return have
            time.sleep(0.1)

    def wait_job(self, job: str, *, until: Iterable[str] = ("done", "failed", "cancelled"), timeout: float = 120.0, rounds: int | None = None) -> dict[str, Any]:
        """Poll a job's status until it reaches a state in ``until`` (or ``rounds`` applied)."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.operator("status", {"job": job})
            if st["status"] in set(until) or (rounds is not None and st["rounds_applied"] >= rounds):
                return st
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job} still {st['status']} after {timeout} s ({st['rounds_applied']} rounds applied)")
            time.sleep(0.05)


def _die_with_parent() -> None:
    """Linux: the child gets SIGTERM if the process that started it dies (a crashed test run
    must not leave sites dialling forever).  Elsewhere a no-op."""
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except OSError:
            pass


def free_port() -> int:
    """A port that was free a moment ago (the coordinator binds it with SO_REUSEADDR)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def create(root: str | Path, sites: Iterable[str] = SITES, *, approved: Iterable[str] = (), operators: Iterable[str] = ("ops",),
           fixed_secrets: Mapping[str, bytes] | None = None) -> Sandbox:
    """Write CA, certificates and configs for a coordinator, operators and heart sites under ``root``.

    ``fixed_secrets`` (tests only) gives sites a fixed secret instead of OS randomness."""
    root = Path(root)
    sites = tuple(sites)
    ca = CertificateAuthority.init(root / "ca")
    ca.issue("coordinator", Role.COORDINATOR, root / "pki" / "coordinator")
    for op in operators:
        ca.issue(op, Role.OPERATOR, root / "pki" / op)
    for s in sites:
        ca.issue(s, Role.SITE, root / "pki" / s)
    sb = Sandbox(root, sites, fixed_secrets=dict(fixed_secrets or {}))
    for s in sites:
        sb.write_site_config(s, approved=approved)
    for op in operators:
        sb.write_operator_config(op)
    return sb


__all__ = ["Sandbox", "create", "free_port", "SITES"]
