"""The approved plan by its hash (insitu.federation.planref): after a site has checked the whole plan once in a
job, TRAIN and EVALUATE name it by its content hash; a site refuses, naming it, any hash it did not check whole in
that job, and the coordinator then sends the whole plan at once, without losing the round.  Real sites, builder,
coordinator and in-process transport (every message encoded and decoded as on the wire); real SiteNodes."""
from __future__ import annotations

import json

import numpy as np
import pytest

from insitu.apps.simulate import SimulationConfig
from insitu.builder import build_coordinator, build_federation, build_site, initial_params
from insitu.errors import ProtocolError
from insitu.federation.instructions import RoundInstructions
from insitu.federation.messages import Message, MessageKind
from insitu.federation.planref import PLAN_REF_KEY, UNKNOWN_PLAN, PlanRefTransport
from insitu.federation.transport import InProcessTransport

SECRETS = {s: bytes([i + 1]) * 32 for i, s in enumerate(["cleveland", "hungary", "switzerland", "va-long-beach"])}


@pytest.fixture(scope="module")
def heart():
    from insitu.data.heart import load_heart

    return load_heart()


def _plan(heart, **kw):
    return SimulationConfig(normalize="site", **kw).resolved().plan_for(heart.input_shape, heart.num_outputs, heart.schema)


def _run(plan, heart, by_hash: bool, rounds: int = 3):
    coord, sites = build_federation(plan, heart.sites, job="job-ref", secrets=SECRETS)
    if not by_hash:  # the same federation, whole plan in every request
        coord = build_coordinator(plan, "job-ref", InProcessTransport(sites), params=initial_params(plan, 0), plan_by_hash=False)
    down, evals = [], []
    for r in range(1, rounds + 1):
        rec = coord.run_round(r)
        evals.append(coord.evaluate(r))
        down.append({s: rec.bytes_down[s] + coord.eval_bytes_down[s] for s in sites})
    return coord, sites, down, evals


def test_after_round_one_the_plan_goes_by_hash_and_nothing_else_changes(heart):
    plan = _plan(heart)
    coord, sites, down, evals = _run(plan, heart, by_hash=True)
    ref, _, ref_down, ref_evals = _run(plan, heart, by_hash=False)
    assert isinstance(coord.transport, PlanRefTransport) and not isinstance(ref.transport, PlanRefTransport)
    assert coord.params.tobytes() == ref.params.tobytes() and evals == ref_evals  # the same rounds, bit for bit
    # round one: the TRAIN carries the whole plan (the site checks it), its evaluation already the hash
    assert coord.transport.plan_stats == {"full": 4, "hash": 4 + 2 * 4 * 2, "retried": 0}
    plan_json = len(json.dumps(plan.to_meta(), separators=(",", ":")))
    for s in sites:
        assert ref_down[0][s] - down[0][s] > plan_json - 100  # one request (the evaluation) named it by hash
        for r in (1, 2):  # TRAIN and EVALUATE both: the plan's JSON replaced by 64 hex digits
            assert ref_down[r][s] - down[r][s] > 2 * (plan_json - 100)
            assert down[r][s] < 0.5 * ref_down[r][s], (down, ref_down)


