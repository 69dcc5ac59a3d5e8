"""The hospital node's dispatch, in-process: refusals happen before training, are logged and kept for review."""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from insitu.errors import BudgetExceeded, PolicyViolation, ProtocolError, TaskNotApproved
from insitu.federation.instructions import EvalInstructions, RoundInstructions
from insitu.federation.messages import Message, MessageKind
from insitu.federation.task import TaskSpec
from insitu.plan import DPSpec, Plan
from insitu.site.node import SiteNode, load_site_data
from insitu.site.policy import DataSource, SitePolicy

FEATS = ("a", "b", "c")
TASK = Plan(TaskSpec(model="logreg", input_shape=(3,), num_outputs=1, schema=FEATS, lr=0.1, local_steps=5, batch_size=4), rounds=5)


def node(tmp_path, **policy):
    tmp_path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for part, n in (("train", 40), ("test", 20)):
        df = pd.DataFrame(rng.normal(size=(n, 3)), columns=list(FEATS))
        df["label"] = (df["a"] > 0).astype(int)
        df.to_csv(tmp_path / f"{part}.csv", index=False)
    pol = SitePolicy(coordinator=("127.0.0.1", 1), cert=tmp_path / "c", key=tmp_path / "k", ca=tmp_path / "ca", state=tmp_path / "state",
                     source=DataSource.CSV, data={"train": str(tmp_path / "train.csv"), "test": str(tmp_path / "test.csv")}, **policy)
    return SiteNode(pol, "hospital-a", load_site_data(pol), schema=FEATS)


def train(plan=TASK, round_=1, group=4):
    params = np.zeros(4, np.float32)
    meta = {"plan": plan.to_meta(), "instructions": RoundInstructions(group=group).to_meta()}
    return Message(MessageKind.TRAIN, round_, "job-1", meta, {"params": params})


def test_unapproved_task_refused_before_training_and_kept_for_review(tmp_path):
    n = node(tmp_path)
    with pytest.raises(TaskNotApproved, match="not approved"):
        n.handle(train())
    assert "job-1" not in n._sites  # refused before anything was built or trained
    entry = json.loads((tmp_path / "state" / "refusals.jsonl").read_text().splitlines()[0])
    assert entry["plan_hash"] == TASK.content_hash() and entry["error"] == "TaskNotApproved"
    assert TASK.content_hash() in json.loads((tmp_path / "state" / "pending.json").read_text())
    n.approvals.approve(TASK.content_hash())
    reply = n.handle(train())
    assert reply.kind is MessageKind.TRAIN_REPLY and reply.meta["weight"] == 40.0
    with pytest.raises(TaskNotApproved):  # evaluation is an approved use only, too
        other = TASK.with_task(lr=0.2)
        n.handle(Message(MessageKind.EVALUATE, 2, "job-2", {"plan": other.to_meta(), "instructions": EvalInstructions().to_meta()},
                         {"params": np.zeros(4, np.float32)}))


def test_schema_mismatch_and_plain_round_under_a_group_minimum_refused(tmp_path):
    n = node(tmp_path, approved=(), min_secagg_group=3)
    other = replace(TASK, task=replace(TASK.task, schema=("x", "y", "z")))
    n.approvals.approve(other.content_hash())
    with pytest.raises(TaskNotApproved, match="schema"):
        n.handle(train(other))
    n.approvals.approve(TASK.content_hash())
    with pytest.raises(PolicyViolation, match="secure aggregation among at least 3"):
        n.handle(train(group=4))


DP_TASK = replace(TASK, dp=DPSpec("record", noise_multiplier=2.0, clip=1.0))


