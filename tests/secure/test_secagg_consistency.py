"""An active coordinator against secure aggregation: it cannot pick the graph (commit-and-reveal among
the sites) nor show different survivor sets to different sites (consistency check, Bonawitz et al.
2017 §4).  Each test plays the coordinator's attack and checks who refuses, and why."""
from __future__ import annotations

import base64
from dataclasses import replace

import numpy as np
import pytest

from insitu.errors import RoundAborted
from insitu.federation.messages import Message, MessageKind
from insitu.federation.transport import InProcessTransport
from insitu.secure.secagg import SecAggConfig, SecAggProtocol, SecAggSite, _graph_seed

from .conftest import make_group, plan


class Relay:
    """The coordinator's transport with hooks: ``rewrite(site, request)`` before delivery and
    ``seen(site, reply)`` on the way back."""

    def __init__(self, sites, rewrite=None, fail=None):
        self.inner, self.rewrite, self.replies, self.why = InProcessTransport(sites, fail=fail), rewrite, {}, {}

    def sites(self):
        return self.inner.sites()

    def exchange(self, requests, timeout):
        if self.rewrite:
            requests = {s: self.rewrite(s, m) for s, m in requests.items()}
        ex = self.inner.exchange(requests, timeout)
        for s, rep in ex.replies.items():
            self.replies[(s, rep.kind)] = rep
        for s, why in ex.dropped.items():
            self.why[(s, next(iter(requests.values())).kind)] = why
        return ex


# -- commit-and-reveal of the graph seed ------------------------------------------------------------
def test_a_reveal_that_differs_from_its_commitment_aborts_naming_the_site():
    proto = SecAggProtocol()

    def lie(msg):
        if msg.kind is MessageKind.SECAGG_REVEAL_REPLY:
            return replace(msg, meta={"reveal": base64.b64encode(bytes(32)).decode()})
        return msg

    sites, transport, _, _ = make_group(proto, 5, 10, 0, tamper={"site02": lie})
    with pytest.raises(RoundAborted, match="site site02: its graph-seed reveal does not match its commitment"):
        proto.collect(plan(sites, 10), transport)


def test_a_site_that_commits_and_withholds_its_reveal_aborts_the_round_naming_it():
    """Dropping a committed site after seeing the others' reveals would let a coordinator choose among
    graphs; so a missing reveal aborts instead of shrinking the set."""
    proto = SecAggProtocol()
    sites, transport, _, _ = make_group(proto, 5, 10, 0, fail=lambda s, r, k: s == "site04" and k is MessageKind.SECAGG_REVEAL)
    with pytest.raises(RoundAborted, match="site site04 committed to a graph-seed share and did not reveal it"):
        proto.collect(plan(sites, 10), transport)


def test_coordinator_changing_a_reveal_after_the_commitments_is_refused_by_every_site():
    proto = SecAggProtocol()
    sites, _, _, _ = make_group(proto, 5, 10, 0)

    def steer(sid, msg):
        if msg.kind is MessageKind.SECAGG_SHARE:
            reveals = msg.tensors["reveals"].copy()
            reveals[3] ^= 0xFF  # the coordinator's colluder "reveals" a value chosen after seeing the others
            return replace(msg, tensors={**msg.tensors, "reveals": reveals})
        return msg

    relay = Relay(sites, steer)
    with pytest.raises(RoundAborted, match="only 0 of 5 sites left after secret sharing"):
        proto.collect(plan(sites, 10), relay)
    for s in sites:  # site03 sees its own share changed; the others, reveals that do not fit the commitments
        expected = "relayed another graph-seed share for this site" if s == "site03" else "graph-seed reveals relayed do not match the commitments"
        assert expected in relay.why[(s, MessageKind.SECAGG_SHARE)]


