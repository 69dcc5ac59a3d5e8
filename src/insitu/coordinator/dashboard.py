"""The operators' web dashboard, served by the coordinator on a TLS 1.3 port of its own.

Who gets in: an **operator** only, identified either by its operator client certificate
(verified by OpenSSL against the consortium CA and its revocation list) or by a session that
a one-time login link turned into.  ``insitu coordinator login --config operator.toml`` asks the
coordinator for that link over the operator channel (so it takes the operator certificate to
get one); the link works once, for ``login_ttl`` seconds, and the session it opens lasts
``session_ttl``.  A site, gateway or coordinator certificate is refused with 403 (even with an
operator's session cookie beside it), an anonymous visitor gets a page saying how to log in.

What it shows, live (Server-Sent Events, no reload): the consortium (sites online or offline
with the reason, last heart-beat, certificate expiry, records, declared ε budget); the jobs
(queued, waiting for approval and for whom, running, done; rounds; ETA); for the selected job,
per-round charts of what the plan makes public (mean and per-site test accuracy, participants,
drop-outs and their reasons, each site's ε against its budget); and the state of the
coordinator's audit chain.  Operators submit and cancel jobs and download a job's model (the
run directory of ``insitu job model`` as a zip).  Every asset is served from this package
(``web/``): no CDN, no build step.

``coordinator.toml``::

    [dashboard]
    host = "127.0.0.1"
    port = 8445                 # 0: any free port, written to port_file
    port_file = "dashboard.port"
    # public_url = "https://coord.example.org:8445"   # what login links point at
    login_ttl = 120             # seconds a login link stays valid (used once)
    session_ttl = 28800         # seconds a browser session lasts
    audit_log = "audit.db"      # the coordinator's audit chain: every model release (download) is signed into it
    audit_key = "keys/coordinator.key"   # its Ed25519 key; coordinator.pub beside it verifies the chain
"""
from __future__ import annotations

import io
import json
import logging
import tempfile
import threading
import time
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

from insitu.errors import ConfigError, InsituError, SecurityError
from insitu.net.pki import Identity, RevocationList, Role, identity_of
from insitu.net.web import (SESSION_COOKIE, HTTPError, Principal, Request, Response, Sessions, Stream, WebApp, WebServer,
                            session_cookie, tls13_server_context)

log = logging.getLogger("insitu.coordinator.dashboard")
WEB = Path(__file__).with_name("web")


@dataclass(frozen=True)
class DashboardConfig:
    """The ``[dashboard]`` table of ``coordinator.toml`` (no table: no dashboard)."""

    host: str = "127.0.0.1"
    port: int = 8445
    port_file: Path | None = None
    public_url: str | None = None
    login_ttl: float = 120.0
    session_ttl: float = 8 * 3600.0
    audit_log: Path | None = None
    audit_key: Path | None = None
    audit_writer: str = "coordinator"

    @classmethod
    def load(cls, path: str | Path) -> "DashboardConfig | None":
        from insitu.tomltable import read_table

        path = Path(path)
        raw = read_table(path, "dashboard", cls, paths=("port_file", "audit_log", "audit_key"), optional=True)
        if raw is None:
            return None
        cfg = cls(**raw)
        if not isinstance(cfg.port, int) or not 0 <= cfg.port < 65536:
            raise ConfigError(f"{path}: [dashboard] port must be 0-65535, got {cfg.port!r}")
        for k in ("login_ttl", "session_ttl"):
            if not getattr(cfg, k) > 0:
                raise ConfigError(f"{path}: [dashboard] {k} must be positive, got {getattr(cfg, k)!r}")
        if (cfg.audit_log is None) != (cfg.audit_key is None):
            raise ConfigError(f"{path}: [dashboard] audit_log and audit_key go together (the chain is signed with the key)")
        return cfg


