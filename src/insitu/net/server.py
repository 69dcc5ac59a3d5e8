"""The coordinator's network side: one TLS port, site channels, and the network :class:`Transport`.

Sites dial in and keep one channel each; the round engine sees them only
through :meth:`NetworkTransport.exchange`.  Threads: one accept loop, one
handshake-and-reader thread per connection, one heart-beat ticker.  A request
is written from the exchanging thread and its reply is matched by sequence
number in the reader thread; ``exchange`` waits on all replies until its
deadline, so a slow, silent or disconnected site is *dropped*, never waited for.

Who may do what is decided from the verified certificate only:

* role ``site``: becomes (or replaces) the channel for the site named by its CN;
* role ``operator``: may send OPERATOR requests (submit/cancel/status/list);
* anything else, or a site sending OPERATOR requests, is refused.
"""
from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from insitu.errors import InsituError, ProtocolError, SecurityError
from insitu.federation.messages import Message, MessageKind
from insitu.federation.transport import Exchange, error_reason, refusal_code
from insitu.net.channel import Channel, ServerTLS
from insitu.net.pki import Credentials, Identity, Role

log = logging.getLogger("insitu.coordinator.net")

@dataclass(frozen=True)
class OperatorReply:
    """An operator answer that carries arrays (e.g. a trained model) beside its JSON result."""

    result: Mapping[str, Any]
    tensors: Mapping[str, Any]


#: handles one operator request (op name, args, who asked) and returns a JSON-able reply
#: (or an :class:`OperatorReply` when arrays travel with it).
OperatorHandler = Callable[[str, Mapping[str, Any], Identity], "Mapping[str, Any] | OperatorReply"]


@dataclass(frozen=True)
class NetConfig:
    host: str = "127.0.0.1"
    port: int = 0  # 0: an ephemeral port, reported by CoordinatorServer.port
    heartbeat: float = 2.0  # seconds between heart-beats on an idle channel
    dead_after: float = 10.0  # a channel silent this long is closed
    hello_timeout: float = 10.0
    max_message: int = 64 * 1024 * 1024


class SiteConnection:
    """One live site channel; requests in flight are futures keyed by sequence number."""

    def __init__(self, channel: Channel, ident: Identity, info: Mapping[str, Any]):
        self.channel = channel
        self.ident = ident
        self.info = dict(info)
        self.last_seen = time.monotonic()
        self._pending: dict[int, Future] = {}
        self._lock = threading.Lock()
        self._seq = 0

    def request(self, msg: Message) -> tuple[Future, int, int]:
        """Send ``msg``; returns (future of (reply, size), sequence number, bytes sent)."""
        fut: Future = Future()
        with self._lock:
            if self.channel.closed:
                raise ConnectionError("channel closed")
            self._seq += 1
            seq = self._seq
            self._pending[seq] = fut
        try:
            size = self.channel.send(msg, seq)
        except (OSError, ssl.SSLError) as exc:
            self.fail(f"send failed: {exc}")
            raise ConnectionError(str(exc)) from None
        return fut, seq, size

    def resolve(self, seq: int, msg: Message, size: int) -> None:
        with self._lock:
            fut = self._pending.pop(seq, None)
        if fut is None:
            log.info("%s: discarding late or unsolicited reply #%d (%s)", self.ident.name, seq, msg.kind.value)
        elif not fut.done():
            fut.set_result((msg, size))

    def forget(self, seq: int) -> None:
        with self._lock:
            self._pending.pop(seq, None)

    def fail(self, why: str) -> None:
        with self._lock:
            pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(ConnectionError(why))
        self.channel.close()


