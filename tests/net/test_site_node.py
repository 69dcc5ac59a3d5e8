"""The hospital node's dispatch, in-process: refusals happen before training, are logged and kept for review."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from insitu.errors import PolicyViolation, TaskNotApproved
from insitu.federation.messages import Message, MessageKind
from insitu.federation.task import TaskSpec
from insitu.site.node import SiteNode, load_site_data
from insitu.site.policy import DataSource, SitePolicy

FEATS = ("a", "b", "c")
TASK = TaskSpec(model="logreg", input_shape=(3,), num_outputs=1, schema=FEATS, lr=0.1, local_steps=5, batch_size=4)


def node(tmp_path, **policy):
    rng = np.random.default_rng(0)
    for part, n in (("train", 40), ("test", 20)):
        df = pd.DataFrame(rng.normal(size=(n, 3)), columns=list(FEATS))
        df["label"] = (df["a"] > 0).astype(int)
        df.to_csv(tmp_path / f"{part}.csv", index=False)
    pol = SitePolicy(coordinator=("127.0.0.1", 1), cert=tmp_path / "c", key=tmp_path / "k", ca=tmp_path / "ca", state=tmp_path / "state",
                     source=DataSource.CSV, data={"train": str(tmp_path / "train.csv"), "test": str(tmp_path / "test.csv")}, **policy)
    data, stream = load_site_data(pol)
    return SiteNode(pol, "hospital-a", data, stream, schema=FEATS)


def train(task=TASK, round_=1, **meta):
    params = np.zeros(4, np.float32)
    return Message(MessageKind.TRAIN, round_, "job-1", {"task": task.to_meta(), "seed": 0, **meta}, {"params": params})


def test_unapproved_task_refused_before_training_and_kept_for_review(tmp_path):
    n = node(tmp_path)
    with pytest.raises(TaskNotApproved, match="not approved"):
        n.handle(train())
    site = n._sites["job-1"]
    assert site.last_round == -1  # nothing trained
    entry = json.loads((tmp_path / "state" / "refusals.jsonl").read_text().splitlines()[0])
    assert entry["task_hash"] == TASK.content_hash() and entry["error"] == "TaskNotApproved"
    assert TASK.content_hash() in json.loads((tmp_path / "state" / "pending.json").read_text())
    n.approvals.approve(TASK.content_hash())
    reply = n.handle(train())
    assert reply.kind is MessageKind.TRAIN_REPLY and reply.meta["weight"] == 40.0
    with pytest.raises(TaskNotApproved):  # evaluation is an approved use only, too
        n.handle(Message(MessageKind.EVALUATE, 2, "job-2", {"task": {**TASK.to_meta(), "lr": 0.2}}, {"params": np.zeros(4, np.float32)}))


def test_schema_mismatch_and_plain_round_under_a_group_minimum_refused(tmp_path):
    n = node(tmp_path, approved=(), min_secagg_group=3)
    other = TaskSpec(model="logreg", input_shape=(3,), num_outputs=1, schema=("x", "y", "z"), lr=0.1, local_steps=5, batch_size=4)
    n.approvals.approve(other.content_hash())
    with pytest.raises(TaskNotApproved, match="schema"):
        n.handle(train(other))
    n.approvals.approve(TASK.content_hash())
    with pytest.raises(PolicyViolation, match="secure aggregation among at least 3"):
        n.handle(train(protocol="plain", group=4))
