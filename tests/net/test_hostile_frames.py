"""A site with a valid certificate sends malformed messages over real mTLS on 127.0.0.1.

Each one must close that site's channel with a logged warning naming the
problem (no traceback, no thread dying with an exception), while the
coordinator keeps serving an honest site.
"""
from __future__ import annotations

import json
import logging
import struct
import threading
import time

import numpy as np
import pytest

from insitu.federation.messages import Message, MessageKind
from insitu.net.channel import CHUNK_BYTES, FrameKind, _FRAME, dial
from insitu.net.client import DialConfig, SiteClient
from insitu.net.pki import CertificateAuthority, Role
from insitu.net.server import CoordinatorServer, NetConfig


def raw_message(header: dict | bytes, body: bytes = b"") -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<4sBI", b"INSU", 1, len(raw)) + raw + body


def train_reply(meta_json: str = "{}", tensors: list | None = None, body: bytes = b"") -> bytes:
    head = '{"kind":"train_reply","round":1,"job":"j","meta":' + meta_json + ',"tensors":' + json.dumps(tensors or []) + "}"
    return raw_message(head.encode(), body)


#: (what, payload): each a complete, correctly framed message whose content is hostile
HOSTILE = [
    ("nested 1,000,000 deep (RecursionError in json.loads)", train_reply('{"x":' + "[" * 500_000 + "]" * 500_000 + "}"), "nests deeper than 32 levels"),
    ("nested 40 deep", train_reply('{"x":' + "[" * 40 + "]" * 40 + "}"), "nests deeper than 32 levels at meta.x"),
    ("shape [2**40, 2**40]", train_reply(tensors=[{"name": "u", "dtype": "<f4", "shape": [2**40, 2**40], "nbytes": 2**82}], body=b"\0" * 8), "shape' = [1099511627776, 1099511627776]"),
    ("ndim 10,000", train_reply(tensors=[{"name": "u", "dtype": "<f4", "shape": [1] * 10_000, "nbytes": 4}], body=b"\0" * 4), "has 10000 dimensions"),
    ("200,000-element meta", train_reply(json.dumps({"flood": [0] * 200_000})), "more than 100000 elements"),
    ("duplicate keys", train_reply('{"n":1,"n":2}'), "key 'n' appears twice"),
    ("non-UTF-8 header", raw_message(b'{"kind":"train_reply","round":1,"job":"j","meta":{"s":"\xff"},"tensors":[]}'), "not UTF-8"),
]


@pytest.fixture
def pki(tmp_path):
    ca = CertificateAuthority.init(tmp_path / "ca")
    return {
        "ca": ca,
        "coord": ca.issue("coordinator", Role.COORDINATOR, tmp_path / "coord"),
        "mallory": ca.issue("hospital-m", Role.SITE, tmp_path / "m"),
        "honest": ca.issue("hospital-h", Role.SITE, tmp_path / "h"),
    }


@pytest.fixture
def thread_crashes(monkeypatch):
    crashes: list[str] = []
    previous = threading.excepthook
    monkeypatch.setattr(threading, "excepthook", lambda args: (crashes.append(f"{args.thread.name}: {args.exc_type.__name__}: {args.exc_value}"), previous(args)))
    return crashes


def send_raw(channel, data: bytes, seq: int) -> None:
    if len(data) <= CHUNK_BYTES:
        channel.sock.sendall(_FRAME.pack(FrameKind.WHOLE, seq, len(data)) + data)
        return
    for off in range(0, len(data), CHUNK_BYTES):
        part = data[off : off + CHUNK_BYTES]
        kind = FrameKind.END if off + CHUNK_BYTES >= len(data) else FrameKind.CHUNK
        channel.sock.sendall(_FRAME.pack(kind, seq, len(part)) + part)


def echo(msg: Message) -> Message:
    return Message(MessageKind.TRAIN_REPLY, msg.round, msg.job, {"ok": True}, {"u": msg.tensors["params"] * 2})


def logged(caplog, reason: str) -> bool:
    return any(r.levelno >= logging.WARNING and "hospital-m" in r.getMessage() and reason in r.getMessage() for r in caplog.records)


def closed_by_peer(channel) -> bool:
    channel.sock.settimeout(10)
    try:
        while True:  # heart-beats may arrive before the close
            channel.recv()
    except (ConnectionError, OSError):
        return True
    except Exception:  # noqa: BLE001 - anything else is a failure of the test's expectation
        return False


@pytest.mark.parametrize("phase", ["hello", "session"])
def test_malformed_messages_close_only_that_channel(pki, caplog, thread_crashes, phase):
    caplog.set_level(logging.INFO, logger="insitu.coordinator.net")
    caplog.set_level(logging.INFO, logger="insitu.site.net")
    srv = CoordinatorServer(pki["coord"], pki["ca"].dir / "crl.pem", lambda *a: {}, NetConfig(heartbeat=0.2, dead_after=5)).start()
    honest = SiteClient(pki["honest"], DialConfig("127.0.0.1", srv.port, heartbeat=0.2, dead_after=5, backoff_min=0.05, backoff_max=0.3), echo)
    threading.Thread(target=honest.run_forever, daemon=True).start()
    try:
        assert srv.transport.wait_for({"hospital-h"}, 1, 10) == ["hospital-h"]
        for what, payload, reason in HOSTILE:
            caplog.clear()
            ch, _ = dial("127.0.0.1", srv.port, pki["mallory"])
            if phase == "session":
                ch.send(Message(MessageKind.HELLO), 1)
                ch.recv()
            send_raw(ch, payload, 2)
            assert closed_by_peer(ch), what
            ch.close()
            deadline = time.monotonic() + 5  # the server logs just after it closes the channel
            while not logged(caplog, reason) and time.monotonic() < deadline:
                time.sleep(0.02)
            assert logged(caplog, reason), (what, [r.getMessage() for r in caplog.records])
            assert not any(r.exc_info for r in caplog.records), what
            # the coordinator still serves the honest site
            ex = srv.transport.exchange({"hospital-h": Message(MessageKind.TRAIN, 1, "j", {}, {"params": np.arange(3, dtype=np.float32)})}, timeout=10)
            assert not ex.dropped, (what, ex.dropped)
            np.testing.assert_array_equal(ex.replies["hospital-h"].tensors["u"], [0, 2, 4])
        assert "hospital-m" not in srv.transport.sites() and honest.connects == 1  # the honest channel never dropped
        assert thread_crashes == []
    finally:
        honest.stop()
        srv.stop()
