"""A hostile coordinator against a hospital running an approved DP or secure-aggregation plan.

Each test is one attack, written here and run through the real site code (the deployed
:class:`~insitu.site.node.SiteNode` with its sandbox certificates, or the :class:`~insitu.federation.site.Site`
the one builder makes), with messages any coordinator can send.  The goal is always one patient's
value: the oldest test patient's age (z-scored, as the site encodes it), found by bisection over the
site's evaluation answers about crafted one-feature models; or one validation patient's exact value
through the Score 1 threshold.  The search itself is checked against the records (it finds the age
exactly when the answers come), so a test that sees it stopped is a defence holding, not an attack
that could not have worked.

Found by these attacks and mended (each test failed before its fix):

* a new job name opened two fresh "never trained" evaluations (free under DP: no TRAIN needed);
* a TRAIN that failed after its guards (no key agreement) still made its model one the site scores;
* an int8 downlink TRAIN refused by a guard (budget spent, group too small) still vouched for a model;
* the Score 1 threshold (one validation record's exact risk) was answered again and again per job.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace

import numpy as np
import pytest

from insitu.coordinator.jobs import JobSpec
from insitu.errors import BudgetExceeded, InsituError, ProtocolError
from insitu.federation.instructions import EvalInstructions, RoundInstructions
from insitu.federation.messages import Message, MessageKind
from insitu.net import sandbox

SITE = "cleveland"
AGE = 0  # heart feature 0: age
D = 13  # heart features; a logistic model is 13 weights and a bias


# -- the attacker's tools ------------------------------------------------------------------------
def one_feature(t: float, k: int = AGE) -> np.ndarray:
    """A logistic model that predicts positive exactly for records whose feature ``k`` exceeds ``t``."""
    p = np.zeros(D + 1, np.float32)
    p[k], p[D] = 1.0, -np.float32(t)
    return p


def above(reply: Message) -> int:
    """How many scored records the one-feature model called positive: true positives + false positives."""
    n, ok = reply.meta["n_by_class"], reply.meta["correct_by_class"]
    return int(ok[1] + n[0] - ok[0])


@dataclass
class Search:
    """Bisection for the largest value of a feature among a site's records, one evaluation per step."""

    low: float = -6.0  # z-scores: every record's feature lies above low ...
    high: float = 6.0  # ... and none above high
    answered: int = 0
    refusal: str | None = None

    def run(self, ask, steps: int = 40) -> "Search":
        for i in range(steps):
            mid = float(np.float32((self.low + self.high) / 2))
            try:
                count = ask(i, mid)
            except InsituError as exc:
                self.refusal = str(exc)
                return self
            self.answered += 1
            if count > 0:
                self.low = mid
            else:
                self.high = mid
        return self

    @property
    def width(self) -> float:
        return self.high - self.low


def oldest(data) -> float:
    return float(data.X_test[:, AGE].max())


def test_the_search_finds_the_oldest_patient_when_every_question_is_answered(heart):
    """The attack works when nothing stops it: the same questions answered from the records themselves."""
    x = heart.sites[0].X_test[:, AGE].numpy()
    s = Search().run(lambda i, t: int(np.sum(x > np.float32(t))))
    assert s.answered == 40 and s.refusal is None
    assert s.low < oldest(heart.sites[0]) <= s.high and s.width < 1e-5


# -- a deployed site node ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sb(tmp_path_factory):
    return sandbox.create(tmp_path_factory.mktemp("hostile-coordinator"), [SITE, "hungary", "switzerland", "va-long-beach"])


def site_node(sb, job: dict, name: str, **policy):
    """The real hospital node of ``SITE`` with ``job``'s plan approved; its own state directory ``name``."""
    from dataclasses import replace as dc_replace

    from insitu.data.heart import FEATURES
    from insitu.site.node import SiteNode, load_site_data
    from insitu.site.policy import SitePolicy

    plan = JobSpec.from_dict({"name": name, "dataset": "heart", "rounds": 3, **job}).plan
    pol = SitePolicy.load(sb.write_site_config(SITE, approved=[plan.content_hash()], policy=policy))
    pol = dc_replace(pol, state=sb.root / "state" / name)
    return SiteNode(pol, SITE, load_site_data(pol), schema=tuple(FEATURES)), plan


def evaluate(plan, job: str, params: np.ndarray, **ins) -> Message:
    return Message(MessageKind.EVALUATE, 1, job, {"plan": plan.to_meta(), "instructions": EvalInstructions(**ins).to_meta()}, {"params": params})


