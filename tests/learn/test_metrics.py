"""Clinical metrics against scikit-learn on random data, ties included."""
from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.calibration import calibration_curve
from sklearn.metrics import accuracy_score, average_precision_score, precision_recall_curve, precision_score, recall_score, roc_auc_score

from insitu.errors import DataError
from insitu.learn import metrics as M


def _cases():
    rng = np.random.default_rng(0)
    for i in range(30):
        n = int(rng.integers(5, 400))
        y = (rng.random(n) < rng.uniform(0.03, 0.5)).astype(int)
        y[rng.integers(n)] = 1
        y[rng.integers(n)] = 0 if y.sum() > 1 else y[0]
        if y.all() or not y.any():
            continue
        s = rng.random(n) + 0.8 * y * rng.random()
        if i % 3 == 0:
            s = np.round(s, 1)  # many ties
        yield y, s


CASES = list(_cases())


def test_auroc_and_auprc_match_sklearn():
    assert len(CASES) >= 25
    for y, s in CASES:
        assert M.auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
        assert M.auprc(y, s) == pytest.approx(average_precision_score(y, s), abs=1e-12)


def test_score1_and_accuracy_match_sklearn_at_a_threshold():
    for y, s in CASES:
        thr = float(np.quantile(s, 0.8))
        pred = (s >= thr).astype(int)
        se, ppv = M.sensitivity_ppv(y, s, thr)
        assert se == pytest.approx(recall_score(y, pred))
        assert ppv == pytest.approx(precision_score(y, pred, zero_division=np.nan))
        assert M.score1(y, s, thr) == pytest.approx(min(recall_score(y, pred), precision_score(y, pred)))
        assert M.accuracy(y, s, thr) == pytest.approx(accuracy_score(y, pred))


def test_best_threshold_maximises_score1_over_every_threshold():
    for y, s in CASES:
        precision, recall, thresholds = precision_recall_curve(y, s)
        best = np.max(np.minimum(precision[:-1], recall[:-1]))
        thr = M.best_threshold(y, s)
        assert M.score1(y, s, thr) == pytest.approx(best)
        assert thr in set(s.tolist())


def test_calibration_matches_sklearn():
    for y, s in CASES:
        p = s / s.max()
        freq, mean_p = calibration_curve(y, p, n_bins=10, strategy="uniform")
        mine_p, mine_f, count = M.calibration(y, p, bins=10)
        np.testing.assert_allclose(mine_p, mean_p, atol=1e-12)
        np.testing.assert_allclose(mine_f, freq, atol=1e-12)
        assert count.sum() == len(y)


def test_undefined_metrics_are_nan_and_bad_input_is_refused():
    y = np.zeros(5, dtype=int)
    assert math.isnan(M.auroc(y, np.arange(5.0))) and math.isnan(M.auprc(y, np.arange(5.0)))
    assert math.isnan(M.score1(np.array([0, 1]), np.array([0.1, 0.2]), 0.5))  # nothing predicted positive
    with pytest.raises(DataError, match="no positive record"):
        M.best_threshold(y, np.arange(5.0))
    with pytest.raises(DataError, match="differ in length"):
        M.auroc(np.array([0, 1]), np.array([0.3]))
    with pytest.raises(DataError, match="must be 0 or 1"):
        M.auroc(np.array([0, 2]), np.array([0.3, 0.4]))
    with pytest.raises(DataError, match="NaN"):
        M.auroc(np.array([0, 1]), np.array([0.3, np.nan]))


def test_clinical_metrics_bundle():
    y, s = CASES[1]
    thr = M.best_threshold(y, s)
    m = M.clinical_metrics(y, s, thr)
    assert m.n == len(y) and m.positives == int(y.sum()) and m.threshold == thr
    assert m.score1 == pytest.approx(min(m.sensitivity, m.ppv))
    assert set(m.as_dict()) >= {"auroc", "auprc", "score1", "accuracy"}
