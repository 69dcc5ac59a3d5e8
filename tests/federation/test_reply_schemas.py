"""Every reply a site sends is checked against its schema before the coordinator uses it.

An evaluate reply whose accuracy was a string once killed the coordinator (issue 15); a train reply
whose metrics were an integer escaped secure and homomorphic aggregation as a bare ProtocolError.
Now a malformed evaluate reply leaves that site out of the evaluation with the reason, and a
malformed train reply drops the site (plain) or aborts the round naming it (secure, homomorphic).
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from insitu.builder import build_federation
from insitu.data.heart import load_heart
from insitu.errors import ProtocolError, RoundAborted
from insitu.federation.messages import Message, MessageKind
from insitu.federation.instructions import EvalInstructions, Split
from insitu.federation.task import TaskSpec
from insitu.federation.transport import error_reason, reply_evaluation, reply_metrics
from insitu.plan import Plan, Protection, ProtectionSpec

HONEST = {"loss": 0.41, "correct": 7, "n": 9, "accuracy": 7 / 9}


def ev(**meta) -> Message:
    return Message(MessageKind.EVALUATE_REPLY, 3, "j", meta)


def test_honest_evaluation_passes_unchanged():
    assert reply_evaluation(ev(**HONEST)) == HONEST
    assert reply_evaluation(ev(loss=0, correct=0, n=1, accuracy=0)) == {"loss": 0.0, "correct": 0, "n": 1, "accuracy": 0.0}


@pytest.mark.parametrize("change, needle", [
    ({"accuracy": "0.9"}, "'accuracy' = '0.9' is not a finite number"),
    ({"accuracy": True}, "'accuracy' = True is not a finite number"),
    ({"accuracy": [0.9]}, "'accuracy' = [0.9]"),
    ({"accuracy": 0.5}, "accuracy 0.5 is not correct / n = 7/9"),
    ({"loss": -1.0}, "'loss' = -1.0 is not a finite number >= 0"),
    ({"loss": None}, "'loss' = None"),
    ({"n": 0, "correct": 0}, "'n' = 0 is not an integer from 1 to 1000000000"),
    ({"n": 10**30}, "'n' = 1000000000000000000000000000000 is not an integer"),
    ({"n": 9.0}, "'n' = 9.0 is not an integer"),
    ({"n": True}, "'n' = True is not an integer"),
    ({"correct": 10}, "'correct' = 10 is not an integer from 0 to 9"),
    ({"correct": -1}, "'correct' = -1 is not an integer from 0 to 9"),
    ({"extra": {"deep": [1]}}, "unknown ['extra']"),
])
def test_malformed_evaluation_is_a_protocol_error_naming_the_field(change, needle):
    with pytest.raises(ProtocolError) as err:
        reply_evaluation(ev(**{**HONEST, **change}))
    assert needle in str(err.value)


def test_missing_field_named():
    with pytest.raises(ProtocolError, match=r"missing \['accuracy'\]"):
        reply_evaluation(ev(loss=0.1, correct=1, n=2))


def test_metrics_and_refusal_reasons_are_bounded():
    with pytest.raises(ProtocolError, match="metrics must be an object"):
        reply_metrics(Message(MessageKind.TRAIN_REPLY, 1, "j", {"metrics": 3}))
    with pytest.raises(ProtocolError, match="not a finite number, boolean or short string"):
        reply_metrics(Message(MessageKind.TRAIN_REPLY, 1, "j", {"metrics": {"loss": {"a": 1}}}))
    long = error_reason(Message(MessageKind.ERROR, 1, "j", {"reason": "x" * 100_000}))
    assert len(long) == 500 and long.endswith("...")
    assert "malformed refusal" in error_reason(Message(MessageKind.ERROR, 1, "j", {"reason": {"nested": [1, 2]}}))


# -- through the round engine (real sites, in-process transport that encodes every message) ------------


@pytest.fixture(scope="module")
def heart():
    return load_heart()


class Faulty:
    def __init__(self, site, fault):
        self.site, self.site_id, self.fault = site, site.site_id, fault

    def handle(self, msg):
        reply = self.site.handle(msg)
        return self.fault(reply) if self.site_id == "hungary" and reply.kind is not MessageKind.ERROR else reply


def federation(heart, kind: Protection, fault):
    task = TaskSpec("logreg", heart.input_shape, 1, heart.schema, lr=0.05, local_steps=5, batch_size=4)
    plan = Plan(task, protection=ProtectionSpec(kind), min_sites=3)
    coord, _ = build_federation(plan, heart.sites, wrap=lambda s: Faulty(s, fault),
                                secrets={s.name: bytes([i + 1]) * 32 for i, s in enumerate(heart.sites)})
    return coord


def test_a_string_accuracy_leaves_that_site_out_of_the_evaluation(heart):
    coord = federation(heart, Protection.PLAIN, lambda m: replace(m, meta={**m.meta, "accuracy": "high"}) if m.kind is MessageKind.EVALUATE_REPLY else m)
    coord.run_round(1)
    evals = coord.evaluate(2)
    assert sorted(evals) == ["cleveland", "switzerland", "va-long-beach"]
    assert "'accuracy' = 'high' is not a finite number" in coord.eval_dropped["hungary"]
    assert all(set(e) == {"loss", "correct", "n", "accuracy", "n_by_class", "correct_by_class", "auc"} for e in evals.values())


def test_a_validation_answer_carries_the_sites_score1_threshold_only_when_asked(heart):
    """Asked for it (EvalInstructions.threshold, validation split only), a site of a binary task adds one
    number, the threshold maximising Score 1 there (insitu.learn.clinical.site_threshold of its own
    risks); an ordinary validation answer and a test-split answer never carry one."""
    from insitu.learn.clinical import model_of, risk_scores, site_threshold, threshold_from_answers

    from insitu.data.dataset import SiteData

    # heart has no validation splits: each site's test split doubles as one here
    sites = tuple(SiteData(s.name, s.X_train, s.y_train, s.X_test, s.y_test, s.X_test, s.y_test) for s in heart.sites)
    heart = replace(heart, sites=sites)
    coord = federation(heart, Protection.PLAIN, lambda m: m)
    coord.run_round(1)
    assert all("threshold" not in e for e in coord.evaluate(2, split="val").values())
    evals = coord.evaluate(2, split="val", threshold=True)
    assert sorted(evals) == sorted(s.name for s in sites)
    assert all(set(e) == {"loss", "correct", "n", "accuracy", "n_by_class", "correct_by_class", "auc", "threshold"} for e in evals.values())
    model = model_of(TaskSpec("logreg", heart.input_shape, 1, heart.schema, lr=0.05, local_steps=5, batch_size=4), coord.params)
    for s in sites:
        want = site_threshold(s.y_val.numpy().astype(int), risk_scores(model, s.X_val))
        assert evals[s.name]["threshold"] == want
    clin = threshold_from_answers(evals)
    pos = {k: e["n_by_class"][1] for k, e in evals.items() if e["threshold"] is not None}
    assert clin["pooled"]["threshold"] == pytest.approx(sum(pos[k] * evals[k]["threshold"] for k in pos) / sum(pos.values()))
    assert all("threshold" not in e for e in coord.evaluate(2, split="test").values())
    with pytest.raises(ProtocolError, match="threshold on the test split"):
        EvalInstructions.from_meta({"split": "test", "threshold": True})
    with pytest.raises(ProtocolError, match="threshold = 1 is not true or false"):
        EvalInstructions.from_meta({"split": "val", "threshold": 1})
    assert EvalInstructions.from_meta({"split": "val"}) == EvalInstructions(Split.VAL) and EvalInstructions(Split.VAL).to_meta() == {"split": "val"}


def test_integer_metrics_drop_the_site_from_a_plain_round(heart):
    coord = federation(heart, Protection.PLAIN, lambda m: replace(m, meta={**m.meta, "metrics": 7}) if m.kind is MessageKind.TRAIN_REPLY else m)
    rec = coord.run_round(1)
    assert "hungary" not in rec.participants and "metrics must be an object" in rec.dropped["hungary"]


@pytest.mark.parametrize("kind", [Protection.SECAGG, Protection.CKKS])
def test_integer_metrics_abort_a_protected_round_naming_the_site(heart, kind):
    fault = {"on": True}
    coord = federation(heart, kind, lambda m: replace(m, meta={**m.meta, "metrics": 7}) if fault["on"] and m.kind is MessageKind.TRAIN_REPLY else m)
    before = coord.params.copy()
    with pytest.raises(RoundAborted, match=r"site hungary: .*metrics must be an object.*global model is unchanged"):
        coord.run_round(1)
    np.testing.assert_array_equal(before, coord.params)
    fault["on"] = False
    assert len(coord.run_round(2).participants) == 4  # the next round runs
