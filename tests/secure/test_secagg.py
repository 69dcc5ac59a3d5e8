"""Secure aggregation over the real in-process transport: exact sums, drop-outs, attacks on it."""
from __future__ import annotations

import base64
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from insitu.errors import ConfigError, ProtocolError, RoundAborted
from insitu.federation.messages import Message, MessageKind
from insitu.secure import shamir
from insitu.secure.secagg import Recovery, SecAggConfig, SecAggProtocol, SecAggSite

from .conftest import make_group, plan

PHASES = [MessageKind.SECAGG_ADVERTISE, MessageKind.SECAGG_SHARE, MessageKind.TRAIN, MessageKind.SECAGG_UNMASK]


def expected_ring_sum(cfg: SecAggConfig, n: int, vecs, weights, members) -> np.ndarray:
    fp = cfg.fixed_point(n)
    acc = np.zeros(len(next(iter(vecs.values()))) + 1, dtype=fp.dtype)
    for s in members:
        acc += fp.encode(np.concatenate([weights[s] * vecs[s], [weights[s]]]))
    return fp.decode(acc)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(3, 9),
    size=st.integers(1, 300),
    bits=st.sampled_from([32, 64]),
    recovery=st.sampled_from(list(Recovery)),
    seed=st.integers(0, 2**31),
    data=st.data(),
)
def test_unmasked_sum_equals_plain_sum_exactly_in_the_ring(n, size, bits, recovery, seed, data):
    cfg = SecAggConfig(ring_bits=bits, bound=2.0**7 if bits == 32 else 2.0**20, recovery=recovery)
    t = cfg.threshold_for(n)  # small groups use the complete graph
    budget = n - max(t, cfg.min_group)
    drops = data.draw(st.lists(st.tuples(st.integers(0, n - 1), st.sampled_from(PHASES)), max_size=budget, unique_by=lambda x: x[0]))
    ids = [f"site{i:02d}" for i in range(n)]
    when = {ids[i]: phase for i, phase in drops}
    proto = SecAggProtocol(cfg)
    sites, transport, vecs, weights = make_group(proto, n, size, seed, fail=lambda s, r, k: when.get(s) is k)
    for sid, site in sites.items():  # keep every weighted coordinate within the configured bound
        vecs[sid] = site.vec = vecs[sid] / np.max(np.abs(vecs[sid])) * cfg.bound / weights[sid]
    res = proto.collect(plan(sites, size), transport)
    # sites that dropped before sending their masked input are not in the sum; the others are
    in_sum = [s for s in ids if s not in when or when[s] is MessageKind.SECAGG_UNMASK]
    assert res.participants == tuple(in_sum)
    exp = expected_ring_sum(cfg, n, vecs, weights, in_sum)
    np.testing.assert_array_equal(np.concatenate([res.total, [res.weight]]), exp)
    assert set(res.dropped) == set(when)


