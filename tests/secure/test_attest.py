"""Signed key advertisements: a coordinator that substitutes, replays or misattributes secure-
aggregation keys is caught by the sites, with real certificates from the consortium CA."""
from __future__ import annotations

import base64
import datetime as dt
from dataclasses import replace

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from insitu.errors import RoundAborted
from insitu.federation.messages import MessageKind
from insitu.net.pki import CertificateAuthority, make_csr
from insitu.secure._primitives import x25519_keypair
from insitu.secure.attest import Attestation, KeySigner, PeerVerifier
from insitu.secure.secagg import SecAggProtocol, SecAggSite

from insitu.federation.transport import InProcessTransport

from .conftest import VecSite, plan

N, SIZE = 4, 50
IDS = [f"site{i:02d}" for i in range(N)]


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    root = tmp_path_factory.mktemp("pki")
    ca = CertificateAuthority.init(root / "ca")
    creds = {s: ca.issue(s, "site", root / s) for s in IDS}
    creds["operator"] = ca.issue("operator", "operator", root / "operator")
    other = CertificateAuthority.init(root / "other-ca")
    creds["rogue"] = other.issue("site01", "site", root / "rogue")
    return root, ca, creds


def _group(pki, attest: dict | None = None, protection=lambda s, att: SecAggSite(s, attestation=att)):
    """Four sites, each with its own certificate's attestation (or the one given in ``attest``)."""
    _, _, creds = pki
    rng = np.random.default_rng(0)
    vecs = {s: rng.normal(size=SIZE) for s in IDS}
    sites = {}
    for s in IDS:
        c = creds[s]
        att = (attest or {}).get(s, Attestation.load(c.cert, c.key, c.ca))
        sites[s] = VecSite(s, protection(s, att), vecs[s], 1.0)
    return sites, vecs


class Relay:
    """The coordinator's transport, with a hook that may rewrite what it forwards to sites."""

    def __init__(self, sites, rewrite=None):
        self.inner, self.rewrite = InProcessTransport(sites), rewrite

    def sites(self):
        return self.inner.sites()

    def exchange(self, requests, timeout):
        if self.rewrite:
            requests = {s: self.rewrite(s, m) for s, m in requests.items()}
        return self.inner.exchange(requests, timeout)


def _rewrite_keys(fn):
    def rewrite(sid, msg):
        if msg.kind is not MessageKind.SECAGG_SHARE:
            return msg
        keys = {k: list(v) for k, v in msg.meta["keys"].items()}
        fn(sid, keys)
        return replace(msg, meta={**msg.meta, "keys": keys})

    return rewrite


def test_signed_keys_give_the_exact_sum(pki):
    sites, vecs = _group(pki)
    res = SecAggProtocol().collect(plan(sites, SIZE), Relay(sites))
    np.testing.assert_allclose(res.total, sum(vecs.values()), atol=1e-9)
    assert not res.dropped


def test_coordinator_substituting_a_sites_keys_is_refused_naming_that_site(pki):
    sites, _ = _group(pki)
    mine = [base64.b64encode(x25519_keypair()[1]).decode() for _ in range(2)]

    def swap(sid, keys):
        if sid != "site01":  # everyone else gets the coordinator's keys for site01
            keys["site01"][:2] = mine

    with pytest.raises(RoundAborted) as err:
        SecAggProtocol().collect(plan(sites, SIZE), Relay(sites, _rewrite_keys(swap)))
    assert "keys relayed for site site01 do not carry its signature" in str(err.value)


def test_unsigned_keys_are_refused_by_a_site_that_checks(pki):
    sites, _ = _group(pki)

    def strip(sid, keys):
        keys["site02"] = keys["site02"][:2]

    with pytest.raises(RoundAborted, match="site02 carry no certificate and signature"):
        SecAggProtocol().collect(plan(sites, SIZE), Relay(sites, _rewrite_keys(strip)))