def test_graph_seed_is_the_hash_of_the_reveals_in_name_order_and_fresh_each_round():
    proto = SecAggProtocol(SecAggConfig(security_bits=1, bad_fraction=0.1, degree=4))
    sites, _, _, _ = make_group(proto, 12, 10, 0)
    relay = Relay(sites)
    seeds = []
    for r in (1, 2):
        proto.collect(plan(sites, 10, r), relay)
        share = relay.replies  # the sites' own view of the seed is what their shares went to
        reveals = [base64.b64decode(relay.replies[(s, MessageKind.SECAGG_REVEAL_REPLY)].meta["reveal"]) for s in sorted(sites)]
        seed = _graph_seed(np.array([np.frombuffer(x, dtype=np.uint8) for x in reveals]))
        st = sites["site00"].protection._rounds["job"][1]
        assert st.seed == seed
        seeds.append(seed)
        assert share
    assert seeds[0] != seeds[1]


# -- consistency check ------------------------------------------------------------------------------
class ActiveCoordinator(SecAggProtocol):
    """A coordinator that does not check the survivors' signatures (it is the one lying)."""

    _signed = staticmethod(lambda key, sig, statement: True)


def _show_victim_dropped(targets, victim, relay_ref, with_mismatched=True):
    """Tell ``targets`` that ``victim`` dropped out (to collect shares of its mask key), and
    tell everyone else it survived (to collect shares of its self-mask)."""

    def rewrite(sid, msg):
        if sid not in targets:
            return msg
        if msg.kind is MessageKind.SECAGG_CHECK:  # bitmaps over the sorted group
            surv, gone = msg.tensors["survivors"].copy(), msg.tensors["dropped"].copy()
            i = int(victim[-2:])  # site00 … site04: the group's sorted order
            surv[i // 8] &= ~np.uint8(0x80 >> (i % 8))
            gone[i // 8] |= np.uint8(0x80 >> (i % 8))
            return replace(msg, tensors={"survivors": surv, "dropped": gone})
        if msg.kind is MessageKind.SECAGG_UNMASK:
            relay = relay_ref[0]
            sigs = {}
            for (s, kind), rep in relay.replies.items():
                if kind is MessageKind.SECAGG_CHECK_REPLY and s != victim and (with_mismatched or s in targets):
                    v_pk = relay.replies[(s, MessageKind.SECAGG_ADVERTISE_REPLY)].meta["v_pk"]
                    sigs[s] = [rep.meta["sig"], v_pk]
            surv = [s for s in msg.meta["survivors"] if s != victim]
            return replace(msg, meta={**msg.meta, "survivors": surv, "dropped": sorted(msg.meta["dropped"] + [victim]), "signatures": sigs})
        return msg

    return rewrite


@pytest.mark.parametrize("with_mismatched", [True, False])
def test_coordinator_showing_two_survivors_different_sets_is_refused(with_mismatched):
    """Complete graph of 5 (t = 3).  The coordinator tells site02 and site03 that site01 dropped
    out (to collect shares of its mask key and their masks with it) and the others that it
    survived (to collect shares of its self-mask).  Each of the two finds that site00 signed
    another survivor set (or, if the coordinator withholds the other signatures, that too few of
    site01's share group confirmed the set it was shown) and refuses to unmask: no share of
    site01's key and no mask with site01 is released; the honest sum still comes out."""
    proto = ActiveCoordinator()
    sites, _, vecs, weights = make_group(proto, 5, 10, 0)
    ref: list = []
    targets = {"site02", "site03"}
    relay = Relay(sites, _show_victim_dropped(targets, "site01", ref, with_mismatched))
    ref.append(relay)
    res = proto.collect(plan(sites, 10), relay)
    for s in targets:
        assert (s, MessageKind.SECAGG_UNMASK_REPLY) not in relay.replies
        why = relay.why[(s, MessageKind.SECAGG_UNMASK)]
        if with_mismatched:
            assert f"site {s} refuses to unmask: site site00 signed another survivor set than the one shown to this site" in why
        else:
            assert f"site {s} refuses to unmask: only 2 of the share group of dropped site site01 confirmed" in why
    for (s, kind), rep in relay.replies.items():
        if kind is MessageKind.SECAGG_UNMASK_REPLY:
            assert rep.meta["s"] == []  # nobody released a share of a mask key
    np.testing.assert_allclose(res.total, sum(weights[s] * vecs[s] for s in sites), atol=1e-6)


def test_two_thirds_threshold_stops_a_colluder_that_signs_both_sets():
    """With the default majority threshold the check holds only while no colluder sits in the share
    group (two holders shown different sets need 2t > |group| + colluders signers between them).
    With threshold 2/3 (t = 4 of 5), a colluding site00 that signs the doctored set as well cannot
    lift the doctored side to t: the targets refuse."""
    from insitu.secure.secagg import _ECDSA, _statement

    proto = ActiveCoordinator(SecAggConfig(threshold=0.67))
    sites, _, _, _ = make_group(proto, 5, 10, 0)
    ref: list = []
    targets = {"site03", "site04"}
    doctor = _show_victim_dropped(targets, "site01", ref, with_mismatched=False)

    def rewrite(sid, msg):
        msg = doctor(sid, msg)
        if sid in targets and msg.kind is MessageKind.SECAGG_UNMASK:  # the colluder's second signature
            colluder = sites["site00"].protection
            st = colluder._rounds["job"][1]
            surv = sorted(s for s in sites if s != "site01")
            sig = colluder._signing.sign(_statement("job", 1, st.seed, st.setup.digest, st.setup.bits(surv).tobytes(), st.setup.bits(["site01"]).tobytes()), _ECDSA)
            v_pk = ref[0].replies[("site00", MessageKind.SECAGG_ADVERTISE_REPLY)].meta["v_pk"]
            msg = replace(msg, meta={**msg.meta, "signatures": {**msg.meta["signatures"], "site00": [base64.b64encode(sig).decode(), v_pk]}})
        return msg

    relay = Relay(sites, rewrite)
    ref.append(relay)
    with pytest.raises(RoundAborted):  # three sites remain: too few to rebuild the silent targets' self-masks (t = 4)
        proto.collect(plan(sites, 10), relay)
    for s in targets:
        assert f"site {s} refuses to unmask: only 3 of the share group of dropped site site01 confirmed" in relay.why[(s, MessageKind.SECAGG_UNMASK)]


def test_honest_coordinator_names_a_site_whose_signature_does_not_fit():
    proto = SecAggProtocol()

    def forge(msg):
        if msg.kind is MessageKind.SECAGG_CHECK_REPLY:
            return replace(msg, meta={"sig": base64.b64encode(bytes(70)).decode()})
        return msg

    sites, transport, _, _ = make_group(proto, 5, 10, 0, tamper={"site03": forge})
    with pytest.raises(RoundAborted, match="site site03: its consistency signature does not verify"):
        proto.collect(plan(sites, 10), transport)


def test_sparse_graph_consistency_check_with_drop_outs_completes():
    """Drop-outs on a sparse graph: every survivor with a dropped neighbour checks t signatures of
    that neighbour's share group, and the round is exact."""
    proto = SecAggProtocol(SecAggConfig(security_bits=1, bad_fraction=0.1, degree=6))
    gone = {"site05", "site11", "site12"}
    sites, transport, vecs, weights = make_group(proto, 24, 16, 4, fail=lambda s, r, k: s in gone and k is MessageKind.TRAIN)
    res = proto.collect(plan(sites, 16), transport)
    members = [s for s in sorted(sites) if s not in gone]
    np.testing.assert_allclose(res.total, sum(weights[s] * vecs[s] for s in members), atol=1e-6)
    assert set(res.dropped) == gone


def test_site_refuses_unmask_before_signing_and_refuses_a_set_other_than_it_signed():
    proto = SecAggProtocol()
    sites, transport, _, _ = make_group(proto, 4, 10, 0, fail=lambda s, r, k: k is MessageKind.SECAGG_UNMASK)
    with pytest.raises(RoundAborted):
        proto.collect(plan(sites, 10), transport)
    site: SecAggSite = sites["site00"].protection
    other = Message(MessageKind.SECAGG_UNMASK, 1, "job", {"survivors": ["site00", "site02", "site03"], "dropped": ["site01"], "recovery": "survivors"})
    with pytest.raises(Exception, match="another survivor set than the one this site signed"):
        site.handlers()[MessageKind.SECAGG_UNMASK](other)


# -- confirmations between neighbours: MACs under the pairwise key ------------------------------------
def _round_with_a_drop_out(rewrite=None):
    proto = SecAggProtocol()
    drop = lambda s, r, k: s == "site04" and k is MessageKind.TRAIN  # noqa: E731
    sites, _, vecs, weights = make_group(proto, 5, 10, 0)
    relay = Relay(sites, rewrite, fail=drop)
    return proto, sites, relay, vecs, weights


def test_neighbours_confirm_the_survivor_set_with_macs_not_signatures():
    """Complete graph of 5, site04 drops out: every survivor needs t = 3 of site04's group to have
    signed its set before releasing a share of site04's key; all of them are its neighbours, so the
    coordinator relays their MACs and no signature at all, and the round is exact."""
    proto, sites, relay, vecs, weights = _round_with_a_drop_out()
    res = proto.collect(plan(sites, 10), relay)
    np.testing.assert_allclose(res.total, sum(weights[s] * vecs[s] for s in sites if s != "site04"), atol=1e-6)
    for s in ("site00", "site01", "site02", "site03"):
        macs = relay.replies[(s, MessageKind.SECAGG_CHECK_REPLY)].meta["macs"]
        assert sorted(macs) == sorted({"site00", "site01", "site02", "site03"} - {s})
        assert relay.replies[(s, MessageKind.SECAGG_UNMASK_REPLY)].meta["s"] == ["site04"]


@pytest.mark.parametrize("attack", ["reflected", "forged", "other set"])
def test_a_reflected_forged_or_foreign_confirmation_is_refused_naming_its_sender(attack):
    """The coordinator cannot make up site00's confirmation for site02: not by sending site02 its
    own MAC to site00 back (MACs are directed), not by flipping a bit, not with a MAC site00
    computed on another statement.  site02 refuses to unmask and names site00; its silence is a
    drop-out of the unmask phase, recovered from the others' shares, and the sum stays exact."""
    seen: dict = {}

    def rewrite(sid, msg):
        if msg.kind is MessageKind.SECAGG_UNMASK and sid == "site02":
            conf = dict(msg.meta["confirmations"])
            if attack == "reflected":
                conf["site00"] = seen["relay"].replies[("site02", MessageKind.SECAGG_CHECK_REPLY)].meta["macs"]["site00"]
            elif attack == "forged":
                raw = bytearray(base64.b64decode(conf["site00"]))
                raw[0] ^= 1
                conf["site00"] = base64.b64encode(bytes(raw)).decode()
            else:  # site00's real MAC to site02, on a statement with one more survivor
                from insitu.secure.secagg import _confirm_mac, _statement

                st = sites["site00"].protection._rounds["job"][1]
                other = _statement("job", 1, st.seed, st.setup.digest, st.setup.bits(sorted(sites)).tobytes(), st.setup.bits([]).tobytes())
                conf["site00"] = base64.b64encode(_confirm_mac(st.confirm_keys["site02"], "site00", "site02", other)).decode()
            return replace(msg, meta={**msg.meta, "confirmations": conf})
        return msg

    proto, sites, relay, vecs, weights = _round_with_a_drop_out(rewrite)
    seen["relay"] = relay
    res = proto.collect(plan(sites, 10), relay)
    np.testing.assert_allclose(res.total, sum(weights[s] * vecs[s] for s in sites if s != "site04"), atol=1e-6)
    why = relay.why[("site02", MessageKind.SECAGG_UNMASK)]
    assert "site site02 refuses to unmask: site site00 signed another survivor set than the one shown to this site" in why
    assert ("site02", MessageKind.SECAGG_UNMASK_REPLY) not in relay.replies


def test_a_confirmation_from_outside_the_share_group_is_refused():
    """Only a neighbour shares a MAC key with a site; a 'confirmation' keyed by anyone else is malformed."""

    def rewrite(sid, msg):
        if msg.kind is MessageKind.SECAGG_UNMASK and sid == "site02":
            return replace(msg, meta={**msg.meta, "confirmations": {**msg.meta["confirmations"], "site99": "AAAA"}})
        return msg

    proto, sites, relay, _, _ = _round_with_a_drop_out(rewrite)
    proto.collect(plan(sites, 10), relay)
    assert ("site02", MessageKind.SECAGG_UNMASK_REPLY) not in relay.replies
    assert "confirmations must come from its own share group" in relay.why[("site02", MessageKind.SECAGG_UNMASK)]
