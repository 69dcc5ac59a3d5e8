"""The mTLS channel and network transport, in-process over real TLS sockets on 127.0.0.1."""
from __future__ import annotations

import logging
import socket
import ssl
import threading
import time

import numpy as np
import pytest

from insitu.federation.messages import Message, MessageKind
from insitu.net.channel import CHUNK_BYTES, dial
from insitu.net.client import DialConfig, SiteClient
from insitu.net.pki import CertificateAuthority, Role
from insitu.net.server import CoordinatorServer, NetConfig


@pytest.fixture
def pki(tmp_path):
    ca = CertificateAuthority.init(tmp_path / "ca")
    return {
        "ca": ca,
        "coord": ca.issue("coordinator", Role.COORDINATOR, tmp_path / "coord"),
        "a": ca.issue("hospital-a", Role.SITE, tmp_path / "a"),
        "b": ca.issue("hospital-b", Role.SITE, tmp_path / "b"),
    }


def start_server(pki, **kw):
    cfg = NetConfig(heartbeat=0.2, dead_after=1.5, **kw)
    return CoordinatorServer(pki["coord"], pki["ca"].dir / "crl.pem", lambda op, args, who: {"ok": True}, cfg).start()


def start_site(pki, name, port, handler, **kw):
    client = SiteClient(pki[name], DialConfig("127.0.0.1", port, heartbeat=0.2, dead_after=1.5, backoff_min=0.05, backoff_max=0.3),
                        handler, hello={"site": "someone-else"}, **kw)
    threading.Thread(target=client.run_forever, daemon=True).start()
    return client


def echo(msg: Message) -> Message:
    if msg.meta.get("sleep"):
        time.sleep(msg.meta["sleep"])
    u = msg.tensors["params"] * 2 if not msg.meta.get("reply_n") else np.zeros(msg.meta["reply_n"], np.float32)
    return Message(MessageKind.TRAIN_REPLY, msg.round, msg.job, {"tag": msg.meta.get("tag")}, {"u": u})


def train(tag, n=4, **meta):
    return Message(MessageKind.TRAIN, 1, "j", {"tag": tag, **meta}, {"params": np.arange(n, dtype=np.float32)})


def test_large_update_streamed_in_chunks_and_identity_from_certificate(pki):
    srv = start_server(pki)
    try:
        start_site(pki, "a", srv.port, echo)
        assert srv.transport.wait_for(None, 1, 10) == ["hospital-a"]  # the CN, not the hello's claim
        n = 3 * CHUNK_BYTES // 4 + 17  # ~3 MiB of float32: several chunks each way
        ex = srv.transport.exchange({"hospital-a": train("big", n)}, timeout=30)
        assert not ex.dropped
        assert ex.bytes_sent["hospital-a"] > 3 * CHUNK_BYTES
        np.testing.assert_array_equal(ex.replies["hospital-a"].tensors["u"], np.arange(n, dtype=np.float32) * 2)
    finally:
        srv.stop()


def test_timeout_drops_site_and_late_reply_is_not_taken_for_the_next(pki):
    srv = start_server(pki)
    try:
        start_site(pki, "a", srv.port, echo)
        start_site(pki, "b", srv.port, echo)
        srv.transport.wait_for(None, 2, 10)
        ex = srv.transport.exchange({"hospital-a": train("slow", sleep=1.0), "hospital-b": train("fast")}, timeout=0.5)
        assert "timed out" in ex.dropped["hospital-a"] and ex.replies["hospital-b"].meta["tag"] == "fast"
        ex2 = srv.transport.exchange({"hospital-a": train("second")}, timeout=5)
        assert ex2.replies["hospital-a"].meta["tag"] == "second"  # the late 'slow' reply was discarded
        ex3 = srv.transport.exchange({"hospital-z": train("x")}, timeout=1)
        assert ex3.dropped == {"hospital-z": "not connected"}
    finally:
        srv.stop()