class NetworkTransport:
    """The :class:`~insitu.federation.transport.Transport` over site channels."""

    def __init__(self) -> None:
        self._conns: dict[str, SiteConnection] = {}
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._seen: dict[str, dict[str, Any]] = {}  # every site that connected since start: when, and why it left

    # -- registry ------------------------------------------------------------------------------
    def attach(self, conn: SiteConnection) -> None:
        with self._lock:
            old = self._conns.get(conn.ident.name)
            self._conns[conn.ident.name] = conn
            self._seen[conn.ident.name] = {"connected_at": time.time(), "cert_not_after": _not_after(conn.channel),
                                           "connects": self._seen.get(conn.ident.name, {}).get("connects", 0) + 1}
            self._changed.notify_all()
        if old is not None:
            old.fail("replaced by a newer connection from the same site")

    def detach(self, conn: SiteConnection, why: str) -> None:
        with self._lock:
            if self._conns.get(conn.ident.name) is conn:
                del self._conns[conn.ident.name]
                self._seen.setdefault(conn.ident.name, {}).update(
                    {"offline_since": time.time(), "offline_reason": why, "last_seen": _wall(conn.last_seen)})
                self._changed.notify_all()
        conn.fail(why)

    def site_status(self) -> list[dict[str, Any]]:
        """Every site seen since the coordinator started: online or not (and why it left), its last
        heart-beat (wall-clock time), when its certificate expires, and what it said in its hello."""
        with self._lock:
            conns, seen = dict(self._conns), {k: dict(v) for k, v in self._seen.items()}
        out = []
        for name in sorted(seen):
            entry, conn = seen[name], conns.get(name)
            row = {"site": name, "online": conn is not None, "connected_at": entry.get("connected_at"),
                   "connects": entry.get("connects", 0), "cert_not_after": entry.get("cert_not_after")}
            if conn is not None:
                row["last_seen"] = _wall(conn.last_seen)
                row["info"] = dict(conn.info)
            else:
                row.update({k: entry.get(k) for k in ("last_seen", "offline_since", "offline_reason")})
            out.append(row)
        return out

    def connections(self) -> list[SiteConnection]:
        with self._lock:
            return list(self._conns.values())

    def wait_for(self, names: set[str] | None, count: int, timeout: float) -> list[str]:
        """Block until ``count`` sites (from ``names`` if given) are connected, or ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                have = [n for n in sorted(self._conns) if names is None or n in names]
                left = deadline - time.monotonic()
                if len(have) >= count or left <= 0:
                    return have
                self._changed.wait(min(left, 0.5))

    # -- Transport -----------------------------------------------------------------------------
    def sites(self) -> list[str]:
        with self._lock:
            return sorted(self._conns)

    def exchange(self, requests: Mapping[str, Message], timeout: float) -> Exchange:
        deadline = time.monotonic() + timeout
        replies: dict[str, Message] = {}
        dropped: dict[str, str] = {}
        sent: dict[str, int] = {}
        recv: dict[str, int] = {}
        waiting: dict[str, tuple[SiteConnection, Future, int]] = {}
        refused: dict[str, str] = {}
        for sid, req in requests.items():
            with self._lock:
                conn = self._conns.get(sid)
            if conn is None:
                dropped[sid] = "not connected"
                continue
            try:
                fut, seq, size = conn.request(req)
            except ConnectionError as exc:
                dropped[sid] = f"disconnected: {exc}"
                continue
            except ProtocolError as exc:  # e.g. the request is over the message size limit
                dropped[sid] = f"not sent: {exc}"
                continue
            sent[sid] = size
            waiting[sid] = (conn, fut, seq)
        for sid, (conn, fut, seq) in waiting.items():
            try:
                reply, size = fut.result(timeout=max(0.0, deadline - time.monotonic()))
            except FutureTimeout:
                conn.forget(seq)
                dropped[sid] = f"timed out after {timeout:.1f} s"
                continue
            except ConnectionError as exc:
                dropped[sid] = f"disconnected: {exc}"
                continue
            recv[sid] = size
            if reply.kind is MessageKind.ERROR:
                dropped[sid] = f"refused: {error_reason(reply)}"
                refused[sid] = refusal_code(reply)
            else:
                replies[sid] = reply
        ordered = {sid: replies[sid] for sid in requests if sid in replies}
        return Exchange(ordered, dropped, sent, recv, refused)


def _wall(monotonic: float) -> float:
    """A ``time.monotonic()`` reading as wall-clock seconds since the epoch."""
    return time.time() - (time.monotonic() - monotonic)


def _not_after(channel: Channel) -> float | None:
    """When the peer's (already verified) certificate expires, as epoch seconds."""
    try:
        from cryptography import x509

        der = channel.sock.getpeercert(binary_form=True)
        return x509.load_der_x509_certificate(der).not_valid_after_utc.timestamp() if der else None
    except (ValueError, OSError, AttributeError):
        return None


