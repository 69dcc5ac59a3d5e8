"""The wire between a coordinator and its sites: mutual TLS 1.3 and length-prefixed frames.

TLS rules, enforced by Python's ``ssl`` (OpenSSL) on both ends:

* TLS 1.3 only (``minimum_version = maximum_version = TLSv1_3``): a TLS 1.2
  client fails the handshake with a protocol-version alert;
* mutual authentication (``CERT_REQUIRED``) against the consortium CA only;
  no certificate, another CA's certificate or an expired one fails the
  handshake;
* the server also loads the CA's CRL with ``VERIFY_CRL_CHECK_LEAF``, so a
  revoked certificate fails the handshake too; the context is rebuilt when
  ``crl.pem`` changes, and the serial is checked again after the handshake.

Frames carry encoded :mod:`insitu.federation.messages`::

    kind (u8) | sequence (u32 LE) | length (u32 LE) | payload

``kind`` is WHOLE (a complete message), CHUNK (part of a message, more
follow) or END (last part).  Messages larger than :data:`CHUNK_BYTES` are
streamed as chunks so that no single frame is large, and the receiver refuses
a message that grows past its limit before buffering it.  The sequence number
pairs a reply with its request: a late reply to a request the coordinator gave
up on is recognised and discarded, never taken for the answer to the next one.

**One TLS object, two threads.**  A channel is read by one thread and written by others (requests,
replies, heart-beats) at the same time.  OpenSSL forbids calling ``SSL_read`` and ``SSL_write`` on one
connection concurrently, and Python 3.11's ``ssl`` module does not serialise them: under load a
fresh connection's first read (processing the TLS 1.3 session tickets) racing a first write
corrupted the record layer ("bad record mac") and both ends saw the channel close.  So every TLS
call of a channel runs under one lock, on a non-blocking socket, and a thread waits for the socket
(``select``) outside the lock: a reader waiting for data never holds up a writer, and neither can
deadlock the other.  The timeout set on the socket (``channel.sock.settimeout``) keeps its meaning:
how long one read, or one whole send, may wait.
"""
from __future__ import annotations

import enum
import select
import socket
import ssl
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from insitu.errors import ProtocolError, SecurityError, parse_choice
from insitu.federation.messages import Message, decode, encode
from insitu.net.pki import Credentials, Identity, RevocationList, Role, identity_of

CHUNK_BYTES = 1 << 20
DEFAULT_MAX_MESSAGE = 64 * 1024 * 1024
_FRAME = struct.Struct("<BII")


class FrameKind(enum.IntEnum):
    WHOLE = 1
    CHUNK = 2
    END = 3


def server_context(creds: Credentials, crl: Path | None) -> ssl.SSLContext:
    """TLS 1.3-only server context demanding a client certificate from the consortium CA."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_cert_chain(str(creds.cert), str(creds.key))
    ctx.load_verify_locations(cafile=str(creds.ca))
    if crl is not None:
        ctx.load_verify_locations(cafile=str(crl))
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    return ctx


def client_context(creds: Credentials) -> ssl.SSLContext:
    """TLS 1.3-only client context: presents our certificate, trusts only the consortium CA."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.check_hostname = True
    ctx.load_cert_chain(str(creds.cert), str(creds.key))
    ctx.load_verify_locations(cafile=str(creds.ca))
    return ctx


class ServerTLS:
    """The coordinator's TLS settings; rebuilds its context when the CRL file changes."""

    def __init__(self, creds: Credentials, crl_path: Path):
        self.creds = creds
        self.crl = RevocationList(crl_path, creds.ca)
        self._ctx = server_context(creds, crl_path)
        self._ctx_version = self.crl.version
        self._lock = threading.Lock()

    def context(self) -> ssl.SSLContext:
        """The context for the next handshake, rebuilt if a newer CRL was loaded (by anyone)."""
        with self._lock:
            self.crl.refresh()
            if self.crl.version != self._ctx_version:
                self._ctx = server_context(self.creds, self.crl.path)
                self._ctx_version = self.crl.version
            return self._ctx

    def accept(self, raw: socket.socket, timeout: float = 10.0) -> tuple["Channel", Identity]:
        """Handshake on an accepted socket; returns the channel and the verified peer identity."""
        raw.settimeout(timeout)
        tls = self.context().wrap_socket(raw, server_side=True)  # handshake happens here
        ident = identity_of(tls.getpeercert(binary_form=True))
        self.crl.refresh()
        if self.crl.is_revoked(ident.serial):
            tls.close()
            raise SecurityError(f"{ident.name}: certificate serial {ident.serial} is revoked")
        tls.settimeout(None)
        return Channel(tls), ident


def dial(host: str, port: int, creds: Credentials, *, timeout: float = 10.0) -> tuple["Channel", Identity]:
    """Open a channel to the coordinator; refuses a server that is not a consortium coordinator."""
    raw = socket.create_connection((host, port), timeout=timeout)
    try:
        tls = client_context(creds).wrap_socket(raw, server_hostname=host)
    except Exception:
        raw.close()
        raise
    try:
        ident = identity_of(tls.getpeercert(binary_form=True), expect={Role.COORDINATOR})
    except Exception:
        tls.close()
        raise
    tls.settimeout(None)
    return Channel(tls), ident


