"""A small web server for insitu's own pages (the coordinator's dashboard, a site's console).

Standard library only (``http.server`` + ``ssl``): a threaded server, routes, sessions and
Server-Sent Events, with the rules both pages share:

* **who** is decided once per request by the page's ``authenticate`` hook, from the TLS client
  certificate (verified by OpenSSL against the consortium CA) or from a session cookie that a
  one-time, short-lived login token was exchanged for (:class:`Sessions`);
* **state-changing requests** (POST) must carry the session's CSRF token in the
  ``X-Insitu-CSRF`` header; a browser cannot add that header to a cross-site request without a
  CORS pre-flight, which this server never grants.  Requests whose ``Origin`` is not this
  server are refused too;
* **every response** carries a strict Content-Security-Policy (scripts, styles and connections
  from this origin only: no CDN, no inline script), ``nosniff``, no referrer, no framing and
  ``no-store``;
* the TLS handshake runs in the request's thread, never in the accept loop, so a slow or
  hostile client cannot stall the others.
"""
from __future__ import annotations

import hashlib
import http.server
import json
import logging
import mimetypes
import os
import re
import secrets
import socket
import sqlite3
import ssl
import threading
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping
from urllib.parse import parse_qs, urlsplit

log = logging.getLogger("insitu.web")

SESSION_COOKIE = "insitu_session"
#: assets shared by every page (styles, chart helpers): served from this package, never a CDN
SHARED_STATIC = Path(__file__).with_name("webstatic")
CSRF_HEADER = "X-Insitu-CSRF"
MAX_BODY = 1 << 20
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "form-action 'self'; base-uri 'none'; frame-ancestors 'none'")


class HTTPError(Exception):
    """An answer other than 200: status, a message for the user and (optionally) an HTML page."""

    def __init__(self, status: int, message: str, *, page: str | None = None):
        super().__init__(message)
        self.status, self.message, self.page = status, message, page


@dataclass(frozen=True)
class Principal:
    """Who sent a request: a name and how it was established."""

    name: str
    via: str  # "certificate", "login" or "local"
    csrf: str | None = None  # the session's CSRF token (None: certificate clients get one per page load)


@dataclass
class Request:
    method: str
    path: str
    query: Mapping[str, list[str]]
    headers: Mapping[str, str]
    body: bytes
    peer_der: bytes | None
    cookies: Mapping[str, str]
    match: re.Match | None = None
    who: Principal | None = None

    def arg(self, name: str, default: str | None = None) -> str | None:
        v = self.query.get(name)
        return v[0] if v else default

    def json(self) -> Any:
        try:
            return json.loads(self.body or b"null")
        except ValueError as exc:
            raise HTTPError(400, f"request body is not JSON: {exc}") from None


@dataclass
class Response:
    body: bytes = b""
    status: int = 200
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of_json(cls, obj: Any, status: int = 200) -> "Response":
        return cls(json.dumps(obj, default=_jsonable).encode(), status)

    @classmethod
    def html(cls, text: str, status: int = 200) -> "Response":
        return cls(text.encode(), status, "text/html; charset=utf-8")


@dataclass
class Stream:
    """A Server-Sent Events response: ``events`` yields (event name, JSON-able data) or None (a keep-alive)."""

    events: Iterator[tuple[str, Any] | None]


def _jsonable(v: Any) -> Any:
    if hasattr(v, "item"):
        return v.item()
    if isinstance(v, (set, tuple)):
        return list(v)
    return str(v)