def train(plan, job: str, round_: int, params: np.ndarray | None = None, *, group: int = 4, extra: dict | None = None,
          tensors: dict | None = None) -> Message:
    meta = {"plan": plan.to_meta(), "instructions": RoundInstructions(group=group).to_meta(), **(extra or {})}
    return Message(MessageKind.TRAIN, round_, job, meta, tensors if tensors is not None else {"params": params})


RECORD_DP = {"dp": "record", "epsilon": 1.0}


def test_new_job_names_open_no_fresh_evaluations_of_crafted_models(sb, heart):
    """Attack: under an approved record-level DP plan, ask each question in a job of its own name (the
    site allowed two models it was never sent per job).  Before: 40 of 40 answered, the oldest test
    patient's age to 1e-5, and no ε charged.  Now the answers in jobs a node has not trained in come from
    one allowance of the node's, earned by training: 2 to start, then refused (nothing built for them)."""
    from insitu.site.node import UNTRAINED_EVALUATIONS

    node, plan = site_node(sb, RECORD_DP, "rotation", epsilon_budget=10.0)
    s = Search().run(lambda i, t: above(node.handle(evaluate(plan, f"probe-{i}", one_feature(t)))))
    assert s.answered == UNTRAINED_EVALUATIONS == 2 and "answered no train request of that job" in s.refusal
    assert "allowance 2: 2 for each of the 0 job(s) it trained in, and 2 to start" in s.refusal and "probe-2" in s.refusal
    assert s.width == 3.0 and sorted(node._sites) == ["probe-0", "probe-1"]  # refused before anything was built
    assert not node.ledger.records(SITE)


def test_with_trained_jobs_each_charged_round_buys_at_most_five_crafted_models(sb, heart):
    """The way that is left: a TRAIN per job (charged to the ledger: the crafted model it trains on may be
    scored), then the job's two unverified models, then the two answers in untrained jobs that the trained
    job earns.  The budget bounds the questions: at most 5 per charged round (and 2 to start).  It does not
    protect the test records: evaluation answers are exact, and bisection needs few (with ε = 2, 55 answers
    pin the age to float32 resolution; run with -s for the figures)."""
    node, plan = site_node(sb, RECORD_DP, "charged", epsilon_budget=2.0)

    def ask(i, t):
        job, k = f"probe-{i // 5}", i % 5
        if k == 0:  # opens the job: trains on the crafted model, which the site may then score
            node.handle(train(plan, job, 1, one_feature(t)))
        return above(node.handle(evaluate(plan, job if k < 3 else f"spare-{i}", one_feature(t))))

    s = Search().run(ask, steps=80)
    rounds = node.ledger.records(SITE)
    assert s.refusal is not None and "budget" in s.refusal
    assert 0 < s.answered <= 5 * len(rounds) + 2 and node.ledger.spent(SITE) <= 2.0
    assert {r.job for r in rounds} == {f"probe-{i}" for i in range(len(rounds))}  # one charged round per job opened
    print(f"residual oracle: {s.answered} answers for {len(rounds)} charged rounds (eps {node.ledger.spent(SITE):.2f} of 2); "
          f"oldest age within [{s.low:.9f}, {s.high:.9f}] (width {s.width:.2g}), true {oldest(heart.sites[0]):.9f}")


def test_a_new_job_name_does_not_reset_the_privacy_ledger(sb):
    """Attack: spend the budget in one job, then carry on under another name (and replay a charged round)."""
    node, plan = site_node(sb, RECORD_DP, "ledger", epsilon_budget=1.0)
    p = np.zeros(D + 1, np.float32)
    done = 0
    with pytest.raises(BudgetExceeded):
        for r in range(1, 20):
            node.handle(train(plan, "job-a", r, p))
            done = r
    assert done >= 1
    with pytest.raises(BudgetExceeded, match="would spend"):
        node.handle(train(plan, "job-b", 1, p))
    assert [rec.job for rec in node.ledger.records(SITE)] == ["job-a"] * done and node.ledger.spent(SITE) <= 1.0