@dataclass
class Channel:
    """One TLS connection carrying framed messages.  Sending is thread-safe; one reader at a time."""

    sock: ssl.SSLSocket
    max_bytes: int = DEFAULT_MAX_MESSAGE

    def __post_init__(self) -> None:
        self._wlock = threading.Lock()  # one writer at a time: a message's frames stay together
        self._io = threading.Lock()  # one TLS call at a time (OpenSSL's rule; see the module docstring)
        self.closed = False
        self._timeout: float | None = self.sock.gettimeout()
        self.sock.settimeout(0.0)

    def send(self, msg: Message, seq: int = 0) -> int:
        """Send ``msg`` tagged with ``seq``; returns the encoded message size in bytes."""
        data = encode(msg, max_bytes=self.max_bytes)
        view = memoryview(data)
        with self._wlock:
            deadline = self._deadline()
            if len(data) <= CHUNK_BYTES:
                self._write_all(memoryview(_FRAME.pack(FrameKind.WHOLE, seq, len(data)) + data), deadline)
            else:
                for off in range(0, len(data), CHUNK_BYTES):
                    part = view[off : off + CHUNK_BYTES]
                    last = off + CHUNK_BYTES >= len(data)
                    self._write_all(memoryview(_FRAME.pack(FrameKind.END if last else FrameKind.CHUNK, seq, len(part))), deadline)
                    self._write_all(part, deadline)
        return len(data)

    def settimeout(self, timeout: float | None) -> None:
        """How long one read, or one whole send, may wait (None: for ever).  ``channel.sock.settimeout``
        still works: the channel takes the value over at its next TLS call and keeps the socket non-blocking."""
        with self._io:
            self._timeout = timeout
            self.sock.settimeout(0.0)

    # -- TLS calls, one at a time ----------------------------------------------------------------
    def _deadline(self) -> float | None:
        with self._io:
            self._adopt_timeout()
        return None if self._timeout is None else time.monotonic() + self._timeout

    def _adopt_timeout(self) -> None:
        """(Under the TLS lock.)  A timeout someone set on the socket itself becomes the channel's."""
        timeout = self.sock.gettimeout()
        if timeout != 0.0:
            self._timeout = timeout
            try:
                self.sock.settimeout(0.0)
            except OSError:  # closed meanwhile: the next call says so
                pass

    def _tls(self, call):
        """``call()`` under the TLS lock on the non-blocking socket; ``(result, None)``, or ``(None,
        "read"/"write")`` when it would block (what to wait for, outside the lock)."""
        with self._io:
            if self.closed:
                raise ConnectionError("channel closed")
            self._adopt_timeout()
            try:
                return call(), None
            except ssl.SSLWantReadError:
                return None, "read"
            except (ssl.SSLWantWriteError, BlockingIOError):
                return None, "write"

    def _wait(self, what: str, deadline: float | None) -> None:
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            raise TimeoutError("timed out")
        try:
            r, w, _ = select.select([self.sock] if what == "read" else [], [self.sock] if what == "write" else [], [], left)
        except (ValueError, OSError):  # the socket was closed by another thread
            raise ConnectionError("channel closed") from None
        if not r and not w:
            raise TimeoutError("timed out")

    def _write_all(self, data: memoryview, deadline: float | None) -> None:
        off = 0
        while off < len(data):
            piece = data[off : off + _WRITE_PIECE]
            n, wait = self._tls(lambda: self.sock.send(piece))  # a retry after "would block" sends the same bytes again
            if wait is not None:
                self._wait(wait, deadline)
            else:
                off += n

    def _read_exact(self, n: int) -> bytes:
        buf = bytearray()
        deadline = self._deadline()
        while len(buf) < n:
            chunk, wait = self._tls(lambda: self.sock.recv(min(n - len(buf), 1 << 20)))
            if wait is not None:
                self._wait(wait, deadline)
                continue
            if not chunk:
                raise ConnectionError("peer closed the channel")
            buf += chunk
            deadline = self._deadline()  # the timeout bounds each wait for data, as a blocking socket's does
        return bytes(buf)

    def recv(self) -> tuple[int, Message, int]:
        """Next message: (sequence, message, size in bytes).  Raises ConnectionError on close."""
        parts: list[bytes] = []
        size = 0
        seq0: int | None = None
        while True:
            kind, seq, length = _FRAME.unpack(self._read_exact(_FRAME.size))
            kind = parse_choice(FrameKind, kind, "frame kind", ProtocolError)
            if length > CHUNK_BYTES:
                raise ProtocolError(f"frame of {length} bytes exceeds the {CHUNK_BYTES}-byte frame limit")
            if seq0 is not None and seq != seq0:
                raise ProtocolError(f"chunk of message {seq} interleaved with message {seq0}")
            if kind is FrameKind.WHOLE and seq0 is not None:
                raise ProtocolError("whole message inside a chunked message")
            size += length
            if size > self.max_bytes:
                raise ProtocolError(f"incoming message exceeds {self.max_bytes} bytes")
            parts.append(self._read_exact(length))
            seq0 = seq
            if kind in (FrameKind.WHOLE, FrameKind.END):
                break
        data = b"".join(parts)
        return seq0, decode(data, max_bytes=self.max_bytes), len(data)

    def close(self) -> None:
        self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self.sock.close()
        except OSError:
            pass


#: bytes handed to one TLS write: small enough that a reader waiting for the lock is not held up long
_WRITE_PIECE = 256 * 1024

__all__ = ["Channel", "ServerTLS", "dial", "server_context", "client_context", "CHUNK_BYTES", "FrameKind"]