class Sessions:
    """One-time login tokens and the browser sessions they become.

    Only SHA-256 digests of tokens and session ids are kept.  With ``path`` they are kept in a
    SQLite file (created readable by this user only), so a restart of the coordinator or the
    site does not log its operators out and an expired session is gone for every process that
    shares the file; without it, in memory.
    """

    _SCHEMA = (
        "CREATE TABLE IF NOT EXISTS login_tokens (digest TEXT PRIMARY KEY, name TEXT NOT NULL, expires REAL NOT NULL)",
        "CREATE TABLE IF NOT EXISTS sessions (digest TEXT PRIMARY KEY, name TEXT NOT NULL, expires REAL NOT NULL, csrf TEXT NOT NULL)",
    )

    def __init__(self, login_ttl: float = 120.0, session_ttl: float = 8 * 3600.0, path: Path | None = None):
        self.login_ttl, self.session_ttl = login_ttl, session_ttl
        self.path = Path(path) if path is not None else None
        self._lock = threading.Lock()
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
        self._db = sqlite3.connect(self.path or ":memory:", check_same_thread=False, isolation_level=None)
        if self.path is not None:
            self._db.execute("PRAGMA journal_mode=WAL")
        for stmt in self._SCHEMA:
            self._db.execute(stmt)

    @staticmethod
    def _key(secret: str) -> str:
        return hashlib.sha256(secret.encode()).hexdigest()  # only digests are kept

    def mint(self, name: str) -> str:
        token = secrets.token_urlsafe(32)
        with self._lock:
            self._expire()
            self._db.execute("INSERT INTO login_tokens VALUES (?,?,?)", (self._key(token), name, time.time() + self.login_ttl))
        return token

    def redeem(self, token: str) -> tuple[str, str] | None:
        """Exchange a login token (once, before it expires) for (session id, operator name)."""
        with self._lock:
            self._expire()
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                row = db.execute("SELECT name FROM login_tokens WHERE digest=?", (self._key(token),)).fetchone()
                if row is None:
                    db.execute("COMMIT")
                    return None
                db.execute("DELETE FROM login_tokens WHERE digest=?", (self._key(token),))
                sid = secrets.token_urlsafe(32)
                db.execute("INSERT INTO sessions VALUES (?,?,?,?)",
                           (self._key(sid), row[0], time.time() + self.session_ttl, secrets.token_urlsafe(24)))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            return sid, row[0]

    def lookup(self, sid: str) -> Principal | None:
        with self._lock:
            row = self._db.execute("SELECT name, expires, csrf FROM sessions WHERE digest=?", (self._key(sid),)).fetchone()
        if row is None or row[1] < time.time():
            return None
        return Principal(row[0], "login", row[2])

    def drop(self, sid: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM sessions WHERE digest=?", (self._key(sid),))

    def _expire(self) -> None:
        now = time.time()
        self._db.execute("DELETE FROM login_tokens WHERE expires <= ?", (now,))
        self._db.execute("DELETE FROM sessions WHERE expires <= ?", (now,))


Route = tuple[str, re.Pattern, Callable[[Request], "Response | Stream"]]


class WebApp:
    """Routes plus the page's authentication; subclasses fill ``routes`` and ``authenticate``."""

    #: served without authentication (nothing else is)
    public: tuple[str, ...] = ()

    def __init__(self, *static_dirs: Path):
        self.static_dirs = (*static_dirs, SHARED_STATIC)
        self.routes: list[Route] = []
        self.stopping = threading.Event()

    def route(self, method: str, pattern: str, fn: Callable[[Request], "Response | Stream"]) -> None:
        self.routes.append((method, re.compile(pattern + r"\Z"), fn))

    def authenticate(self, req: Request) -> Principal | None:  # pragma: no cover - every page overrides it
        raise NotImplementedError

    def unauthenticated(self, req: Request) -> Response:
        """The answer to a visitor that no certificate or session identifies."""
        if req.path.startswith("/api/"):
            return Response.of_json({"error": "log in first"}, 401)
        return Response.html("<!doctype html><title>insitu</title><p>Log in first.</p>", 401)

    def static(self, req: Request) -> Response:
        """An asset of this package (the page's own directory first, then the shared one); nothing else."""
        name = req.match.group(1) if req.match else ""
        for d in self.static_dirs:
            path = (d / name).resolve()
            if name and path.is_file() and d.resolve() in path.parents:
                break
        else:
            raise HTTPError(404, f"no asset {name!r}")
        ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        if ctype.startswith("text/") or ctype == "application/javascript":
            ctype += "; charset=utf-8"
        return Response(path.read_bytes(), 200, ctype)

    def dispatch(self, req: Request) -> "Response | Stream":
        allowed = [m for m, pat, _ in self.routes if pat.match(req.path)]
        for method, pat, fn in self.routes:
            m = pat.match(req.path)
            if m and method == req.method:
                req.match = m
                break
        else:
            if allowed:
                raise HTTPError(405, f"{req.method} is not allowed on {req.path}")
            raise HTTPError(404, f"nothing at {req.path}")
        if req.path not in self.public:
            req.who = self.authenticate(req)  # raises HTTPError(403) for the wrong kind of client
            if req.who is None:
                return self.unauthenticated(req)
            if req.method != "GET":
                self._check_csrf(req)
        return fn(req)

    def _check_csrf(self, req: Request) -> None:
        sent = req.headers.get(CSRF_HEADER, "")
        expected = req.who.csrf if req.who else None
        if not sent or (expected is not None and not secrets.compare_digest(sent, expected)):
            raise HTTPError(403, f"missing or wrong {CSRF_HEADER} header (reload the page)")


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "insitu"
    sys_version = ""
    server: "WebServer"

    def setup(self) -> None:
        sock = self.request
        if isinstance(sock, ssl.SSLSocket):
            sock.settimeout(10)
            sock.do_handshake()  # here, in this connection's thread; failures end the connection
        sock.settimeout(60)
        super().setup()

    def log_message(self, fmt: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), fmt % args)

    def do_GET(self) -> None:
        self._run("GET")

    def do_POST(self) -> None:
        self._run("POST")

    def _run(self, method: str) -> None:
        app = self.server.app
        url = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        try:
            if length > MAX_BODY:
                raise HTTPError(413, f"request body of {length} bytes is over {MAX_BODY}")
            body = self.rfile.read(length) if length else b""
            origin = self.headers.get("Origin")
            if origin and method != "GET" and urlsplit(origin).netloc != self.headers.get("Host"):
                raise HTTPError(403, f"cross-origin request from {origin} refused")
            der = self.request.getpeercert(binary_form=True) if isinstance(self.request, ssl.SSLSocket) else None
            req = Request(method, url.path, parse_qs(url.query), {k: v for k, v in self.headers.items()}, body, der, _cookies(self.headers))
            res = app.dispatch(req)
        except HTTPError as exc:
            if exc.page is not None:
                res = Response.html(exc.page, exc.status)
            elif url.path.startswith("/api/"):
                res = Response.of_json({"error": exc.message}, exc.status)
            else:
                res = Response.html(f"<!doctype html><title>insitu</title><p>{_escape(exc.message)}</p>", exc.status)
        except Exception as exc:  # a bug must not take the server down; the client gets a 500
            log.exception("%s %s failed", method, url.path)
            res = Response.of_json({"error": f"{type(exc).__name__}: {exc}"}, 500)
        if isinstance(res, Stream):
            self._stream(res)
        else:
            self._send(res)

    def _headers(self, status: int, ctype: str, extra: Mapping[str, str]) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Security-Policy", CSP)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("X-Frame-Options", "DENY")
        self.send_header("Cache-Control", "no-store")
        if isinstance(self.request, ssl.SSLSocket):
            self.send_header("Strict-Transport-Security", "max-age=31536000")
        for k, v in extra.items():
            self.send_header(k, v)

    def _send(self, res: Response) -> None:
        self._headers(res.status, res.content_type, res.headers)
        self.send_header("Content-Length", str(len(res.body)))
        self.end_headers()
        self.wfile.write(res.body)

    def _stream(self, res: Stream) -> None:
        self.close_connection = True
        self._headers(200, "text/event-stream", {"Connection": "close", "X-Accel-Buffering": "no"})
        self.end_headers()
        try:
            for item in res.events:
                if self.server.app.stopping.is_set():
                    break
                if item is None:
                    self.wfile.write(b": keep-alive\n\n")
                else:
                    name, data = item
                    self.wfile.write(f"event: {name}\ndata: {json.dumps(data, default=_jsonable)}\n\n".encode())
                self.wfile.flush()
        except (OSError, ssl.SSLError):
            pass  # the browser went away
        finally:
            close = getattr(res.events, "close", None)
            if close:
                close()


