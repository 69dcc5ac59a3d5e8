"""The site console: the hospital data officer's web page, served on 127.0.0.1 only.

``insitu site console --config site.toml`` serves it beside the site (a separate process that
reads and writes the same state directory, so approvals take effect at the site's next round
without a restart).  It shows:

* the tasks waiting for approval, each with its full specification (model, schema,
  hyper-parameters, DP noise) and the ε a round would cost *this* site by its own accountant;
* buttons to approve (optionally with hyper-parameter ranges) or to refuse with a reason;
* the rounds this site trained (``state/rounds.jsonl``), its privacy ledger (budget, ε spent,
  one row per charged round) and the rounds it refused (``state/refusals.jsonl``).

Who gets in: the server binds 127.0.0.1 and nothing else, refuses requests whose ``Host`` is not
this machine's loopback (so a web page cannot reach it through DNS rebinding), and asks for a
session that a one-time login link opens.  The link is printed at start and kept in
``state/console.url`` (mode 0600: readable by the site's own user only); each use replaces it
with a fresh one.  Approving and refusing need the session's CSRF header, like the dashboard.
"""
from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

from insitu.errors import ConfigError, InsituError
from insitu.net.web import (SESSION_COOKIE, HTTPError, Principal, Request, Response, Sessions, WebApp, WebServer,
                            session_cookie)
from insitu.site.policy import Approvals, Range, SitePolicy

log = logging.getLogger("insitu.site.console")
WEB = Path(__file__).with_name("web")
LOOPBACK = ("127.0.0.1", "localhost", "[::1]")