def test_a_trained_job_pushed_out_of_memory_and_reopened_gives_no_fresh_evaluations(sb):
    """Attack: train once, then again and again push the job out of the node's memory with refused TRAINs
    of junk jobs (a node keeps 8) and reopen it with EVALUATEs: each rebuilt job has trained nothing, so
    its answers come from the node's allowance (2 for the one job trained, 2 to start), not 2 per reopening."""
    from insitu.site.node import MAX_JOBS, UNTRAINED_EVALUATIONS

    node, plan = site_node(sb, {"secure_aggregation": False}, "evict")
    node.handle(train(plan, "real", 1, np.zeros(D + 1, np.float32)))
    answered, refusal, junk = 0, "", 0
    for cycle in range(4):
        for _ in range(MAX_JOBS):
            junk += 1
            with pytest.raises(ProtocolError):  # refused (a NaN model), after the job was built
                node.handle(train(plan, f"junk-{junk}", 1, np.full(D + 1, np.nan, np.float32)))
        assert "real" not in node._sites
        for q in range(3):
            try:
                node.handle(evaluate(plan, "real", one_feature(cycle + q / 10)))
                answered += 1
            except ProtocolError as exc:
                refusal = str(exc)
                break
    assert answered == 2 * UNTRAINED_EVALUATIONS and "allowance 4: 2 for each of the 1 job(s) it trained in" in refusal


# -- the site of the round engine (simulation and deployment share it) ------------------------------
def built_site(heart, job: dict, *, val: bool = False, ledger=None, guards=()):
    from insitu.builder import build_site
    from insitu.data.dataset import SiteData

    data = heart.sites[0]
    if val:  # the heart data has no validation split: the test split serves as one
        data = SiteData(data.name, data.X_train, data.y_train, data.X_test, data.y_test, data.X_test, data.y_test)
    plan = JobSpec.from_dict({"name": "j", "dataset": "heart", "rounds": 3, **job}).plan
    return build_site(plan, SITE, data, secret=b"s" * 32, ledger=ledger, guards=guards), plan, data


def test_a_failed_train_does_not_make_its_model_one_the_site_scores(heart):
    """Attack on a secure-aggregation plan: send each crafted model in a TRAIN with no key agreement (it
    fails after the guards, charging nothing), then ask for its evaluation.  Before: every question
    answered.  Now only a TRAIN answered counts; what is left is the two models allowed per job."""
    site, plan, _ = built_site(heart, {"secure_aggregation": True})

    def ask(i, t):
        p = one_feature(t)
        with pytest.raises(ProtocolError, match="without key agreement"):
            site.handle(train(plan, "j", i + 1, p))  # a failed round is spent: each try takes a new round number
        return above(site.handle(evaluate(plan, "j", p)))

    s = Search().run(ask)
    assert s.answered == 2 and "never sent to this site for training" in s.refusal and "limit 2" in s.refusal
    assert s.width > 1.0


def test_a_refused_int8_train_does_not_vouch_for_a_model(heart):
    """Attack on ``downlink = "delta:int8"`` under record-level DP: once the budget is spent, every TRAIN is
    refused by the budget guard, but the site had already stored the int8 reception, which then vouched
    for the exact model it approximates, chosen freely by the coordinator.  Before: every question
    answered (no ε).  Now a reception counts only once its TRAIN is answered."""
    from insitu.compress.downlink import DownlinkMode, encode_delta
    from insitu.privacy import Budget, PrivacyLedger

    ledger = PrivacyLedger(":memory:")
    ledger.set_budget(SITE, Budget(0.7))
    site, plan, _ = built_site(heart, {**RECORD_DP, "downlink": "delta:int8"}, ledger=ledger)
    held = np.zeros(D + 1, np.float32)
    site.handle(train(plan, "j", 1, held, group=1))  # one honest round spends most of the budget
    held = site.downlink.held.copy()
    with pytest.raises(BudgetExceeded):
        site.handle(train(plan, "j", 2, held, group=1))

    def ask(i, t):
        nonlocal held
        p = one_feature(t)
        meta, tensors, _ = encode_delta(DownlinkMode.DELTA_INT8, held, p)
        with pytest.raises(BudgetExceeded):
            site.handle(train(plan, "j", 2, group=1, extra={"downlink": meta}, tensors=tensors))
        reply = site.handle(evaluate(plan, "j", p))
        held = p  # the site holds the model it scored
        return above(reply)

    s = Search().run(ask)
    assert s.answered == 2 and "never sent to this site for training" in s.refusal
    assert len(ledger.records(SITE)) == 1 and s.width > 1.0