def test_keys_moved_to_another_site_or_signed_by_another_ca_are_refused(pki):
    _, _, creds = pki
    sites, _ = _group(pki)

    def move(sid, keys):
        keys["site03"][2:] = keys["site02"][2:]  # site02's certificate and signature claimed for site03

    with pytest.raises(RoundAborted, match="keys claimed for site site03 come with the certificate of site02"):
        SecAggProtocol().collect(plan(sites, SIZE), Relay(sites, _rewrite_keys(move)))
    rogue = creds["rogue"]
    sites, _ = _group(pki, {"site01": Attestation(KeySigner.load(rogue.cert, rogue.key), PeerVerifier.load(rogue.ca))})
    with pytest.raises(RoundAborted, match="certificate for site site01 was not issued by the consortium CA"):
        SecAggProtocol().collect(plan(sites, SIZE), Relay(sites))


def test_operator_and_expired_certificates_are_refused(pki):
    _, ca, creds = pki
    op = creds["operator"]
    verifier = PeerVerifier.load(creds["site00"].ca)
    with pytest.raises(Exception, match="role operator may not do this"):
        verifier.public_key(op.cert.read_bytes(), "operator")
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    from cryptography.hazmat.primitives import serialization

    old = ca.sign(make_csr("site02", key), "site", not_before=now - dt.timedelta(days=30), not_after=now - dt.timedelta(days=1))
    with pytest.raises(Exception, match="certificate for site site02 expired"):
        verifier.public_key(old.public_bytes(serialization.Encoding.PEM), "site02")


def test_keys_replayed_from_an_earlier_round_are_refused(pki):
    sites, _ = _group(pki)
    proto = SecAggProtocol()
    seen = {}

    def record(sid, msg):
        if msg.kind is MessageKind.SECAGG_SHARE:
            if msg.round == 1:
                seen.update({k: list(v) for k, v in msg.meta["keys"].items()})
            else:
                keys = {k: list(v) for k, v in msg.meta["keys"].items()}
                if sid != "site00":
                    keys["site00"] = seen["site00"]
                msg = replace(msg, meta={**msg.meta, "keys": keys})
        return msg

    relay = Relay(sites, record)
    proto.collect(plan(sites, SIZE, 1), relay)
    with pytest.raises(RoundAborted, match="for site site00 do not carry its signature"):
        proto.collect(plan(sites, SIZE, 2), relay)


# -- homomorphic key dealing ------------------------------------------------------------------
def _he_group(pki):
    from insitu.secure.he import HEConfig, HEScheme, HESite

    return _group(pki, protection=lambda s, att: HESite(s, HEConfig(scheme=HEScheme.CKKS), attestation=att))


def _he_protocol():
    from insitu.secure.he import HEConfig, HEProtocol, HEScheme

    return HEProtocol(HEConfig(scheme=HEScheme.CKKS))


def test_signed_he_key_dealing_gives_the_sum(pki):
    sites, vecs = _he_group(pki)
    res = _he_protocol().collect(plan(sites, SIZE), Relay(sites))
    np.testing.assert_allclose(res.total, sum(vecs.values()), atol=1e-3)


@pytest.mark.parametrize("victim", ["dealer", "peer"])
def test_coordinator_interposing_its_own_dealing_key_is_refused(pki, victim):
    """The dealer seals the shared private key under each peer's X25519 key: a coordinator that
    relays its own key in place of a peer's (or of the dealer's) would open the private key."""
    sites, _ = _he_group(pki)
    mine = base64.b64encode(x25519_keypair()[1]).decode()

    def swap(sid, msg):
        if msg.kind is not MessageKind.HE_KEYS:
            return msg
        if victim == "peer" and msg.meta.get("stage") == "deal":
            peers = {k: list(v) for k, v in msg.meta["peers"].items()}
            peers["site02"][0] = mine
            return replace(msg, meta={**msg.meta, "peers": peers})
        if victim == "dealer" and msg.meta.get("stage") == "install":
            return replace(msg, meta={**msg.meta, "dealer_pk": mine})
        return msg

    with pytest.raises(RoundAborted, match="for site site0[02] do not carry its signature"):
        _he_protocol().collect(plan(sites, SIZE), Relay(sites, swap))