@pytest.mark.parametrize("recovery", list(Recovery))
def test_sparse_graph_with_drop_outs_is_exact_and_cheaper_than_complete(recovery):
    cfg = SecAggConfig(security_bits=10, bad_fraction=0.2, recovery=recovery)
    n, size = 30, 64
    assert cfg.degree_for(n) < n - 1
    gone = {"site03", "site17"}
    proto = SecAggProtocol(cfg)
    sites, transport, vecs, weights = make_group(proto, n, size, 1, fail=lambda s, r, k: s in gone and k is MessageKind.TRAIN)
    res = proto.collect(plan(sites, size), transport)
    members = [s for s in sorted(sites) if s not in gone]
    np.testing.assert_array_equal(np.concatenate([res.total, [res.weight]]), expected_ring_sum(cfg, n, vecs, weights, members))
    st_ = proto.last_stats
    assert st_.degree == cfg.degree_for(n) and st_.masks_regenerated <= len(members) + 2 * st_.degree
    if recovery is Recovery.SURVIVORS:  # the survivors' corrections removed every mask: the server expanded none
        assert st_.masks_regenerated == 0


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31), shape=st.sampled_from(["ramp", "constant", "sparse", "gaussian"]))
def test_no_single_masked_vector_correlates_with_its_input(seed, shape):
    size = 20000
    rng = np.random.default_rng(seed)
    inputs = {
        "ramp": np.linspace(-1, 1, size),
        "constant": np.full(size, 0.5),
        "sparse": np.where(rng.random(size) < 0.01, 1.0, 0.0),
        "gaussian": rng.normal(size=size) * 0.1,
    }
    cfg = SecAggConfig()
    proto = SecAggProtocol(cfg)
    sites, transport, _, _ = make_group(proto, 4, size, seed)
    for s in sites.values():
        s.vec, s.weight = inputs[shape], 1.0
    proto.collect(plan(sites, size), transport)
    fp = cfg.fixed_point(4)
    for sid, site in sites.items():
        masked = site.last[MessageKind.TRAIN_REPLY].tensors["masked"][:-1]
        as_real = masked.astype(np.float64) / 2.0**64  # uniform in [0, 1) if the mask is uniform
        assert abs(as_real.mean() - 0.5) < 0.02, sid
        x = inputs[shape]
        if x.std() > 0:
            assert abs(np.corrcoef(as_real, x)[0, 1]) < 5 / np.sqrt(size), sid
        enc = fp.encode(x)
        assert np.mean(masked == enc) < 1e-3  # no coordinate leaks through unmasked


def test_survivor_correction_leaves_pairwise_masks_on_the_input():
    """In survivor recovery the coordinator holds y_u and u's correction c_u (self-mask plus masks
    with dropped neighbours); y_u − c_u still carries u's masks with surviving neighbours, so it
    is uniform and uncorrelated with the input, while the sum comes out exact."""
    size, n = 20000, 6
    cfg = SecAggConfig(recovery=Recovery.SURVIVORS)
    proto = SecAggProtocol(cfg)
    sites, transport, _, _ = make_group(proto, n, size, 3, fail=lambda s, r, k: s == "site05" and k is MessageKind.TRAIN)
    x = np.linspace(-1, 1, size)
    for s in sites.values():
        s.vec, s.weight = x, 1.0
    res = proto.collect(plan(sites, size), transport)
    np.testing.assert_allclose(res.total, 5 * x, atol=1e-9)
    assert proto.last_stats.masks_regenerated == 0
    fp = cfg.fixed_point(n)
    for sid in [s for s in sorted(sites) if s != "site05"]:
        y = sites[sid].last[MessageKind.TRAIN_REPLY].tensors["masked"]
        c = sites[sid].last[MessageKind.SECAGG_UNMASK_REPLY].tensors["correction"]
        seen = (y - c)[:-1]
        as_real = seen.astype(np.float64) / 2.0**64
        assert abs(as_real.mean() - 0.5) < 0.02, sid
        assert abs(np.corrcoef(as_real, x)[0, 1]) < 5 / np.sqrt(size), sid
        assert np.mean(seen == fp.encode(x)) < 1e-3, sid


def test_masked_inputs_differ_between_rounds_for_the_same_update():
    proto = SecAggProtocol()
    sites, transport, _, _ = make_group(proto, 3, 100, 0)
    proto.collect(plan(sites, 100, 1), transport)
    first = sites["site00"].last[MessageKind.TRAIN_REPLY].tensors["masked"].copy()
    proto.collect(plan(sites, 100, 2), transport)
    assert np.mean(first == sites["site00"].last[MessageKind.TRAIN_REPLY].tensors["masked"]) < 0.01