class CoordinatorServer:
    """Listens on one TLS port; routes site channels to the transport and operator calls to a handler."""

    def __init__(self, creds: Credentials, crl: Path, on_operator: OperatorHandler, config: NetConfig = NetConfig()):
        self.config = config
        self.tls = ServerTLS(creds, crl)
        self.transport = NetworkTransport()
        self.on_operator = on_operator
        self._sock = socket.create_server((config.host, config.port), backlog=64)
        self.port = self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> "CoordinatorServer":
        for target in (self._accept_loop, self._ticker):
            t = threading.Thread(target=target, daemon=True, name=f"coord-{target.__name__}")
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        self._stop.set()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes the accept loop; close alone leaves it listening
        except OSError:
            pass
        try:
            self._sock.close()
        except OSError:
            pass
        for conn in self.transport.connections():
            self.transport.detach(conn, "coordinator shutting down")

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                raw, addr = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(raw, addr), daemon=True, name=f"conn-{addr[1]}").start()

    def _serve(self, raw: socket.socket, addr) -> None:
        try:
            channel, ident = self.tls.accept(raw, self.config.hello_timeout)
        except Exception as exc:  # noqa: BLE001 - whatever a handshake raises refuses this connection only
            log.warning("refused connection from %s:%s: %s", addr[0], addr[1], exc)
            try:
                raw.close()
            except OSError:
                pass
            return
        channel.max_bytes = self.config.max_message
        log.info("channel from %s (%s) %s:%s", ident.name, ident.role.value, addr[0], addr[1])
        try:
            if ident.role is Role.SITE:
                self._serve_site(channel, ident)
            elif ident.role is Role.OPERATOR:
                self._serve_operator(channel, ident)
            else:
                log.warning("refused %s: role %s may not connect to the coordinator", ident.name, ident.role.value)
        except ProtocolError as exc:
            log.warning("channel from %s closed: malformed message: %s", ident.name, exc)
        except (ConnectionError, OSError, ssl.SSLError) as exc:
            log.info("channel from %s closed: %s", ident.name, exc)
        except Exception as exc:  # noqa: BLE001 - a peer must never end the process through this thread
            log.error("channel from %s closed after an unexpected %s: %s", ident.name, type(exc).__name__, exc)
            log.debug("unexpected error on the channel from %s", ident.name, exc_info=True)
        finally:
            channel.close()

    def _serve_site(self, channel: Channel, ident: Identity) -> None:
        channel.settimeout(self.config.hello_timeout)
        seq, hello, _ = channel.recv()
        if hello.kind is MessageKind.OPERATOR:
            log.warning("refused operator request from site %s: only operator certificates may run jobs", ident.name)
            channel.send(_refusal(hello, f"certificate {ident.name} has role site; only an operator certificate may {hello.meta.get('op', '?')} jobs"), seq)
            return
        if hello.kind is not MessageKind.HELLO:
            raise ProtocolError(f"{ident.name}: first message must be hello, got {hello.kind.value}")
        channel.settimeout(None)
        # the identity is the certificate's CN; a name claimed in the hello is ignored
        channel.send(Message(MessageKind.HELLO_REPLY, meta={"site": ident.name, "heartbeat": self.config.heartbeat}), seq)
        conn = SiteConnection(channel, ident, hello.meta)
        self.transport.attach(conn)
        why = "closed"
        try:
            while True:
                seq, msg, size = channel.recv()
                conn.last_seen = time.monotonic()
                if msg.kind is MessageKind.HEARTBEAT:
                    continue
                if msg.kind is MessageKind.BYE:
                    why = "site said bye"
                    return
                if msg.kind is MessageKind.OPERATOR:
                    log.warning("refused operator request from site %s: only operator certificates may run jobs", ident.name)
                    channel.send(_refusal(msg, f"certificate {ident.name} has role site; only an operator certificate may {msg.meta.get('op', '?')} jobs"), seq)
                    continue
                conn.resolve(seq, msg, size)
        except ProtocolError as exc:
            why = f"malformed message: {exc}"
        except (ConnectionError, OSError, ssl.SSLError) as exc:
            why = f"channel lost: {exc}"
        finally:
            self.transport.detach(conn, why)
            (log.warning if why.startswith("malformed") else log.info)("site %s detached: %s", ident.name, why)

    def _serve_operator(self, channel: Channel, ident: Identity) -> None:
        channel.settimeout(self.config.dead_after * 6)
        while True:
            seq, msg, _ = channel.recv()
            if msg.kind is MessageKind.BYE:
                return
            if msg.kind is not MessageKind.OPERATOR:
                channel.send(_refusal(msg, f"operator channel takes operator requests, not {msg.kind.value}"), seq)
                continue
            op = msg.meta.get("op")
            args = msg.meta.get("args", {})
            try:
                if not isinstance(op, str) or not isinstance(args, dict):
                    raise ProtocolError("operator request needs an 'op' string and an 'args' object")
                answer = self.on_operator(op, args, ident)
                tensors = dict(answer.tensors) if isinstance(answer, OperatorReply) else {}
                result = dict(answer.result if isinstance(answer, OperatorReply) else answer)
                reply = Message(MessageKind.OPERATOR_REPLY, meta={"op": op, "result": result}, tensors=tensors)
            except InsituError as exc:
                reply = _refusal(msg, str(exc), code=type(exc).__name__)
            except Exception as exc:  # noqa: BLE001 - the operator gets one line, never a closed channel
                log.exception("operator request %r from %s failed with an internal error", op, ident.name)
                text = " ".join(f"internal error while handling {op!r}: {type(exc).__name__}: {exc}".split())
                reply = _refusal(msg, text[:500], code="InternalError")
            channel.send(reply, seq)

    def _ticker(self) -> None:
        hb = Message(MessageKind.HEARTBEAT)
        seen = self.tls.crl.version
        while not self._stop.wait(self.config.heartbeat):
            now = time.monotonic()
            try:
                self.tls.crl.refresh()
            except SecurityError as exc:
                log.error("%s", exc)
            crl_changed, seen = self.tls.crl.version != seen, self.tls.crl.version
            for conn in self.transport.connections():
                if crl_changed and self.tls.crl.is_revoked(conn.ident.serial):
                    log.warning("site %s: certificate revoked; closing its channel", conn.ident.name)
                    self.transport.detach(conn, "certificate revoked")
                    continue
                if now - conn.last_seen > self.config.dead_after:
                    self.transport.detach(conn, f"silent for {now - conn.last_seen:.1f} s")
                    continue
                try:
                    conn.channel.send(hb, 0)
                except (OSError, ssl.SSLError) as exc:
                    self.transport.detach(conn, f"heart-beat failed: {exc}")


def _refusal(msg: Message, reason: str, *, code: str = "AuthError") -> Message:
    return Message(MessageKind.ERROR, msg.round, msg.job, {"reason": reason, "code": code, "to": msg.kind.value})


__all__ = ["CoordinatorServer", "NetworkTransport", "NetConfig", "SiteConnection", "OperatorReply"]