def _cookies(headers: Any) -> dict[str, str]:
    out = {}
    for part in (headers.get("Cookie") or "").split(";"):
        k, sep, v = part.strip().partition("=")
        if sep:
            out[k] = v
    return out


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def session_cookie(sid: str, max_age: float, *, secure: bool) -> str:
    return f"{SESSION_COOKIE}={sid}; Path=/; HttpOnly; SameSite=Strict; Max-Age={int(max_age)}" + ("; Secure" if secure else "")


class WebServer(http.server.ThreadingHTTPServer):
    """Serves one :class:`WebApp`, over TLS when ``tls`` gives a context for each handshake."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, app: WebApp, host: str, port: int, tls: Callable[[], ssl.SSLContext] | None = None):
        self.app, self.tls = app, tls
        super().__init__((host, port), _Handler)
        self.port = self.server_address[1]
        self._thread: threading.Thread | None = None

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, addr = self.socket.accept()
        if self.tls is None:
            return sock, addr
        try:
            return self.tls().wrap_socket(sock, server_side=True, do_handshake_on_connect=False), addr
        except (OSError, ssl.SSLError):
            sock.close()
            raise

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        exc = sys.exc_info()[1]
        if isinstance(exc, (ssl.SSLError, ConnectionError, TimeoutError, OSError)):
            log.info("connection from %s ended: %s", client_address[0], exc)
        else:
            log.exception("request from %s failed", client_address[0])

    def start(self) -> "WebServer":
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True, name="web")
        self._thread.start()
        return self

    def stop(self) -> None:
        self.app.stopping.set()
        self.shutdown()
        self.server_close()


def tls13_server_context(cert: Path, key: Path, ca: Path | None = None, crl: Path | None = None) -> ssl.SSLContext:
    """TLS 1.3 only; with ``ca``, a client certificate is asked for (optional) and verified against it and ``crl``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(str(cert), str(key))
    if ca is not None:
        ctx.load_verify_locations(cafile=str(ca))
        if crl is not None:
            ctx.load_verify_locations(cafile=str(crl))
            ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
        ctx.verify_flags |= ssl.VERIFY_X509_STRICT
        ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


def status_text(code: int) -> str:
    try:
        return HTTPStatus(code).phrase
    except ValueError:
        return str(code)


__all__ = ["WebApp", "WebServer", "Request", "Response", "Stream", "HTTPError", "Principal", "Sessions",
           "session_cookie", "tls13_server_context", "SESSION_COOKIE", "CSRF_HEADER"]