def test_coordinator_cannot_read_or_alter_relayed_shares():
    """Shares travel sealed under pairwise keys: flipping one bit makes the recipient refuse it."""
    proto = SecAggProtocol()
    sites, transport, vecs, weights = make_group(proto, 4, 10, 0)

    class Meddler:
        def __init__(self, inner):
            self.inner = inner

        def sites(self):
            return self.inner.sites()

        def exchange(self, requests, timeout):
            out = {}
            for sid, req in requests.items():
                if req.kind is MessageKind.TRAIN and sid == "site02":
                    sec = dict(req.meta["secagg"])
                    inbox = dict(sec["inbox"])
                    raw = bytearray(base64.b64decode(inbox["site00"]))
                    raw[20] ^= 1
                    inbox["site00"] = base64.b64encode(bytes(raw)).decode()
                    req = replace(req, meta={**req.meta, "secagg": {**sec, "inbox": inbox}})
                out[sid] = req
            return self.inner.exchange(out, timeout)

    res = proto.collect(plan(sites, 10), Meddler(transport))
    assert "authentication failed" in res.dropped["site02"]
    members = ["site00", "site01", "site03"]
    np.testing.assert_array_equal(np.concatenate([res.total, [res.weight]]), expected_ring_sum(proto.config, 4, vecs, weights, members))


def _tamper_meta(kind, fn):
    def tamper(msg):
        return replace(msg, meta=fn(dict(msg.meta))) if msg.kind is kind else msg

    return tamper


def test_forged_unmask_share_aborts_naming_the_forger():
    def forge(msg):
        if msg.kind is not MessageKind.SECAGG_UNMASK_REPLY:
            return msg
        rows = msg.tensors["b_shares"].copy()
        rows[:, -1] ^= 1  # every share of a self-mask seed this site returns is off by one bit
        return replace(msg, tensors={**msg.tensors, "b_shares": rows})

    proto = SecAggProtocol(SecAggConfig(recovery=Recovery.SERVER))  # the server rebuilds every self-mask seed
    sites, transport, _, _ = make_group(proto, 5, 10, 0, tamper={"site03": forge})
    with pytest.raises(RoundAborted, match="forged or inconsistent share.*site03"):
        proto.collect(plan(sites, 10), transport)
    # survivors' recovery uses the shares only for a survivor silent in the unmask phase: caught there
    proto = SecAggProtocol(SecAggConfig(recovery=Recovery.SURVIVORS))
    sites, transport, _, _ = make_group(proto, 7, 10, 0, tamper={"site03": forge},
                                        fail=lambda s, r, k: s == "site05" and k is MessageKind.SECAGG_UNMASK)
    with pytest.raises(RoundAborted, match="self-mask seed of site site05: forged or inconsistent share.*site03"):
        proto.collect(plan(sites, 10), transport)


@pytest.mark.parametrize(
    "tamper, match",
    [
        (lambda m: replace(m, tensors={"masked": m.tensors["masked"][:-1]}) if m.kind is MessageKind.TRAIN_REPLY else m, "shape"),
        (lambda m: replace(m, tensors={"masked": m.tensors["masked"].astype(np.float64)}) if m.kind is MessageKind.TRAIN_REPLY else m, "dtype"),
        (lambda m: replace(m, round=m.round - 1) if m.kind is MessageKind.SECAGG_SHARE_REPLY else m, "replayed"),
        (lambda m: replace(m, meta={**m.meta, "shares": {}}) if m.kind is MessageKind.SECAGG_SHARE_REPLY else m, "expected its neighbours"),
    ],
)
def test_bad_replies_abort_naming_site_and_cause(tamper, match):
    proto = SecAggProtocol()
    sites, transport, _, _ = make_group(proto, 4, 10, 0, tamper={"site01": tamper})
    with pytest.raises(RoundAborted, match=f"site site01.*{match}"):
        proto.collect(plan(sites, 10, round_=3), transport)


def test_out_of_ring_values_abort():
    cfg = SecAggConfig(ring_bits=48, bound=2.0**8)
    proto = SecAggProtocol(cfg)

    def big(m):
        if m.kind is not MessageKind.TRAIN_REPLY:
            return m
        arr = m.tensors["masked"].copy()
        arr[0] = np.uint64(1 << 50)
        return replace(m, tensors={"masked": arr})

    sites, transport, _, _ = make_group(proto, 4, 10, 0, tamper={"site02": big})
    with pytest.raises(RoundAborted, match="site site02.*outside Z_2\\^48"):
        proto.collect(plan(sites, 10), transport)