def test_the_score1_threshold_is_one_exact_record_value_and_is_answered_once_per_job(heart):
    """Attack: ask for the Score 1 threshold about a crafted model whose risk is sigmoid(age).  The
    answer is one validation patient's exact age: this is what one answer leaks, and why it is given
    once per job (a deployed ICU job asks once, for the model it publishes).  Before: answered every time."""
    site, plan, data = built_site(heart, {}, val=True)
    site.handle(train(plan, "j", 1, np.zeros(D + 1, np.float32), group=1))
    probe = one_feature(0.0)
    reply = site.handle(evaluate(plan, "j", probe, split="val", threshold=True))
    thr = reply.meta["threshold"]
    age = math.log(thr / (1 - thr))
    ages = data.X_val[data.y_val == 1, AGE].numpy()
    assert np.min(np.abs(ages - age)) < 1e-5  # exactly one positive patient's age
    with pytest.raises(ProtocolError, match="already answered its Score 1 threshold for job 'j'; it answers it once per job"):
        site.handle(evaluate(plan, "j", probe, split="val", threshold=True))
    with pytest.raises(ProtocolError, match="already answered"):  # another model does not reopen it
        site.handle(evaluate(plan, "j", np.zeros(D + 1, np.float32), split="val", threshold=True))
    assert "threshold" not in site.handle(evaluate(plan, "j", probe, split="val")).meta  # plain answers go on


# -- distributed DP noise under secure aggregation --------------------------------------------------
class Recorder:
    """A real site whose refusals are kept (the transport turns them into error replies)."""

    def __init__(self, site):
        self.site, self.refusals = site, []

    def handle(self, msg: Message) -> Message:
        try:
            return self.site.handle(msg)
        except InsituError as exc:
            self.refusals.append(str(exc))
            raise


def test_a_sum_short_of_the_noise_shares_each_site_was_sized_for_is_not_unmasked(heart):
    """Attack on site-level DP with the noise placed at the sites under secure aggregation (4 sites,
    min_sites = 4: each adds N(0, σ²/4)).  The coordinator announces 4 shares in the TRAIN (as the sites'
    budget guards require), lets one site drop, and unmasks the other three: a sum with 3/4 of the noise
    variance every site charged its ledger for (the honest coordinator refuses to publish it, but it has
    it).  Before: the three sites unmasked it.  Now each refuses, naming the shares it was sized for."""
    from insitu.apps.simulate import SimulationConfig
    from insitu.builder import build_federation, dp_events
    from insitu.errors import RoundAborted
    from insitu.federation.transport import InProcessTransport
    from insitu.privacy import Budget, PrivacyEvent, PrivacyLedger, epsilon_of
    from insitu.privacy.accounting import Mechanism

    cfg = SimulationConfig(dataset="heart", rounds=3, dp="site", epsilon=3.0, dp_placement="distributed",
                           secure_aggregation=True, min_sites=4).resolved()
    plan = cfg.plan_for(heart.input_shape, heart.num_outputs, heart.schema)
    ledger = PrivacyLedger(":memory:")
    for s in heart.sites:
        ledger.set_budget(s.name, Budget(1e6))
    coord, sites = build_federation(plan, heart.sites, ledger=ledger)
    secagg = coord.protocol.inner  # the hostile coordinator skips the DP wrapper's own refusal
    victim = "va-long-beach"

    def round_(r: int, drop: bool) -> tuple[dict[str, Recorder], object]:
        recs = {k: Recorder(v) for k, v in sites.items()}
        t = InProcessTransport(recs, fail=(lambda sid, _r, kind: drop and sid == victim and kind is MessageKind.TRAIN))
        rp = coord.round_plan(r)
        rp = replace(rp, instructions=replace(rp.instructions, dp_min_shares=plan.min_sites), min_sites=3)
        try:
            return recs, secagg.collect(rp, t)
        except RoundAborted as exc:
            return recs, exc

    events, z, _ = dp_events(plan, heart.sites[0].n_train)
    three = [PrivacyEvent(Mechanism.GAUSSIAN, z * (3 / 4) ** 0.5)]  # what three shares of four carry
    assert epsilon_of(three * plan.rounds, plan.dp.delta) > 1.1 * epsilon_of(list(events) * plan.rounds, plan.dp.delta)  # the stakes

    _, honest = round_(1, drop=False)  # the harness: with every share in, the sum is unmasked
    assert len(honest.participants) == 4
    recs, short = round_(2, drop=True)
    assert isinstance(short, RoundAborted), f"a sum of {getattr(short, 'participants', '?')} was unmasked"
    for s in sites:
        if s != victim:  # it trained and masked its update; it refuses only to unmask the short sum
            assert sites[s].last_round == 2
            assert any("refuses to unmask a sum of 3 sites" in r and "sized for a sum of at least 4" in r for r in recs[s].refusals), recs[s].refusals