class AuditTrail:
    """The coordinator's own audit chain (every model release) and its verified state."""

    def __init__(self, path: Path, key: Path, writer: str):
        from insitu.audit import AuditLog

        self.path, self.keys_dir = path, key.parent
        self.log = AuditLog.open(path, key, writer)
        self._state: dict[str, Any] = {}
        self._checked = 0.0
        self._lock = threading.Lock()

    def record(self, action: str, subject: str, details: Mapping[str, Any]) -> None:
        try:
            with self._lock:
                self.log.append(action, subject, details)
                self._checked = 0.0
        except InsituError as exc:
            log.error("audit log %s: cannot record %s %s: %s", self.path, action, subject, exc)

    def state(self, every: float = 5.0) -> dict[str, Any]:
        """Verify the chain (every hash link and signature) at most every ``every`` seconds."""
        from insitu.audit import AuditLog
        from insitu.audit.keys import load_public_keys

        with self._lock:
            if time.time() - self._checked < every:
                return self._state
            try:
                with AuditLog.read(self.path) as reader:
                    rep = reader.verify(load_public_keys(self.keys_dir))
                self._state = {"configured": True, "ok": rep.ok, "entries": rep.entries_checked, "first_bad": rep.first_bad_seq,
                               "reason": rep.reason, "head": {"seq": rep.head.seq, "hash": rep.head.entry_hash} if rep.head else None,
                               "writers": list(rep.writers), "verified_at": time.time(), "log": str(self.path)}
            except InsituError as exc:
                self._state = {"configured": True, "ok": False, "reason": str(exc), "verified_at": time.time(), "log": str(self.path)}
            self._checked = time.time()
            return self._state

    def close(self) -> None:
        self.log.close()


