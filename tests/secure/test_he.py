"""Homomorphic aggregation: packing headroom, who holds which key, and refusals."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from insitu.errors import ConfigError, ProtocolError, RoundAborted
from insitu.federation.messages import Message, MessageKind
from insitu.secure import HEConfig, HEProtocol, HEScheme
from insitu.secure.paillier import PackedLayout

from .conftest import make_group, plan


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 500), st.integers(1, 64), st.integers(8, 30), st.integers(0, 2**31))
def test_packing_sums_without_carries_between_slots(size, n, frac, seed):
    lay = PackedLayout(2048, frac, 2.0**10, n)
    rng = np.random.default_rng(seed)
    vecs = rng.uniform(-lay.bound, lay.bound, (n, size))
    vecs[:, ::3] = lay.bound  # worst case: every value at the bound
    packed = [lay.encode(v) for v in vecs]
    summed = [sum(col) for col in zip(*packed)]  # what Paillier's homomorphic addition yields
    exact = np.rint(vecs * 2.0**frac).sum(axis=0) / 2.0**frac
    np.testing.assert_array_equal(lay.decode(summed, size, n), exact)
    assert all(p < 2 ** (lay.key_bits - 1) for p in summed)


def test_packing_refuses_values_beyond_bound_and_layouts_without_room():
    lay = PackedLayout(2048, 20, 1.0, 4)
    assert lay.slots >= 50
    with pytest.raises(ProtocolError, match="above the packing bound"):
        lay.encode(np.array([1.5]))
    with pytest.raises(ConfigError, match="> 64"):
        PackedLayout(2048, 40, 2.0**30, 100)
    with pytest.raises(ConfigError, match="too short"):
        HEConfig(key_bits=1024)


@pytest.mark.parametrize("scheme", [HEScheme.PAILLIER, HEScheme.CKKS])
def test_coordinator_holds_only_the_public_key(scheme):
    proto = HEProtocol(HEConfig(scheme=scheme))
    sites, transport, vecs, weights = make_group(proto, 3, 50, 0)
    res = proto.collect(plan(sites, 50), transport)
    exp = sum(weights[s] * vecs[s] for s in sites)
    assert np.max(np.abs(res.total - exp)) < 1e-4
    keys = proto._jobs["job"]
    if scheme is HEScheme.CKKS:
        assert not keys.public.is_private()
        with pytest.raises(ValueError):
            keys.public.secret_key()
    else:
        assert isinstance(keys.public, int)  # the modulus n only; p and q never reach the coordinator
    # every site holds the same key
    fps = {s.protection._jobs["job"].public_blob for s in sites.values()}
    assert len(fps) == 1


def test_tampered_key_deal_is_refused_by_the_peer():
    proto = HEProtocol()
    sites, transport, _, _ = make_group(proto, 3, 5, 0)

    class Flip:
        def sites(self):
            return transport.sites()

        def exchange(self, requests, timeout):
            out = {}
            for sid, req in requests.items():
                if req.kind is MessageKind.HE_KEYS and req.meta.get("stage") == "install" and sid == "site02":
                    sealed = req.tensors["sealed"].copy()
                    sealed[30] ^= 1
                    req = replace(req, tensors={**req.tensors, "sealed": sealed})
                out[sid] = req
            return transport.exchange(out, timeout)

    res = proto.collect(plan(sites, 5), Flip())
    assert "authentication failed" in res.dropped["site02"]
    assert "site02" not in res.participants


def test_site_decrypts_once_per_round_and_only_sums_of_its_minimum():
    proto = HEProtocol(HEConfig(min_group=3))
    sites, transport, _, _ = make_group(proto, 3, 5, 0)
    proto.collect(plan(sites, 5), transport)
    decryptor = next(s for s in sites.values() if MessageKind.HE_DECRYPT_REPLY in s.last)
    req = Message(MessageKind.HE_DECRYPT, 1, "job", {"count": 3, "size": 6, "he": {}}, {})
    with pytest.raises(ProtocolError, match="already decrypted"):
        decryptor.handlers[MessageKind.HE_DECRYPT](req)
    lone = replace(req, round=2, meta={**req.meta, "count": 1})
    with pytest.raises(ProtocolError, match="refuses to decrypt a sum of 1"):
        decryptor.handlers[MessageKind.HE_DECRYPT](lone)


def test_disagreeing_decryptors_abort():
    proto = HEProtocol(HEConfig(scheme=HEScheme.PAILLIER, decryptors=2))

    def lie(m):
        return replace(m, tensors={"sum": m.tensors["sum"] + 1.0}) if m.kind is MessageKind.HE_DECRYPT_REPLY else m

    sites, transport, _, _ = make_group(proto, 3, 5, 0, tamper={"site02": lie})
    with pytest.raises(RoundAborted, match="disagrees"):
        for r in (1, 2, 3):  # decryptors rotate with the round; site02 is asked within three rounds
            proto.collect(plan(sites, 5, round_=r), transport)