def test_a_fixed_point_bound_chosen_to_fail_is_refused_and_the_error_names_no_value_of_the_update(heart):
    """Attack on a secure-aggregation plan: announce a fixed-point bound of 1e-9 in the key agreement (the
    coordinator chooses it), so that every site's masking fails after training.  Before: each error reply
    named "a coordinate of magnitude 45.5" (the largest value of that site's weighted update, 4 digits), and
    the same round could be tried again with another crafted model, one more value each time.  Now a site
    refuses a bound below the one its plan implies, before encoding (nothing about the update in it), and
    the round is spent."""
    from insitu.builder import build_federation
    from insitu.federation.transport import InProcessTransport
    from insitu.secure import SecAggConfig, SecAggProtocol
    from insitu.secure.secagg import UNBOUNDED

    plan = JobSpec.from_dict({"name": "j", "dataset": "heart", "rounds": 3, "secure_aggregation": True, "lr": 0.1}).plan
    coord, sites = build_federation(plan, heart.sites)
    recs = {k: Recorder(v) for k, v in sites.items()}
    sent: dict[str, Message] = {}

    class Keep(InProcessTransport):
        def exchange(self, requests, timeout):
            sent.update({s: m for s, m in requests.items() if m.kind is MessageKind.TRAIN})
            return super().exchange(requests, timeout)

    rp = coord.round_plan(1)
    rp = replace(rp, train_tensors={**rp.train_tensors, "params": np.full(rp.size, 3.0, np.float32)})
    with pytest.raises(InsituError):
        SecAggProtocol(SecAggConfig(bound=1e-9)).collect(rp, Keep(recs))
    for name, rec in recs.items():
        assert len(rec.refusals) == 1 and f"announces a fixed-point bound of 1e-09, below the {UNBOUNDED:g} its plan implies" in rec.refusals[0]
        again = replace(sent[name], tensors={**sent[name].tensors, "params": np.full(rp.size, 30.0, np.float32)})
        with pytest.raises(ProtocolError, match="round 1 replayed"):
            sites[name].handle(again)
    # the honest bound goes through (the harness)
    assert len(coord.protocol.collect(coord.round_plan(2), InProcessTransport(sites)).participants) == 4


@pytest.mark.parametrize("encoder", ["fixed-point", "paillier"])
def test_an_update_beyond_the_encoding_bound_is_refused_without_its_size(encoder):
    """Where an honest bound is exceeded all the same (an update larger than the plan foresaw), the refusal
    names the bound, never the update's largest value (it leaves in the error reply, outside the mask)."""
    import re

    from insitu.secure.fixedpoint import FixedPoint
    from insitu.secure.paillier import PackedLayout

    enc = FixedPoint.fit(64, 10.0, 4).encode if encoder == "fixed-point" else PackedLayout(2048, 20, 10.0, 4).encode
    with pytest.raises(ProtocolError, match="above the .* bound 10") as info:
        enc(np.array([0.0, 45.5123]))
    assert not re.search(r"45|magnitude", str(info.value)), str(info.value)


# -- held: what else a curious coordinator might read or ask ------------------------------------------
def test_under_secure_aggregation_replies_of_sites_with_different_records_are_the_same_size(heart):
    """Metadata: under secure aggregation a TRAIN reply's bytes and fields do not depend on the site's
    records (its record count travels inside the masked vector): four hospitals of 199, 172, 30 and 85
    training records send replies of one size, with the same declared fields and no metrics."""
    from insitu.builder import build_federation
    from insitu.federation.messages import encode
    from insitu.federation.transport import InProcessTransport

    plan = JobSpec.from_dict({"name": "j", "dataset": "heart", "rounds": 3, "secure_aggregation": True}).plan
    coord, sites = build_federation(plan, heart.sites)
    replies: dict[str, Message] = {}

    class Keep(InProcessTransport):
        def exchange(self, requests, timeout):
            ex = super().exchange(requests, timeout)
            replies.update({s: r for s, r in ex.replies.items() if r.kind is MessageKind.TRAIN_REPLY})
            return ex

    res = coord.protocol.collect(coord.round_plan(1), Keep(sites))
    assert len(res.participants) == 4 and len({s.n_train for s in heart.sites}) == 4
    assert len({len(encode(r)) for r in replies.values()}) == 1
    assert {tuple(sorted(r.meta)) for r in replies.values()} == {("metrics", "secagg")}
    assert all(r.meta["metrics"] == {} for r in replies.values())