class Dashboard(WebApp):
    """The dashboard's routes over a running :class:`~insitu.coordinator.service.CoordinatorService`."""

    public = ("/login",)

    def __init__(self, svc: Any, cfg: DashboardConfig, *, ca: Path, crl: Path):
        super().__init__(WEB / "static")
        self.svc, self.cfg = svc, cfg
        # beside coordinator.db, so a restarted coordinator keeps its operators' sessions
        self.sessions = Sessions(cfg.login_ttl, cfg.session_ttl, path=Path(svc.config.db).with_name("dashboard-sessions.sqlite"))
        self.crl = RevocationList(crl, ca)
        self.audit = AuditTrail(cfg.audit_log, cfg.audit_key, cfg.audit_writer) if cfg.audit_log and cfg.audit_key else None
        self.url = ""
        r = self.route
        r("GET", "/", self.index)
        r("GET", r"/static/([A-Za-z0-9_.-]+)", self.static)
        r("GET", "/login", self.login)
        r("POST", "/api/logout", self.logout)
        r("GET", "/api/session", self.session)
        r("GET", "/api/overview", lambda req: Response.of_json(self.overview(req.who)))
        r("GET", "/api/stream", self.stream)
        r("POST", "/api/jobs", self.submit)
        r("GET", r"/api/jobs/([^/]+)", lambda req: Response.of_json(self.job(req.match.group(1))))
        r("GET", r"/api/jobs/([^/]+)/logs", self.logs)
        r("POST", r"/api/jobs/([^/]+)/cancel", self.cancel)
        r("GET", r"/api/jobs/([^/]+)/model", self.model)

    # -- who ---------------------------------------------------------------------------------------
    def authenticate(self, req: Request) -> Principal | None:
        if req.peer_der:
            try:
                ident = identity_of(req.peer_der)
            except SecurityError as exc:
                raise HTTPError(403, f"certificate refused: {exc}", page=_refused(str(exc))) from None
            self.crl.refresh()
            if self.crl.is_revoked(ident.serial):
                raise HTTPError(403, f"certificate of {ident.name} is revoked", page=_refused(f"the certificate of {ident.name} is revoked"))
            if ident.role is not Role.OPERATOR:
                why = f"certificate {ident.name} has role {ident.role.value}; the dashboard is for operators only"
                log.warning("dashboard: refused %s", why)
                raise HTTPError(403, why, page=_refused(why))
            return Principal(ident.name, "certificate")
        sid = req.cookies.get(SESSION_COOKIE)
        return self.sessions.lookup(sid) if sid else None

    def unauthenticated(self, req: Request) -> Response:
        if req.path.startswith("/api/"):
            return Response.of_json({"error": "not logged in: present an operator certificate, or open the link of "
                                               "`insitu coordinator login --config operator.toml`"}, 401)
        return Response.html(LOGIN_PAGE, 401)

    def mint(self, args: Mapping[str, Any], who: Identity) -> dict[str, Any]:
        """The operator request ``login``: a one-time link for a browser session as ``who``."""
        token = self.sessions.mint(who.name)
        return {"url": f"{self.url}/login?token={token}", "expires_in": self.cfg.login_ttl, "operator": who.name}

    def login(self, req: Request) -> Response:
        hit = self.sessions.redeem(req.arg("token") or "")
        if hit is None:
            return Response.html(_refused("this login link was already used or has expired; run "
                                          "`insitu coordinator login --config operator.toml` for a new one"), 401)
        sid, name = hit
        log.info("dashboard: operator %s logged in with a login link", name)
        return Response(b"", 303, "text/plain", {"Location": "/", "Set-Cookie": session_cookie(sid, self.cfg.session_ttl, secure=True)})

    def logout(self, req: Request) -> Response:
        sid = req.cookies.get(SESSION_COOKIE)
        if sid:
            self.sessions.drop(sid)
        return Response(b"{}", 200, headers={"Set-Cookie": session_cookie("", 0, secure=True)})

    def session(self, req: Request) -> Response:
        who = req.who
        assert who is not None
        return Response.of_json({"operator": who.name, "via": who.via, "csrf": who.csrf or "certificate"})

    def index(self, req: Request) -> Response:
        return Response.html((WEB / "index.html").read_text())

    # -- what the pages show -------------------------------------------------------------------------
    def _op(self, op: str, args: Mapping[str, Any], who: Principal | None) -> Any:
        """A read-only operator request, answered directly (not logged: pages refresh every second)."""
        from insitu.coordinator.service import OperatorOp

        return self.svc._ops[OperatorOp(op)](args, Identity(who.name if who else "dashboard", Role.OPERATOR, 0))

    def overview(self, who: Principal | None) -> dict[str, Any]:
        from insitu.coordinator.monitor import progress, site_rows

        jobs = []
        for j in reversed(self.svc.store.jobs()[-100:]):
            row = j.public()
            if j.status.value in ("queued", "waiting", "running"):
                row["progress"] = progress(row, self.svc.store.rounds(j.id))
                if j.id in self.svc.approvals:
                    row["approval"] = self.svc.approvals[j.id]
            jobs.append(row)
        return {"now": time.time(), "sites": site_rows(self.svc.server.transport.site_status()), "jobs": jobs,
                "audit": self.audit.state() if self.audit else {"configured": False}}

    def job(self, name: str) -> dict[str, Any]:
        try:
            return self._op("status", {"job": name}, None)
        except ConfigError as exc:
            raise HTTPError(404, str(exc)) from None

    def logs(self, req: Request) -> Response:
        try:
            return Response.of_json(self._op("logs", {"job": req.match.group(1)}, req.who))
        except ConfigError as exc:
            raise HTTPError(404, str(exc)) from None

    def stream(self, req: Request) -> Stream:
        job = req.arg("job")
        who = req.who

        def events() -> Iterator[tuple[str, Any] | None]:
            last, quiet = "", 0.0
            while not self.stopping.is_set():
                state: dict[str, Any] = {"overview": self.overview(who)}
                if job:
                    try:
                        state["job"] = self.job(job)
                    except HTTPError as exc:
                        state["job"] = {"error": exc.message}
                blob = json.dumps({**state, "overview": {**state["overview"], "now": 0}}, sort_keys=True, default=str)
                if blob != last:
                    last, quiet = blob, time.monotonic()
                    yield "state", state
                elif time.monotonic() - quiet > 15:
                    quiet = time.monotonic()
                    yield None
                self.stopping.wait(1.0)

        return Stream(events())

    # -- what operators do -------------------------------------------------------------------------
    def _act(self, op: str, args: Mapping[str, Any], who: Principal) -> Any:
        try:
            return self.svc.operator(op, args, Identity(who.name, Role.OPERATOR, 0))
        except InsituError as exc:
            raise HTTPError(400, str(exc)) from None

    def submit(self, req: Request) -> Response:
        body = req.json()
        if not isinstance(body, dict) or not isinstance(body.get("toml"), str):
            raise HTTPError(400, 'send {"toml": "<the job.toml text>"}')
        try:
            job = tomllib.loads(body["toml"])
        except tomllib.TOMLDecodeError as exc:
            raise HTTPError(400, f"job.toml does not parse: {exc}") from None
        assert req.who is not None
        res = self._act("submit", {"job": job}, req.who)
        return Response.of_json(res, 201)

    def cancel(self, req: Request) -> Response:
        assert req.who is not None
        return Response.of_json(self._act("cancel", {"job": req.match.group(1)}, req.who))

    def model(self, req: Request) -> Response:
        from insitu.coordinator.publish import write_run_dir

        assert req.who is not None
        reply = self._act("model", {"job": req.match.group(1)}, req.who)
        summary = reply.result["summary"]
        buf = io.BytesIO()
        with tempfile.TemporaryDirectory() as tmp:
            run = write_run_dir(Path(tmp) / "run", reply.result, reply.tensors)
            with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
                for p in sorted(run.iterdir()):
                    z.write(p, f"{summary['job']}-v{summary['model_version']}/{p.name}")
        name = f"{summary['job']}-v{summary['model_version']}.zip"
        return Response(buf.getvalue(), 200, "application/zip", {"Content-Disposition": f'attachment; filename="{name}"'})

    def audit_release(self, who: str, result: Mapping[str, Any]) -> None:
        if self.audit:
            s = result["summary"]
            self.audit.record("model.release", s["job"], {"operator": who, "model_version": s["model_version"],
                                                          "params_sha256": s["params_sha256"], "plan_hash": s["plan_hash"]})


