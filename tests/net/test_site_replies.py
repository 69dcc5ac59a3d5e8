"""A site whose own reply cannot be encoded (a NaN score, meta that is not JSON) says so and keeps serving.

Before, the encoding error escaped the site's worker thread: the site stayed connected but never
answered again, and every later round waited for it until its time-out.
"""
from __future__ import annotations

import threading

import numpy as np

from insitu.federation.messages import Message, MessageKind
from insitu.net.client import DialConfig, SiteClient
from insitu.net.pki import CertificateAuthority, Role
from insitu.net.server import CoordinatorServer, NetConfig


def test_unencodable_reply_becomes_a_refusal_and_the_site_keeps_answering(tmp_path):
    ca = CertificateAuthority.init(tmp_path / "ca")
    coord = ca.issue("coordinator", Role.COORDINATOR, tmp_path / "coord")
    site = ca.issue("hospital-a", Role.SITE, tmp_path / "a")

    def handle(msg: Message) -> Message:
        loss = float("nan") if msg.round == 1 else 0.5  # e.g. an empty test split scores NaN
        return Message(MessageKind.EVALUATE_REPLY, msg.round, msg.job, {"loss": loss, "n": 0})

    srv = CoordinatorServer(coord, ca.dir / "crl.pem", lambda *a: {}, NetConfig(heartbeat=0.2, dead_after=5)).start()
    client = SiteClient(site, DialConfig("127.0.0.1", srv.port, heartbeat=0.2, dead_after=5, backoff_min=0.05, backoff_max=0.3), handle)
    threading.Thread(target=client.run_forever, daemon=True).start()
    try:
        assert srv.transport.wait_for({"hospital-a"}, 1, 10) == ["hospital-a"]
        req = {"hospital-a": Message(MessageKind.EVALUATE, 1, "j", {}, {"params": np.zeros(3, np.float32)})}
        ex = srv.transport.exchange(req, timeout=10)
        assert "reply cannot be sent" in ex.dropped["hospital-a"] and "not plain JSON" in ex.dropped["hospital-a"]
        ex = srv.transport.exchange({"hospital-a": Message(MessageKind.EVALUATE, 2, "j", {}, {"params": np.zeros(3, np.float32)})}, timeout=10)
        assert ex.replies["hospital-a"].meta["loss"] == 0.5 and client.connects == 1
    finally:
        client.stop()
        srv.stop()