def test_site_with_a_budget_runs_only_dp_tasks_and_charges_its_own_ledger_before_training(tmp_path):
    from insitu.builder import dp_events
    from insitu.privacy import PrivacyLedger, epsilon_of

    n = node(tmp_path, approved=(TASK.content_hash(), DP_TASK.content_hash()), epsilon_budget=1.0)
    with pytest.raises(BudgetExceeded, match="declares no differential privacy; this site has a privacy budget of ε=1"):
        n.handle(train(TASK))
    # the site's own figure: q = batch 4 / its 40 records, 5 steps per round, σ = 2
    per_round = dp_events(DP_TASK, 40)[0]
    rounds_allowed = 1
    while epsilon_of(per_round * (rounds_allowed + 1), 1e-5) <= 1.0:
        rounds_allowed += 1
    assert rounds_allowed == 3  # ε 0.61, 0.80, 0.95, then 1.08 after 1..4 rounds at q = 0.1
    replies = [n.handle(train(DP_TASK, round_=r)) for r in range(1, rounds_allowed + 1)]
    eps = [r.meta["metrics"]["epsilon_total"] for r in replies]
    assert eps == sorted(eps) and eps[-1] <= 1.0 and eps[0] == pytest.approx(epsilon_of(per_round, 1e-5))
    site = n._sites["job-1"]
    done = site.last_round
    with pytest.raises(BudgetExceeded, match=rf"round {rounds_allowed + 1} would spend ε=.*site budget has .* left \(limit 1 at δ=1e-05"):
        n.handle(train(DP_TASK, round_=rounds_allowed + 1))
    assert site.last_round == done  # refused before training
    ledger = PrivacyLedger(tmp_path / "state" / "privacy_ledger.sqlite")
    assert [r.round for r in ledger.records("hospital-a")] == list(range(1, rounds_allowed + 1))
    assert ledger.spent("hospital-a") == pytest.approx(eps[-1])
    refusal = json.loads((tmp_path / "state" / "refusals.jsonl").read_text().splitlines()[-1])
    assert refusal["error"] == "BudgetExceeded" and refusal["round"] == rounds_allowed + 1


def test_budget_survives_a_restart_and_dp_updates_are_noised(tmp_path):
    n = node(tmp_path, approved=(DP_TASK.content_hash(),), epsilon_budget=50.0)
    a = n.handle(train(DP_TASK, round_=1))
    spent = a.meta["metrics"]["epsilon_total"]
    again = node(tmp_path, approved=(DP_TASK.content_hash(),), epsilon_budget=50.0)  # same state directory
    b = again.handle(train(DP_TASK, round_=2))
    assert b.meta["metrics"]["epsilon_total"] > spent  # the new process starts from what was spent
    c = node(tmp_path / "other", approved=(DP_TASK.content_hash(),), epsilon_budget=50.0).handle(train(DP_TASK, round_=1))
    # same data, same plan, same first round: the sites' own secrets (sampling and noise) make the updates differ
    assert not np.allclose(a.tensors["update"], c.tensors["update"])


def test_dp_task_refused_without_a_budget_and_malformed_dp_refused(tmp_path):
    n = node(tmp_path, approved=(DP_TASK.content_hash(),))
    with pytest.raises(PolicyViolation, match="asks for record-level DP but this site has no privacy budget"):
        n.handle(train(DP_TASK))
    bad = DP_TASK.to_meta()
    bad["dp"]["noise_multiplier"] = 0.0
    n2 = node(tmp_path / "b", epsilon_budget=1.0)
    msg = train(DP_TASK)
    with pytest.raises(ProtocolError, match="noise_multiplier must be a positive number, got 0.0"):
        n2.handle(Message(msg.kind, msg.round, msg.job, {**msg.meta, "plan": bad}, msg.tensors))


def test_pending_tells_the_admin_what_a_dp_task_would_cost_here(tmp_path):
    from insitu.site.cli import _privacy_cell

    n = node(tmp_path, approved=(), epsilon_budget=1.0)
    cell = _privacy_cell(n.policy, DP_TASK.to_meta(), [])
    assert cell == "record-level DP σ=2, clip 1: first round ε=0.61 (q=0.1); spent 0 of 1"
    assert _privacy_cell(n.policy, TASK.to_meta(), []) == "no DP (refused: this site has a budget)"
    plain = node(tmp_path / "p")
    assert _privacy_cell(plain.policy, DP_TASK.to_meta(), []).endswith("refused: no epsilon_budget here")