def _refused(why: str) -> str:
    from insitu.net.web import _escape

    return ("<!doctype html><html lang=en><head><meta charset=utf-8><title>insitu · refused</title>"
            "</head><body class=refused><main><h1>Refused</h1>"
            f"<p id=refused>{_escape(why)}</p></main></body></html>")


LOGIN_PAGE = """<!doctype html><html lang=en><head><meta charset=utf-8><title>insitu · log in</title></head>
<body><main id=login><h1>insitu coordinator</h1>
<p>This dashboard is for the consortium's operators. Present an operator certificate, or run</p>
<pre>insitu coordinator login --config operator.toml</pre>
<p>on a machine that holds the operator certificate, and open the one-time link it prints.</p></main></body></html>"""


def start(svc: Any, config_path: str | Path) -> tuple[Dashboard, WebServer] | None:
    """Start the dashboard of ``coordinator.toml`` (None if it has no [dashboard] table)."""
    from insitu.coordinator.service import CoordinatorConfig, OperatorOp

    cfg = DashboardConfig.load(config_path)
    if cfg is None:
        return None
    cc = CoordinatorConfig.load(config_path)
    app = Dashboard(svc, cfg, ca=cc.ca, crl=cc.crl)
    ctx_lock = threading.Lock()
    cache: dict[str, Any] = {"version": None, "ctx": None}

    def tls():  # rebuilt when the CA publishes a new revocation list
        with ctx_lock:
            app.crl.refresh()
            if cache["version"] != app.crl.version:
                cache["ctx"] = tls13_server_context(cc.cert, cc.key, cc.ca, cc.crl)
                cache["version"] = app.crl.version
            return cache["ctx"]

    server = WebServer(app, cfg.host, cfg.port, tls).start()
    host = cfg.host if cfg.host not in ("0.0.0.0", "::", "") else "localhost"
    app.url = (cfg.public_url or f"https://{host}:{server.port}").rstrip("/")
    svc._ops[OperatorOp.LOGIN] = app.mint
    if app.audit:
        inner = svc._ops[OperatorOp.MODEL]

        def audited_model(args, who):
            reply = inner(args, who)
            app.audit_release(who.name, reply.result)
            return reply

        svc._ops[OperatorOp.MODEL] = audited_model
    if cfg.port_file is not None:
        tmp = cfg.port_file.with_suffix(".tmp")
        tmp.write_text(str(server.port))
        tmp.replace(cfg.port_file)
    log.info("dashboard on %s (TLS 1.3; operator certificate or `insitu coordinator login`)", app.url)
    return app, server


__all__ = ["Dashboard", "DashboardConfig", "AuditTrail", "start"]
