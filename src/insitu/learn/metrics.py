"""Metrics for a rare binary outcome (in-hospital death: 5-21 % of stays), in plain numpy.

* AUROC: the probability that a random positive scores above a random negative (ties count
  half), from average ranks (Mann-Whitney U).
* AUPRC: average precision, Σₙ (Rₙ − Rₙ₋₁)·Pₙ over the distinct score thresholds, the step
  function scikit-learn's ``average_precision_score`` integrates (no interpolation).
* Score 1 of the PhysioNet/CinC Challenge 2012: min(sensitivity, positive predictive value) of
  the binary prediction ``score ≥ threshold``.  The threshold must be chosen on validation data
  (:func:`best_threshold`) and then applied, unchanged, to the test set.
* accuracy at the same threshold, and a reliability table (:func:`calibration`) for plots.

A metric that is undefined (AUROC with one class present, PPV with no positive prediction) is
NaN, never a made-up number.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from insitu.errors import DataError


def _check(y: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y).reshape(-1)
    s = np.asarray(score, dtype=np.float64).reshape(-1)
    if y.shape != s.shape:
        raise DataError(f"labels and scores differ in length: {y.shape[0]} vs {s.shape[0]}")
    if not np.all(np.isin(y, (0, 1))):
        raise DataError(f"labels must be 0 or 1; got values {np.unique(y)[:5].tolist()}")
    if not np.all(np.isfinite(s)):
        raise DataError("scores hold NaN or infinite values")
    return y.astype(bool), s


def _ranks(s: np.ndarray) -> np.ndarray:
    """1-based ranks, ties given their average rank."""
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_s)) + 1]
    ends = np.r_[starts[1:], len(s)]
    avg = (starts + ends + 1) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(len(s))
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def auroc(y: np.ndarray, score: np.ndarray) -> float:
    y, s = _check(y, score)
    pos, neg = int(y.sum()), int((~y).sum())
    if pos == 0 or neg == 0:
        return math.nan
    u = _ranks(s)[y].sum() - pos * (pos + 1) / 2.0
    return float(u / (pos * neg))


def _curve(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(thresholds descending, true positives, false positives) of ``s ≥ threshold`` at each distinct score."""
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # last index of each run of equal scores
    tp = np.cumsum(y)[last]
    fp = (last + 1) - tp
    return s[last], tp, fp


def auprc(y: np.ndarray, score: np.ndarray) -> float:
    y, s = _check(y, score)
    pos = int(y.sum())
    if pos == 0:
        return math.nan
    _, tp, fp = _curve(y, s)
    precision = tp / (tp + fp)
    recall = tp / pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def sensitivity_ppv(y: np.ndarray, score: np.ndarray, threshold: float) -> tuple[float, float]:
    y, s = _check(y, score)
    pred = s >= threshold
    tp = int(np.sum(pred & y))
    se = tp / int(y.sum()) if y.any() else math.nan
    ppv = tp / int(pred.sum()) if pred.any() else math.nan
    return se, ppv


def score1(y: np.ndarray, score: np.ndarray, threshold: float) -> float:
    """The challenge's event-1 score: min(Se, PPV) of ``score ≥ threshold``."""
    se, ppv = sensitivity_ppv(y, score, threshold)
    return min(se, ppv) if not (math.isnan(se) or math.isnan(ppv)) else math.nan


def best_threshold(y_val: np.ndarray, score_val: np.ndarray) -> float:
    """The threshold maximising Score 1 on validation data (the highest one among ties)."""
    y, s = _check(y_val, score_val)
    if not y.any():
        raise DataError("cannot choose a Score 1 threshold on validation data with no positive record")
    thr, tp, fp = _curve(y, s)
    value = np.minimum(tp / y.sum(), tp / (tp + fp))
    return float(thr[int(np.argmax(value))])


def accuracy(y: np.ndarray, score: np.ndarray, threshold: float) -> float:
    y, s = _check(y, score)
    return float(np.mean((s >= threshold) == y)) if len(y) else math.nan


def calibration(y: np.ndarray, prob: np.ndarray, bins: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean predicted probability, observed frequency, count) per non-empty equal-width bin of [0, 1]
    (bins closed on the right, the first also on the left: scikit-learn's ``calibration_curve``)."""
    y, p = _check(y, prob)
    if np.any((p < 0) | (p > 1)):
        raise DataError("calibration needs probabilities in [0, 1]")
    idx = np.searchsorted(np.linspace(0.0, 1.0, bins + 1)[1:-1], p, side="left")
    count = np.bincount(idx, minlength=bins)
    keep = count > 0
    mean_p = np.bincount(idx, weights=p, minlength=bins)[keep] / count[keep]
    freq = np.bincount(idx, weights=y.astype(float), minlength=bins)[keep] / count[keep]
    return mean_p, freq, count[keep]


@dataclass(frozen=True)
class ClinicalMetrics:
    """Discrimination and Score 1 of one model on one set of records."""

    n: int
    positives: int
    auroc: float
    auprc: float
    score1: float
    sensitivity: float
    ppv: float
    accuracy: float
    threshold: float  # chosen on validation data

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def clinical_metrics(y: np.ndarray, score: np.ndarray, threshold: float) -> ClinicalMetrics:
    """Every metric of this module, Score 1 and accuracy at ``threshold`` (chosen elsewhere, on validation data)."""
    yb, s = _check(y, score)
    se, ppv = sensitivity_ppv(yb, s, threshold)
    return ClinicalMetrics(
        n=int(len(yb)), positives=int(yb.sum()), auroc=auroc(yb, s), auprc=auprc(yb, s),
        score1=score1(yb, s, threshold), sensitivity=se, ppv=ppv, accuracy=accuracy(yb, s, threshold),
        threshold=float(threshold),
    )


__all__ = ["ClinicalMetrics", "accuracy", "auprc", "auroc", "best_threshold", "calibration", "clinical_metrics",
           "score1", "sensitivity_ppv"]