def test_a_deployed_site_does_not_fine_tune_for_a_coordinator(sb):
    """Personalisation fine-tunes a copy on the site's records and answers its scores; a deployed node
    refuses it (no approved plan covers it), whatever the job."""
    node, plan = site_node(sb, RECORD_DP, "personalize", epsilon_budget=10.0)
    node.handle(train(plan, "job", 1, np.zeros(D + 1, np.float32)))
    with pytest.raises(ProtocolError, match="personalisation is not offered by deployed sites"):
        node.handle(Message(MessageKind.PERSONALIZE, 2, "job", {"plan": plan.to_meta()}, {"params": np.zeros(D + 1, np.float32)}))


def test_a_plan_whose_model_keeps_statistics_of_the_records_is_refused_before_approval(sb):
    """A model with batchnorm keeps running statistics of the site's training batches outside the update:
    evaluation answers would then depend on them, unmasked and un-noised, and the same model (same hash)
    would answer differently after each TRAIN.  The task itself refuses such a model, so a site never
    builds one, whatever the coordinator sends."""
    node, plan = site_node(sb, {"secure_aggregation": True, "model_spec": {"layers": [{"type": "linear", "out_features": "outputs"}]}}, "bn")
    meta = plan.to_meta()
    from insitu.learn.spec import ModelSpec

    bn = ModelSpec.parse(json.dumps({"layers": [{"type": "batchnorm"}, {"type": "linear", "out_features": "outputs"}]}))
    meta["task"]["model_spec"] = bn.to_meta()  # in canonical form, as a real plan carries it
    msg = Message(MessageKind.TRAIN, 1, "job", {"plan": meta, "instructions": RoundInstructions(group=4).to_meta()}, {"params": np.zeros(28, np.float32)})
    with pytest.raises(ProtocolError, match=r"batchnorm.*running statistics"):
        node.handle(msg)
    assert not node._sites


@pytest.mark.xfail(strict=True, raises=pytest.fail.Exception, reason="known, not fixed: homomorphic aggregation trusts the coordinator to ask for sums only "
                   "(insitu.secure.he's stated trust model); a site cannot tell a sum from one site's ciphertext")
def test_a_homomorphic_site_does_not_decrypt_another_sites_ciphertext(heart):
    """Attack on ``homomorphic = "paillier"``: after an honest round, send one site's ciphertext (Switzerland's)
    to a site that has not decrypted yet this round, as a "sum" of the round's 4 sites.  It decrypts it:
    less the 3 packing offsets the coordinator knows, Switzerland's own weighted update, its weight (30
    records) included.  Every site holds the private key, so each round yields one site's update per site
    that has not yet decrypted.  Secure aggregation has no such oracle (use it against a hostile coordinator)."""
    from insitu.builder import build_federation
    from insitu.federation.transport import InProcessTransport

    plan = JobSpec.from_dict({"name": "j", "dataset": "heart", "rounds": 3, "homomorphic": "paillier"}).plan
    coord, sites = build_federation(plan, heart.sites)
    replies: dict[str, Message] = {}
    decrypt: dict[str, Message] = {}

    class Keep(InProcessTransport):
        def exchange(self, requests, timeout):
            ex = super().exchange(requests, timeout)
            decrypt.update({s: m for s, m in requests.items() if m.kind is MessageKind.HE_DECRYPT})
            replies.update({s: r for s, r in ex.replies.items() if r.kind is MessageKind.TRAIN_REPLY})
            return ex

    honest = coord.protocol.collect(coord.round_plan(1), Keep(sites))
    assert honest.weight == sum(s.n_train for s in heart.sites)
    meta = next(iter(decrypt.values())).meta
    asked = next(s for s in sites if s not in decrypt and s != "switzerland")
    with pytest.raises(InsituError):
        sites[asked].handle(Message(MessageKind.HE_DECRYPT, 1, coord.job, meta, replies["switzerland"].tensors))
