"""Secure aggregation linear in the number of sites, and the fast configuration as the default."""
from __future__ import annotations

import numpy as np
import pytest

from insitu.errors import ConfigError
from insitu.federation.messages import MessageKind
from insitu.federation.transport import InProcessTransport
from insitu.secure.secagg import UNBOUNDED, Recovery, SecAggConfig, SecAggProtocol, value_bound

from .conftest import make_group, plan


class Recorder(InProcessTransport):
    """The in-process transport, keeping every request it forwards."""

    def __init__(self, sites, **kw):
        super().__init__(sites, **kw)
        self.sent: list = []

    def exchange(self, requests, timeout):
        self.sent.extend(requests.values())
        return super().exchange(requests, timeout)


def _round(n: int, degree: int, size: int = 8):
    proto = SecAggProtocol(SecAggConfig(security_bits=1, bad_fraction=0.1, degree=degree))
    sites, _, vecs, weights = make_group(proto, n, size, 5)
    transport = Recorder(sites, fail=lambda s, r, k: s == "site03" and k is MessageKind.TRAIN)
    res = proto.collect(plan(sites, size), transport)
    return proto, transport, res, vecs, weights


def test_each_site_receives_only_its_neighbours_keys_shares_and_signatures():
    n, k = 40, 6
    proto, transport, res, vecs, weights = _round(n, k)
    assert proto.last_stats.degree == k
    members = [s for s in sorted(vecs) if s != "site03"]
    np.testing.assert_allclose(res.total, sum(weights[s] * vecs[s] for s in members), atol=1e-6)
    by_kind: dict = {}
    for m in transport.sent:
        by_kind.setdefault(m.kind, []).append(m)
    for m in by_kind[MessageKind.SECAGG_SHARE]:
        assert len(m.meta["keys"]) == k + 1  # its neighbours and itself, never the whole group
    for m in by_kind[MessageKind.TRAIN]:
        assert len(m.meta["secagg"]["inbox"]) <= k and len(m.meta["secagg"]["u2"]) <= k + 1
    for m in by_kind[MessageKind.SECAGG_UNMASK]:
        assert len(m.meta["survivors"]) <= k + 1
        assert len(m.meta.get("signatures", {})) <= 2 * k  # the share groups of its dropped neighbours only


def test_what_each_site_receives_does_not_grow_with_the_group_beyond_names():
    """Per-site bytes down, minus the O(n) name lists and seed shares, stay flat from 40 to 160 sites."""

    def per_site(n):
        _, transport, _, _, _ = _round(n, 6)
        from insitu.federation.messages import encode

        total = 0
        for m in transport.sent:
            if m.kind is MessageKind.SECAGG_SHARE:
                total += len(str(m.meta["keys"]))
            elif m.kind is MessageKind.TRAIN:
                total += len(str(m.meta["secagg"]["inbox"]))
            elif m.kind is MessageKind.SECAGG_UNMASK:
                total += len(encode(m))
        return total / n

    small, large = per_site(40), per_site(160)
    assert large < 1.3 * small, (small, large)


def test_fast_configuration_is_the_default_where_a_bound_is_declared():
    cfg = SecAggConfig(bound=value_bound(1.0))
    assert cfg.recovery is Recovery.SURVIVORS
    fp = cfg.fixed_point(1000)
    assert fp.ring_bits == 32 and fp.frac_bits >= 16
    # no bound: only the 64-bit ring has room for unclipped, sample-weighted updates
    assert SecAggConfig().fixed_point(100).ring_bits == 64 and SecAggConfig().fixed_point(100).bound == UNBOUNDED
    # a bound the 32-bit ring cannot hold at this resolution falls back to 64 bits
    assert SecAggConfig(bound=2.0**12).fixed_point(1000).ring_bits == 64


def test_fast_configuration_refused_with_the_reason_where_it_cannot_hold():
    with pytest.raises(ConfigError, match="32-bit secure-aggregation ring needs a declared bound"):
        SecAggConfig(ring_bits=32)
    with pytest.raises(ConfigError, match="fraction bits.*use a 64-bit ring or a smaller bound"):
        SecAggConfig(ring_bits=32, bound=2.0**18).fixed_point(100)
    with pytest.raises(ConfigError, match="positive finite clip"):
        value_bound(0.0)


def test_value_bound_covers_clip_weight_and_noise_tails():
    assert value_bound(0.5) == 1.0  # the weight (1) is a coordinate too
    assert value_bound(2.0) == 2.0
    assert value_bound(2.0, weight=10.0) == 20.0
    assert value_bound(1.0, noise_std=0.1) == pytest.approx(1.0 + 12 * 0.1)


def test_auto_32_bit_round_is_exact_in_the_ring_and_refuses_an_update_above_the_bound():
    cfg = SecAggConfig(bound=value_bound(1.0))
    proto = SecAggProtocol(cfg)
    sites, transport, vecs, _ = make_group(proto, 6, 50, 2)
    for s in sites.values():
        s.vec, s.weight = s.vec / np.max(np.abs(s.vec)) * 0.9, 1.0
    sites["site02"].vec = sites["site02"].vec * 2  # 1.8 > bound 1.0
    res = proto.collect(plan(sites, 50), transport)
    assert proto.last_stats.ring_bits == 32 and proto.last_stats.recovery == "survivors"
    assert "above the fixed-point bound 1" in res.dropped["site02"]
    fp = cfg.fixed_point(6)
    members = [s for s in sorted(sites) if s != "site02"]
    acc = sum(fp.encode(np.concatenate([sites[s].vec, [1.0]])) for s in members)
    np.testing.assert_array_equal(np.concatenate([res.total, [res.weight]]), fp.decode(acc))
