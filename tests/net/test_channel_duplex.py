"""One TLS channel read by one thread while another writes: the record layer stays intact.

OpenSSL forbids concurrent ``SSL_read``/``SSL_write`` on one connection and Python 3.11's ``ssl`` does
not serialise them.  A site reads its channel while its heart-beat thread writes, and so does the
coordinator; before :class:`insitu.net.channel.Channel` serialised its TLS calls, fresh connections
that both ends used at once from the first moment failed with "bad record mac" within a few dozen
connections, seen in loaded test runs as channels that closed at random (both ends logging "peer
closed the channel"), rounds aborted and deployed-vs-simulated parity lost.
Real TLS 1.3 with the consortium's certificates over 127.0.0.1.
"""
from __future__ import annotations

import socket
import threading

import numpy as np
import pytest

from insitu.federation.messages import Message, MessageKind
from insitu.net.channel import ServerTLS, dial
from insitu.net.pki import CertificateAuthority, Role

CONNECTIONS = 300  # the old channel failed within 15-90 connections in a script, less often under pytest
MESSAGES = 30  # each way, per connection: small, medium and multi-record messages


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    root = tmp_path_factory.mktemp("duplex")
    ca = CertificateAuthority.init(root / "ca")
    coord = ca.issue("coordinator", Role.COORDINATOR, root / "coord")
    site = ca.issue("hospital-a", Role.SITE, root / "a")
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    yield srv, ServerTLS(coord, ca.dir / "crl.pem"), site
    srv.close()


def _pair(srv, server_tls, site):
    box = {}

    def accept():
        raw, _ = srv.accept()
        box["server"], _ = server_tls.accept(raw)

    t = threading.Thread(target=accept)
    t.start()
    client, _ = dial("127.0.0.1", srv.getsockname()[1], site)
    t.join(30)
    return client, box["server"]


@pytest.mark.slow
def test_both_ends_reading_and_writing_at_once_never_corrupt_the_channel(tls):
    errors: list[str] = []
    received: dict[str, list[int]] = {}

    def writer(ch, tag):
        try:
            for i in range(MESSAGES):
                n = (4, 3_000, 40_000)[i % 3]  # 40 kB spans several TLS records
                ch.send(Message(MessageKind.TRAIN, i, tag, {"i": i}, {"params": np.full(n // 4, i, np.float32)}), i)
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(f"{tag} writer: {type(exc).__name__}: {exc}")

    def reader(ch, tag):
        got = received.setdefault(tag, [])
        try:
            while len(got) < MESSAGES:
                seq, msg, _ = ch.recv()
                assert msg.meta["i"] == seq and float(msg.tensors["params"][0]) == seq
                got.append(seq)
        except Exception as exc:  # noqa: BLE001
            errors.append(f"{tag} reader after {len(got)} messages: {type(exc).__name__}: {exc}")

    for k in range(CONNECTIONS):
        received.clear()
        client, server = _pair(*tls)
        threads = [threading.Thread(target=reader, args=(client, "to-site")), threading.Thread(target=writer, args=(client, "to-coordinator")),
                   threading.Thread(target=writer, args=(server, "to-site")), threading.Thread(target=reader, args=(server, "to-coordinator"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        hung = [t for t in threads if t.is_alive()]
        client.close()
        server.close()
        assert not hung and not errors, f"connection {k}: {errors or 'a thread hung'}"
        assert received == {"to-site": list(range(MESSAGES)), "to-coordinator": list(range(MESSAGES))}


def test_a_read_times_out_as_the_socket_timeout_says_and_a_close_ends_it(tls):
    import time

    client, server = _pair(*tls)
    try:
        client.sock.settimeout(0.3)  # the socket's own timeout still governs the channel
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            client.recv()
        assert 0.25 <= time.monotonic() - t0
        server.send(Message(MessageKind.HEARTBEAT), 0)
        assert client.recv()[1].kind is MessageKind.HEARTBEAT  # the channel still works after a timeout
        client.settimeout(None)
        threading.Timer(0.2, server.close).start()
        with pytest.raises(ConnectionError):
            client.recv()
    finally:
        client.close()
        server.close()
