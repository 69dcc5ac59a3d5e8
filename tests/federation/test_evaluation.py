"""Evaluation answers: per-class counts and AUROC travel in the declared reply, are checked by the
coordinator, and give the worst-site, class-balanced and AUC figures (insitu.federation.evaluation)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from insitu.errors import ConfigError, ProtocolError
from insitu.federation.evaluation import Criterion, balanced_accuracy, score, summarize
from insitu.federation.messages import Message, MessageKind
from insitu.federation.transport import reply_evaluation
from insitu.learn.metrics import auroc
from insitu.learn.train import evaluate

BASE = {"loss": 0.41, "correct": 7, "n": 9, "accuracy": 7 / 9}
DETAIL = {**BASE, "n_by_class": [4, 5], "correct_by_class": [2, 5], "auc": 0.8}


def ev(**meta) -> Message:
    return Message(MessageKind.EVALUATE_REPLY, 3, "j", meta)


def test_detailed_answer_passes_and_auc_may_be_null():
    assert reply_evaluation(ev(**DETAIL)) == DETAIL
    assert reply_evaluation(ev(**{**DETAIL, "auc": None}))["auc"] is None
    assert reply_evaluation(ev(**BASE)) == BASE  # the extra fields are optional
    assert reply_evaluation(ev(**{**DETAIL, "threshold": 0.25}))["threshold"] == 0.25
    assert reply_evaluation(ev(**{**DETAIL, "threshold": None}))["threshold"] is None


@pytest.mark.parametrize("change, needle", [
    ({"n_by_class": [4, 4]}, "do not add up to n = 9"),
    ({"correct_by_class": [1, 5]}, "do not add up"),
    ({"n_by_class": [3, 6], "correct_by_class": [4, 3]}, "do not add up"),  # more correct than records of class 0
    ({"n_by_class": [9]}, "not a list of 2 to 1000 counts"),
    ({"n_by_class": [4.0, 5]}, "not a list of 2 to 1000 counts"),
    ({"n_by_class": [-1, 10]}, "not a list of 2 to 1000 counts"),
    ({"n_by_class": "4,5"}, "not a list"),
    ({"correct_by_class": [2, 5, 0]}, "do not add up"),
    ({"auc": 1.5}, "'auc' = 1.5 is not a number in [0, 1]"),
    ({"auc": float("nan")}, "'auc' = nan"),
    ({"auc": True}, "'auc' = True"),
    ({"threshold": 1.01}, "'threshold' = 1.01 is not a risk in [0, 1]"),
    ({"threshold": -0.1}, "'threshold' = -0.1 is not a risk"),
    ({"threshold": "0.3"}, "'threshold' = '0.3' is not a risk"),
    ({"threshold": False}, "'threshold' = False is not a risk"),
])
def test_malformed_detail_is_refused_naming_it(change, needle):
    with pytest.raises(ProtocolError) as err:
        reply_evaluation(ev(**{**DETAIL, **change}))
    assert needle in str(err.value)


def test_counts_come_together():
    with pytest.raises(ProtocolError, match="together"):
        reply_evaluation(ev(**{**BASE, "n_by_class": [4, 5]}))


def test_site_evaluation_counts_classes_and_scores_auc():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    X = torch.randn(40, 3)
    y = (torch.rand(40) < 0.4).float()
    res = evaluate(model, X, y, num_outputs=1, by_class=True)
    with torch.no_grad():
        logit = model(X).reshape(-1)
    pred = (logit > 0).float()
    assert res["n_by_class"] == [int((y == 0).sum()), int((y == 1).sum())]
    assert res["correct_by_class"] == [int(((pred == y) & (y == 0)).sum()), int(((pred == y) & (y == 1)).sum())]
    assert res["auc"] == pytest.approx(auroc(y.numpy().astype(int), logit.numpy()))
    one_class = evaluate(model, X, torch.zeros(40), num_outputs=1, by_class=True)
    assert one_class["auc"] is None and one_class["n_by_class"] == [40, 0]
    assert set(evaluate(model, X, y, num_outputs=1)) == {"loss", "correct", "n", "accuracy"}


def test_figures_known_answer():
    evals = {
        "a": {"n": 10, "correct": 9, "accuracy": 0.9, "n_by_class": [2, 8], "correct_by_class": [1, 8], "auc": 0.7},
        "b": {"n": 4, "correct": 2, "accuracy": 0.5, "n_by_class": [4, 0], "correct_by_class": [2, 0], "auc": None},
        "c": {"n": 6, "correct": 6, "accuracy": 1.0, "n_by_class": [3, 3], "correct_by_class": [3, 3], "auc": 0.9},
    }
    f = summarize(evals)
    assert f["accuracy"] == pytest.approx(17 / 20)
    assert f["mean_site_accuracy"] == pytest.approx((0.9 + 0.5 + 1.0) / 3)
    assert f["worst_site_accuracy"] == 0.5 and f["worst_site"] == "b"
    # union: class 0 has 9 records, 6 right; class 1 has 11, 11 right
    assert f["balanced_accuracy"] == pytest.approx((6 / 9 + 11 / 11) / 2)
    assert f["mean_site_auc"] == pytest.approx(0.8) and f["worst_site_auc"] == 0.7
    assert f["sites_without_auc"] == ["b"]
    assert score(evals, Criterion.ACCURACY) == pytest.approx(0.85)
    assert score(evals, Criterion.BALANCED_ACCURACY) == pytest.approx(f["balanced_accuracy"])


def test_balanced_selection_needs_class_counts():
    plain = {"a": dict(BASE)}
    assert math.isnan(balanced_accuracy(plain.values()))
    with pytest.raises(ConfigError, match="per-class counts"):
        score(plain, Criterion.BALANCED_ACCURACY)
    assert score(plain, Criterion.ACCURACY) == pytest.approx(7 / 9)


def test_evaluate_reply_fields_are_declared_public():
    from insitu.federation.egress import EVALUATE_REPLY, Release

    for k in ("n_by_class", "correct_by_class", "auc", "loss", "correct", "n", "accuracy"):
        assert EVALUATE_REPLY.meta[k] is Release.PUBLIC
    assert np.isfinite(DETAIL["auc"])