def test_a_hash_the_site_did_not_check_whole_in_this_job_is_refused_naming_it(heart):
    plan = _plan(heart)
    other = _plan(heart, local_steps=13)
    site = build_site(plan, "cleveland", heart.sites[0], secret=SECRETS["cleveland"])
    ins = RoundInstructions(group=4).to_meta()
    params = {"params": initial_params(plan, 0)}

    def train(meta, round_=1, job="job-ref"):
        return site.handle(Message(MessageKind.TRAIN, round_, job, {**meta, "instructions": ins}, params))

    h = plan.content_hash()
    # a new site holds the plan it was built from but has not been sent it whole: refused, naming the hash
    with pytest.raises(ProtocolError, match=f"site cleveland {UNKNOWN_PLAN} {h} for job 'job-ref'"):
        train({PLAN_REF_KEY: h})
    assert site.last_round == -1  # nothing trained
    assert train({"plan": plan.to_meta()}).kind is MessageKind.TRAIN_REPLY
    assert train({PLAN_REF_KEY: h}, round_=2).kind is MessageKind.TRAIN_REPLY  # now the hash resolves
    bad = other.content_hash()
    with pytest.raises(ProtocolError, match=f"{UNKNOWN_PLAN} {bad} for job 'job-ref' \\(it runs plan {h}\\)"):
        train({PLAN_REF_KEY: bad}, round_=3)
    with pytest.raises(ProtocolError, match=f"{UNKNOWN_PLAN} {h} for job 'job-other'"):  # same plan, another job
        train({PLAN_REF_KEY: h}, round_=3, job="job-other")
    for junk in ("ab" * 31, h.upper(), 7, None):
        with pytest.raises(ProtocolError, match="is not a plan content hash"):
            train({PLAN_REF_KEY: junk}, round_=3)
    with pytest.raises(ProtocolError, match="exactly one of 'plan'.*carries both"):
        train({"plan": plan.to_meta(), PLAN_REF_KEY: h}, round_=3)
    with pytest.raises(ProtocolError, match="exactly one of 'plan'.*carries neither"):
        train({}, round_=3)
    assert site.last_round == 2  # every refusal came before training
    # an evaluation names the plan the same way
    ev = {"instructions": {"split": "test"}}
    assert site.handle(Message(MessageKind.EVALUATE, 3, "job-ref", {PLAN_REF_KEY: h, **ev}, params)).kind is MessageKind.EVALUATE_REPLY
    with pytest.raises(ProtocolError, match=f"{UNKNOWN_PLAN} {bad}"):
        site.handle(Message(MessageKind.EVALUATE, 3, "job-ref", {PLAN_REF_KEY: bad, **ev}, params))


def test_a_restarted_site_gets_the_whole_plan_in_the_same_round(heart):
    plan = _plan(heart, min_sites=4)
    sites = {sd.name: build_site(plan, sd.name, sd, secret=SECRETS[sd.name]) for sd in heart.sites}

    class Process:  # the site's process: restarting it replaces its Site
        def __init__(self, name):
            self.site_id = name

        def handle(self, msg):
            return sites[self.site_id].handle(msg)

    coord = build_coordinator(plan, "job-ref", InProcessTransport({n: Process(n) for n in sites}), params=initial_params(plan, 0))
    coord.run_round(1)
    coord.run_round(2)
    assert coord.transport.plan_stats == {"full": 4, "hash": 4, "retried": 0}
    sites["hungary"] = build_site(plan, "hungary", heart.sites[1], secret=SECRETS["hungary"])  # restarted: holds nothing
    rec = coord.run_round(3)
    assert len(rec.participants) == 4 and not rec.dropped  # the round is not lost
    assert coord.transport.plan_stats == {"full": 5, "hash": 7, "retried": 1}
    assert rec.bytes_down["hungary"] > rec.bytes_down["cleveland"] + 600  # the refused request, then the whole plan
    coord.run_round(4)
    assert coord.transport.plan_stats == {"full": 5, "hash": 11, "retried": 1}  # and by hash again after that