def test_too_few_survivors_aborts():
    proto = SecAggProtocol()
    sites, transport, _, _ = make_group(proto, 5, 10, 0, fail=lambda s, r, k: k is MessageKind.SECAGG_UNMASK and s in {"site00", "site01", "site02"})
    with pytest.raises(RoundAborted, match="share"):
        proto.collect(plan(sites, 10), transport)


def test_site_never_reveals_both_shares_of_a_peer_and_refuses_replays():
    proto = SecAggProtocol()
    sites, transport, _, _ = make_group(proto, 4, 10, 0)
    proto.collect(plan(sites, 10), transport)
    site = sites["site00"]
    unmask = Message(MessageKind.SECAGG_UNMASK, 1, "job", {"survivors": ["site00", "site01", "site02", "site03"], "dropped": ["site01"]})
    with pytest.raises(ProtocolError, match="stage|partition"):
        site.handlers[MessageKind.SECAGG_UNMASK](unmask)
    # a fresh round where the coordinator lists a peer as both survivor and dropped
    sites2, transport2, _, _ = make_group(proto, 4, 10, 0, fail=lambda s, r, k: k is MessageKind.SECAGG_UNMASK)
    with pytest.raises(RoundAborted):
        proto.collect(plan(sites2, 10), transport2)
    s0 = sites2["site00"]
    with pytest.raises(ProtocolError, match="partition"):
        s0.handlers[MessageKind.SECAGG_UNMASK](unmask)
    # replaying an old advertise for a finished round is refused
    adv = Message(MessageKind.SECAGG_ADVERTISE, 1, "job", {})
    with pytest.raises(ProtocolError):
        site.handlers[MessageKind.SECAGG_ADVERTISE](adv)


def test_site_refuses_group_below_its_minimum_and_too_sparse_graph():
    proto = SecAggProtocol(SecAggConfig(min_group=3))
    sites, transport, _, _ = make_group(proto, 4, 10, 0)
    strict = SecAggSite("site00", SecAggConfig(min_group=5))
    sites["site00"].protection = strict
    sites["site00"].handlers = dict(strict.handlers())
    res = proto.collect(plan(sites, 10), transport)
    assert "minimum is 5" in res.dropped["site00"] and "site00" not in res.participants
    with pytest.raises(ConfigError, match="too sparse"):
        SecAggProtocol(SecAggConfig(degree=2)).collect(plan({f"s{i}": None for i in range(40)}, 10), transport)


def test_a_masked_vector_that_is_not_a_masked_update_aborts_naming_the_survivors():
    """Any uint32 vector passes as masked, so a poisoned upload shows only in the sum: beyond what the
    survivors can send (n·bound), the round aborts naming every survivor as a candidate (the hostile
    suite drew such an upload, whose abort named no site)."""
    from insitu.secure.secagg import value_bound

    proto = SecAggProtocol(SecAggConfig(bound=value_bound(1.0)))

    def poison(msg):
        if msg.kind is MessageKind.TRAIN_REPLY:
            garbage = np.random.default_rng(5).integers(0, 2**32, msg.tensors["masked"].shape, dtype=np.uint64).astype(np.uint32)
            return replace(msg, tensors={"masked": garbage})
        return msg

    sites, transport, vecs, _ = make_group(proto, 5, 10, 0, tamper={"site03": poison})
    for s in sites.values():
        s.vec, s.weight = s.vec / np.linalg.norm(s.vec), 1.0
    with pytest.raises(RoundAborted, match=r"outside what 5 sites can send .* one of \['site00', 'site01', 'site02', 'site03', 'site04'\]"):
        proto.collect(plan(sites, 10), transport)