def _site_name(cert: Path) -> str:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    c = x509.load_pem_x509_certificate(Path(cert).read_bytes())
    return str(c.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


class SiteConsole(WebApp):
    """Routes of the console over one site's ``site.toml`` and state directory."""

    public = ("/login",)

    def __init__(self, config: str | Path, *, login_ttl: float = 600.0, session_ttl: float = 8 * 3600.0):
        super().__init__(WEB / "static")
        self.config = Path(config)
        policy = SitePolicy.load(self.config)  # fails now, not at the first request, if site.toml is wrong
        policy.state.mkdir(parents=True, exist_ok=True)
        self.site = _site_name(policy.cert)
        self.sessions = Sessions(login_ttl, session_ttl, path=policy.state / "console-sessions.sqlite")
        self.port = 0
        self._n_train: list[int] = []  # this site's training records, loaded once when a DP task needs it
        self._lock = threading.Lock()
        r = self.route
        r("GET", "/", lambda req: Response.html((WEB / "index.html").read_text()))
        r("GET", r"/static/([A-Za-z0-9_.-]+)", self.static)
        r("GET", "/login", self.login)
        r("GET", "/api/session", lambda req: Response.of_json({"site": self.site, "csrf": req.who.csrf if req.who else None}))
        r("GET", "/api/state", self.state)
        r("POST", r"/api/tasks/([0-9a-f]{64})/approve", self.approve)
        r("POST", r"/api/tasks/([0-9a-f]{64})/refuse", self.refuse)

    @property
    def policy(self) -> SitePolicy:
        return SitePolicy.load(self.config)  # re-read: the admin may edit site.toml while the console runs

    # -- who ---------------------------------------------------------------------------------------
    def _check_host(self, req: Request) -> None:
        host = req.headers.get("Host", "")
        name = host.rsplit(":", 1)[0] if not host.startswith("[") else host.split("]")[0] + "]"
        if name not in LOOPBACK:
            raise HTTPError(403, f"the site console answers only on this machine's loopback address, not Host {host!r}")

    def dispatch(self, req: Request):
        self._check_host(req)
        return super().dispatch(req)

    def authenticate(self, req: Request) -> Principal | None:
        sid = req.cookies.get(SESSION_COOKIE)
        return self.sessions.lookup(sid) if sid else None

    def unauthenticated(self, req: Request) -> Response:
        if req.path.startswith("/api/"):
            return Response.of_json({"error": "log in with the link `insitu site console` printed (also in state/console.url)"}, 401)
        return Response.html(LOGIN_PAGE, 401)

    def new_link(self) -> str:
        """A fresh one-time login link, also written to ``state/console.url`` (0600)."""
        url = f"http://127.0.0.1:{self.port}/login?token={self.sessions.mint(self.site)}"
        path = self.policy.state / "console.url"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(url + "\n")
        os.chmod(path, 0o600)
        return url

    def login(self, req: Request) -> Response:
        hit = self.sessions.redeem(req.arg("token") or "")
        if hit is None:
            return Response.html(LOGIN_PAGE.replace("<p>", "<p><strong>That link was already used or has expired.</strong> ", 1), 401)
        sid, _ = hit
        self.new_link()  # the file always holds a link that still works
        log.info("site console: a browser logged in")
        return Response(b"", 303, "text/plain", {"Location": "/", "Set-Cookie": session_cookie(sid, self.sessions.session_ttl, secure=False)})

    # -- what the page shows and does --------------------------------------------------------------
    def state(self, req: Request) -> Response:
        from insitu.site.review import site_state

        with self._lock:
            st = site_state(self.policy, self._n_train)
        return Response.of_json({"site": self.site, **st})

    def approve(self, req: Request) -> Response:
        body = req.json() or {}
        h = req.match.group(1)
        try:
            ranges = {k: Range.parse(k, v) for k, v in (body.get("ranges") or {}).items()}
            policy = self.policy
            entry = Approvals(policy.state, policy.approved).approve(h, ranges)
        except InsituError as exc:
            raise HTTPError(400, str(exc)) from None
        log.info("site console: approved task %s%s", h, f" with ranges {sorted(ranges)}" if ranges else "")
        return Response.of_json({"approved": h, "ranges": entry["ranges"]})

    def refuse(self, req: Request) -> Response:
        body = req.json() or {}
        h = req.match.group(1)
        reason = str(body.get("reason") or "")[:500]
        policy = self.policy
        if h in policy.approved:
            raise HTTPError(400, f"task {h[:12]} is approved in site.toml ([policy] approved); remove it there first")
        try:
            Approvals(policy.state, policy.approved).refuse(h, reason)
        except InsituError as exc:
            raise HTTPError(400, str(exc)) from None
        log.info("site console: refused task %s: %s", h, reason or "no reason given")
        return Response.of_json({"refused": h, "reason": reason})


LOGIN_PAGE = """<!doctype html><html lang=en><head><meta charset=utf-8><title>insitu · site console</title></head>
<body><main id=login><h1>insitu site console</h1>
<p>Open the one-time link that <code>insitu site console</code> printed; a fresh one is always in
<code>state/console.url</code> (readable by the site's own user only).</p></main></body></html>"""


def start_console(config: str | Path, *, port: int = 8470) -> tuple[SiteConsole, WebServer, str]:
    """Serve the console on 127.0.0.1:``port`` in a background thread; returns (app, server, login link)."""
    app = SiteConsole(config)
    try:
        server = WebServer(app, "127.0.0.1", port).start()
    except OSError as exc:
        raise ConfigError(f"cannot serve the site console on 127.0.0.1:{port}: {exc} (try --port 0)") from None
    app.port = server.port
    return app, server, app.new_link()


def serve_console(config: str | Path, *, port: int = 8470, open_browser: bool = False) -> None:
    """Run the console until interrupted."""
    import signal

    app, server, url = start_console(config, port=port)
    print(f"site console of {app.site} on http://127.0.0.1:{server.port} (this machine only); log in with:\n{url}", flush=True)
    if open_browser:
        import webbrowser

        webbrowser.open(url)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


__all__ = ["SiteConsole", "start_console", "serve_console"]