def test_only_the_unknown_plan_code_is_retried_never_the_words(heart):
    """The coordinator resends the whole plan on a refusal whose code is UnknownPlanError; a refusal for
    another reason whose text happens to contain the same words (a site's own, or a hostile one's) is a
    plain drop, and a malformed code is named as such."""
    plan = _plan(heart, min_sites=2)
    sites = {sd.name: build_site(plan, sd.name, sd, secret=SECRETS[sd.name]) for sd in heart.sites[:3]}
    impostor = {"code": "ProtocolError"}

    class Process:
        def __init__(self, name):
            self.site_id = name

        def handle(self, msg):
            if self.site_id == "switzerland" and PLAN_REF_KEY in msg.meta:
                from insitu.federation.messages import error_reply

                return error_reply(msg, f"site switzerland {UNKNOWN_PLAN} {msg.meta[PLAN_REF_KEY]} (or so it says)", code=impostor["code"])
            return sites[self.site_id].handle(msg)

    coord = build_coordinator(plan, "job-ref", InProcessTransport({n: Process(n) for n in sites}), params=initial_params(plan, 0))
    coord.run_round(1)
    rec = coord.run_round(2)
    assert "switzerland" in rec.dropped and UNKNOWN_PLAN in rec.dropped["switzerland"]  # the words are shown to the operator
    assert coord.transport.plan_stats["retried"] == 0  # but not acted on
    assert "switzerland" in coord.run_round(3).participants  # (a site that did not answer gets the whole plan)
    impostor["code"] = "Unknown Plan Error!" * 10
    ex = coord.transport.exchange({"switzerland": coord.round_plan(4).train_request("switzerland")}, 10.0)
    assert ex.refused == {"switzerland": "malformed"} and coord.transport.plan_stats["retried"] == 0
    # a real site's refusal of a hash it does not hold carries the code, and is answered with the whole plan
    sites["hungary"] = build_site(plan, "hungary", heart.sites[1], secret=SECRETS["hungary"])
    rec = coord.run_round(5)
    assert "hungary" in rec.participants and coord.transport.plan_stats["retried"] == 1


def _nodes(tmp_path, plan):
    import dataclasses

    from insitu.data.heart import FEATURES
    from insitu.net import sandbox
    from insitu.site.node import SiteNode, load_site_data
    from insitu.site.policy import SitePolicy

    consortium = sandbox.create(tmp_path, sandbox.SITES, fixed_secrets=SECRETS)

    def start(s):
        policy = SitePolicy.load(consortium.write_site_config(s, approved=[plan.content_hash()]))
        return SiteNode(dataclasses.replace(policy, state=tmp_path / "state" / s), s, load_site_data(policy), schema=tuple(FEATURES))

    return {s: start(s) for s in sandbox.SITES}, start


def test_a_site_node_resolves_the_hash_against_its_job_and_checks_the_approval_every_round(tmp_path):
    from insitu.coordinator.jobs import JobSpec
    from insitu.coordinator.service import job_coordinator

    spec = JobSpec.from_dict({"name": "ref", "dataset": "heart", "rounds": 4, "min_sites": 4, "normalize": "site"})
    nodes, start = _nodes(tmp_path, spec.plan)

    class Process:  # the site's process: restarting it replaces its node
        def __init__(self, name):
            self.site_id = name

        def handle(self, msg):
            return nodes[self.site_id].handle(msg)

    coord, _, _ = job_coordinator(spec, "ref", InProcessTransport({s: Process(s) for s in nodes}))
    coord.run_round(1)
    coord.run_round(2)
    h = spec.plan.content_hash()
    # a restarted site process holds no plan of the job: it refuses the hash, naming it, and builds nothing
    fresh = start("hungary")
    req = Message(MessageKind.TRAIN, 3, "ref", {PLAN_REF_KEY: h, "instructions": RoundInstructions(group=4).to_meta()},
                  {"params": coord.params})
    with pytest.raises(ProtocolError, match=f"site hungary {UNKNOWN_PLAN} {h} for job 'ref' \\(this site holds no plan of that job\\)"):
        fresh.handle(req)
    assert "ref" not in fresh._sites
    nodes["hungary"] = fresh  # the coordinator's transport reaches the restarted process
    rec = coord.run_round(3)
    assert len(rec.participants) == 4 and coord.transport.plan_stats["retried"] == 1 and "ref" in fresh._sites
    # the admin withdraws the approval: the next request, naming the plan by hash only, is refused as unapproved
    nodes["cleveland"].approvals.path.write_text(json.dumps({}))
    nodes["cleveland"].approvals.fixed = ()  # (the approvals site.toml lists)
    ok = coord.transport.exchange({"cleveland": coord.round_plan(4).train_request("cleveland")}, 10.0)
    assert "not approved" in ok.dropped["cleveland"]
    entry = json.loads((nodes["cleveland"].policy.state / "refusals.jsonl").read_text().splitlines()[-1])
    assert entry["plan_hash"] == h and entry["error"] == "TaskNotApproved"