def test_disconnect_during_request_is_a_drop_and_site_reconnects(pki):
    srv = start_server(pki)
    port = srv.port
    stop = threading.Event()

    def dies(msg):
        stop.wait(5)
        return echo(msg)

    client = start_site(pki, "a", port, dies)
    srv.transport.wait_for(None, 1, 10)
    killer = threading.Timer(0.3, lambda: client._channel.close())
    killer.start()
    t0 = time.monotonic()
    ex = srv.transport.exchange({"hospital-a": train("x")}, timeout=10)
    assert "disconnected" in ex.dropped["hospital-a"] and time.monotonic() - t0 < 5
    stop.set()
    # the coordinator restarts on the same port; the site comes back on its own
    srv.stop()
    srv2 = CoordinatorServer(pki["coord"], pki["ca"].dir / "crl.pem", lambda *a: {}, NetConfig(port=port, heartbeat=0.2, dead_after=1.5)).start()
    try:
        assert srv2.transport.wait_for(None, 1, 20) == ["hospital-a"]
        deadline = time.monotonic() + 10
        while client.connects < 2 and time.monotonic() < deadline:  # counted just after the hello reply
            time.sleep(0.05)
        assert client.connects >= 2
    finally:
        srv2.stop()


def test_silent_peer_is_closed_after_dead_after(pki):
    srv = start_server(pki)
    try:
        ch, _ = dial("127.0.0.1", srv.port, pki["a"])
        ch.send(Message(MessageKind.HELLO), 1)
        ch.recv()
        assert srv.transport.sites() == ["hospital-a"]
        time.sleep(2.5)  # no heart-beats from us
        assert srv.transport.sites() == []
        ch.close()
    finally:
        srv.stop()


def test_tls12_and_certificate_less_clients_refused_at_handshake(pki):
    srv = start_server(pki)
    try:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_verify_locations(str(pki["a"].ca))
        ctx.load_cert_chain(str(pki["a"].cert), str(pki["a"].key))
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as raw:
            with pytest.raises(ssl.SSLError, match="PROTOCOL_VERSION|protocol version|UNSUPPORTED_PROTOCOL"):
                ctx.wrap_socket(raw, server_hostname="127.0.0.1")
        ctx13 = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx13.load_verify_locations(str(pki["a"].ca))
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as raw:
            tls = ctx13.wrap_socket(raw, server_hostname="127.0.0.1")
            with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
                tls.sendall(b"x" * 16)
                if not tls.recv(1):
                    raise ConnectionError("closed")
        assert srv.transport.sites() == []
    finally:
        srv.stop()


def test_oversized_message_refused(pki):
    srv = start_server(pki, max_message=64 * 1024)
    try:
        start_site(pki, "a", srv.port, echo)
        srv.transport.wait_for(None, 1, 10)
        ex = srv.transport.exchange({"hospital-a": train("big", 20_000)}, timeout=5)
        assert "over the limit" in ex.dropped["hospital-a"]  # the request is not sent
        ex = srv.transport.exchange({"hospital-a": train("big-reply", reply_n=20_000)}, timeout=5)
        assert "disconnected" in ex.dropped["hospital-a"]  # an 80 kB reply over the 64 kB limit closes the channel
    finally:
        srv.stop()


def test_revocation_closes_an_open_channel_and_refuses_reconnection(pki, caplog):
    caplog.set_level(logging.WARNING, logger="insitu.coordinator.net")
    srv = start_server(pki)
    try:
        client = start_site(pki, "a", srv.port, echo)
        start_site(pki, "b", srv.port, echo)
        assert srv.transport.wait_for(None, 2, 10) == ["hospital-a", "hospital-b"]
        assert client.connected.wait(10)
        connects = client.connects
        ctx_before = srv.tls.context()
        pki["ca"].revoke("hospital-a")
        srv.tls.crl.refresh()  # whoever loads the new CRL first (here: as the heart-beat ticker would) ...
        assert srv.tls.context() is not ctx_before  # ... the next handshake uses a context holding it
        deadline = time.monotonic() + 10
        while "hospital-a" in srv.transport.sites() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert srv.transport.sites() == ["hospital-b"]
        time.sleep(1.0)  # the site keeps dialling with back-off; every handshake is refused
        assert srv.transport.sites() == ["hospital-b"] and client.connects == connects
        # refused by OpenSSL at the handshake (CRL loaded into the context), not only after it
        assert any("certificate verify failed: certificate revoked" in r.getMessage() for r in caplog.records)
    finally:
        srv.stop()