SCHEMA_TOML = """table = "visits"
[columns.mrn]
role = "direct_identifier"
type = "string"
[columns.name]
role = "direct_identifier"
type = "string"
[columns.sex]
role = "quasi_identifier"
type = "string"
[columns.chol]
role = "feature"
type = "float"
[columns.bp]
role = "feature"
type = "float"
[columns.sick]
role = "label"
type = "boolean"
"""
DEID_TOML = """[deid]
k = 2
l = 1
max_suppression = 0.2
patient_id = "mrn"
[identifiers]
mrn = "pseudonymize"
name = "drop"
[generalize.sex]
hierarchy = "category"
"""


def test_a_deployed_site_reads_its_records_through_a_schema_and_deidentifies_them_first(tmp_path):
    """[data] source = "records": insitu.data.sources + the consortium's schema + the site's de-identification
    policy, then the same round engine; identifiers never reach the model, and a plan for another schema is refused."""
    from insitu.deid.pseudonym import generate_site_secret
    from insitu.site.node import load_records

    rng = np.random.default_rng(0)
    n = 80
    pd.DataFrame({"mrn": [str(100 + i) for i in range(n)], "name": [f"P{i}" for i in range(n)], "sex": rng.choice(["F", "M"], n),
                  "chol": rng.normal(200, 30, n).round(1), "bp": rng.normal(120, 10, n).round(1),
                  "sick": rng.choice(["true", "false"], n)}).to_csv(tmp_path / "visits.csv", index=False)
    (tmp_path / "schema.toml").write_text(SCHEMA_TOML)
    (tmp_path / "deid.toml").write_text(DEID_TOML)
    generate_site_secret(tmp_path / "site.secret")
    pol = SitePolicy(coordinator=("127.0.0.1", 1), cert=tmp_path / "c", key=tmp_path / "k", ca=tmp_path / "ca", state=tmp_path / "state",
                     source=DataSource.RECORDS, data={"uri": str(tmp_path / "visits.csv"), "schema": str(tmp_path / "schema.toml"),
                                                      "deid": str(tmp_path / "deid.toml"), "deid_secret": str(tmp_path / "site.secret")})
    data, schema = load_records(pol, "hospital-r")
    assert schema == ("chol", "bp") and data.X_train.shape[1] == 2 and data.n_train + data.n_test <= n
    plan = Plan(TaskSpec(model="logreg", input_shape=(2,), num_outputs=1, schema=schema, lr=0.1, local_steps=5, batch_size=4), rounds=5)
    node = SiteNode(pol, "hospital-r", data, schema=schema)
    node.approvals.approve(plan.content_hash())
    msg = Message(MessageKind.TRAIN, 1, "job-r", {"plan": plan.to_meta(), "instructions": RoundInstructions(group=4).to_meta()},
                  {"params": np.zeros(3, np.float32)})
    assert node.handle(msg).kind is MessageKind.TRAIN_REPLY
    other = plan.with_task(schema=("chol", "ldl"))
    node.approvals.approve(other.content_hash())
    with pytest.raises(TaskNotApproved, match="schema"):
        node.handle(Message(MessageKind.TRAIN, 1, "job-s", {**msg.meta, "plan": other.to_meta()}, msg.tensors))


def test_a_deployed_site_does_not_personalise_for_a_coordinator(tmp_path):
    """Personalisation (insitu simulate --personalize) is simulation only: no approved plan covers it."""
    n = node(tmp_path, approved=(TASK.content_hash(),))
    n.handle(train())
    with pytest.raises(ProtocolError, match="not offered by deployed sites"):
        n.handle(Message(MessageKind.PERSONALIZE, 2, "job-1", {"plan": TASK.to_meta(), "steps": 5}, {"params": np.zeros(4, np.float32)}))
