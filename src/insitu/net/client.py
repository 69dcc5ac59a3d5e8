"""The parties that dial the coordinator: a site's long-lived channel, and an operator's calls.

A hospital firewall allows outbound connections only, so the site dials out
and keeps one channel open: it says hello, then answers requests one at a
time (in order, in a worker thread) while a heart-beat thread keeps the
channel alive.  If the channel breaks or the coordinator falls silent, the
site reconnects with exponential back-off (0.2 s doubling to 15 s, with
jitter), so a restarted coordinator sees its sites come back on their own.
"""
from __future__ import annotations

import logging
import queue
import random
import ssl
import threading
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from insitu.errors import AuthError, InsituError, ProtocolError
from insitu.federation.messages import Message, MessageKind, error_reply
from insitu.net.channel import Channel, dial
from insitu.net.pki import Credentials

log = logging.getLogger("insitu.site.net")

#: answers one coordinator request; may raise an InsituError, which becomes an ERROR reply.
RequestHandler = Callable[[Message], Message]


@dataclass(frozen=True)
class DialConfig:
    host: str
    port: int
    heartbeat: float = 2.0
    dead_after: float = 10.0
    backoff_min: float = 0.2
    backoff_max: float = 15.0


class SiteClient:
    """Keeps one channel to the coordinator and answers its requests with ``handler``."""

    def __init__(self, creds: Credentials, config: DialConfig, handler: RequestHandler, *, hello: Mapping[str, Any] | None = None):
        self.creds = creds
        self.config = config
        self.handler = handler
        self.hello = dict(hello or {})
        self.connected = threading.Event()
        self._stop = threading.Event()
        self._work: queue.Queue = queue.Queue()
        self.connects = 0
        self._channel: Channel | None = None

    def stop(self) -> None:
        self._stop.set()
        self._work.put(None)
        channel = self._channel
        if channel is not None:
            channel.close()

    def run_forever(self) -> None:
        worker = threading.Thread(target=self._worker, daemon=True, name="site-worker")
        worker.start()
        delay = self.config.backoff_min
        while not self._stop.is_set():
            try:
                channel, server = dial(self.config.host, self.config.port, self.creds)
            except (OSError, ssl.SSLError, InsituError) as exc:
                log.info("cannot reach coordinator %s:%s (%s); retrying in %.1f s", self.config.host, self.config.port, exc, delay)
                self._stop.wait(delay * (0.5 + random.random()))
                delay = min(self.config.backoff_max, delay * 2)
                continue
            self._channel = channel
            try:
                self._session(channel)
                delay = self.config.backoff_min  # a session that got going resets the back-off
            except (ConnectionError, OSError, ssl.SSLError, ProtocolError) as exc:
                log.info("channel to coordinator lost: %s", exc)
                if not self.connected.is_set():
                    self._stop.wait(delay * (0.5 + random.random()))
                    delay = min(self.config.backoff_max, delay * 2)
            finally:
                self.connected.clear()
                channel.close()

    def _session(self, channel: Channel) -> None:
        channel.settimeout(self.config.dead_after)
        channel.send(Message(MessageKind.HELLO, meta=self.hello), 1)
        _, reply, _ = channel.recv()
        if reply.kind is not MessageKind.HELLO_REPLY:
            raise ProtocolError(f"coordinator answered hello with {reply.kind.value}: {reply.meta.get('reason', '')}")
        self.connects += 1
        self.connected.set()
        log.info("connected to coordinator as %s", reply.meta.get("site"))
        done = threading.Event()
        beat = threading.Thread(target=self._beat, args=(channel, done), daemon=True, name="site-heartbeat")
        beat.start()
        try:
            while not self._stop.is_set():
                try:
                    seq, msg, _ = channel.recv()  # times out after dead_after without any frame
                except TimeoutError:
                    raise ConnectionError(f"coordinator silent for {self.config.dead_after} s") from None
                if msg.kind is MessageKind.HEARTBEAT:
                    continue
                if msg.kind is MessageKind.BYE:
                    raise ConnectionError("coordinator said bye")
                self._work.put((channel, seq, msg))
        finally:
            done.set()

    def _beat(self, channel: Channel, done: threading.Event) -> None:
        hb = Message(MessageKind.HEARTBEAT)
        while not done.wait(self.config.heartbeat):
            try:
                channel.send(hb, 0)
            except (OSError, ssl.SSLError):
                return

    def _answer(self, msg: Message) -> Message:
        """The site's reply to one request: the handler's, or an error reply naming what went wrong."""
        try:
            return self.handler(msg)
        except InsituError as exc:
            return error_reply(msg, str(exc), code=type(exc).__name__)
        except Exception as exc:  # a crash in one round must not kill the site
            log.exception("request %s failed", msg.kind.value)
            return error_reply(msg, f"site crashed: {type(exc).__name__}: {exc}", code="crash")

    def _worker(self) -> None:
        while True:
            item = self._work.get()
            if item is None:
                return
            channel, seq, msg = item
            reply = self._answer(msg)
            if channel.closed:
                log.info("dropping reply to %s round %d: its channel is gone", msg.kind.value, msg.round)
                continue
            try:
                try:
                    channel.send(reply, seq)
                except ProtocolError as exc:  # a reply that cannot be encoded (NaN in meta, too large): say so, keep serving
                    log.error("reply to %s round %d cannot be sent: %s", msg.kind.value, msg.round, exc)
                    channel.send(error_reply(msg, f"reply cannot be sent: {exc}", code="ProtocolError"), seq)
            except (OSError, ssl.SSLError) as exc:
                log.info("could not send reply to %s round %d: %s", msg.kind.value, msg.round, exc)


def operator_call(host: str, port: int, creds: Credentials, op: str, args: Mapping[str, Any] | None = None, *, timeout: float = 30.0) -> dict[str, Any]:
    """One operator request (submit, cancel, status, list) over its own short channel."""
    return operator_request(host, port, creds, op, args, timeout=timeout)[0]


def operator_request(host: str, port: int, creds: Credentials, op: str, args: Mapping[str, Any] | None = None, *,
                     timeout: float = 30.0) -> tuple[dict[str, Any], dict[str, Any]]:
    """One operator request; returns its JSON result and the arrays that came with it (a model)."""
    channel, _ = dial(host, port, creds, timeout=timeout)
    try:
        channel.settimeout(timeout)
        channel.send(Message(MessageKind.OPERATOR, meta={"op": op, "args": dict(args or {})}), 1)
        try:
            _, reply, _ = channel.recv()
        except (ConnectionError, ssl.SSLError, OSError) as exc:
            raise AuthError(f"the coordinator closed the channel instead of answering {op!r}: {exc}") from None
        if reply.kind is MessageKind.ERROR:
            code = reply.meta.get("code", "")
            reason = str(reply.meta.get("reason", "refused"))
            if code == "AuthError":
                raise AuthError(reason)
            raise InsituError(f"coordinator refused {op!r}: {reason}")
        if reply.kind is not MessageKind.OPERATOR_REPLY:
            raise ProtocolError(f"expected operator_reply, got {reply.kind.value}")
        try:
            channel.send(Message(MessageKind.BYE), 2)
        except OSError:
            pass
        return dict(reply.meta.get("result", {})), dict(reply.tensors)
    finally:
        channel.close()


__all__ = ["SiteClient", "DialConfig", "operator_call", "operator_request"]
