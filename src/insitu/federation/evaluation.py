"""Figures of one federated evaluation, from the sites' evaluation answers alone.

A federated evaluation is each site's answer about one global model on one of its splits
(:meth:`insitu.federation.coordinator.Coordinator.evaluate`): loss, correct, n, accuracy, the
per-class counts and, for a binary task, the AUROC (the fields a site's egress declaration lists
for an evaluation reply).  :func:`summarize` turns those answers into what a report shows and
what model selection ranks by, without any other channel to the sites' records:

* ``accuracy``: over every record of the split (Σ correct / Σ n);
* ``balanced_accuracy``: the mean over classes of each class's recall on the union of the splits,
  i.e. accuracy re-weighted to a population in which every class is equally common.  Model
  selection ranks by it when the label mix of the population the model will serve is not public
  (the sites' validation splits follow their training mix, which is not the test population's);
* ``mean_site_accuracy`` / ``worst_site_accuracy``: each hospital's own figure, averaged and the
  lowest (a model that serves the large sites and fails a small one shows here);
* ``mean_site_auc`` / ``worst_site_auc``: the same for AUROC, over the sites whose split holds both
  classes (a one-class split has no AUROC; ``sites_without_auc`` names them).
"""
from __future__ import annotations

import enum
import math
from typing import Any, Mapping

import numpy as np

from insitu.errors import ConfigError


class Criterion(str, enum.Enum):
    """What model selection ranks rounds by, on the union of the sites' validation splits."""

    ACCURACY = "accuracy"  # every validation record weighs the same (the sites' own label mix)
    BALANCED_ACCURACY = "balanced_accuracy"  # every class weighs the same (mix of the population unknown)


def summarize(evals: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The figures of one evaluation (module docstring); NaN where a figure is undefined."""
    answered = {k: e for k, e in evals.items() if e.get("n", 0) > 0}
    n = sum(e["n"] for e in answered.values())
    correct = sum(e["correct"] for e in answered.values())
    accs = {k: float(e["accuracy"]) for k, e in answered.items()}
    aucs = {k: e["auc"] for k, e in answered.items() if e.get("auc") is not None}
    out: dict[str, Any] = {
        "accuracy": correct / n if n else math.nan,
        "mean_site_accuracy": float(np.mean(list(accs.values()))) if accs else math.nan,
        "worst_site_accuracy": min(accs.values()) if accs else math.nan,
        "worst_site": min(accs, key=accs.get) if accs else None,
        "site_accuracy": accs,
        "balanced_accuracy": balanced_accuracy(answered.values()),
        "site_auc": {k: answered[k].get("auc") for k in answered if "auc" in answered[k]},
        "mean_site_auc": float(np.mean(list(aucs.values()))) if aucs else math.nan,
        "worst_site_auc": min(aucs.values()) if aucs else math.nan,
        "sites_without_auc": sorted(k for k, e in answered.items() if "auc" in e and e["auc"] is None),
    }
    return out


def balanced_accuracy(evals: Any) -> float:
    """Mean per-class recall on the union of the answers' splits (classes no split holds are left
    out); NaN if an answer lacks per-class counts."""
    evals = list(evals)
    if not evals or any("n_by_class" not in e for e in evals):
        return math.nan
    width = max(len(e["n_by_class"]) for e in evals)
    counts, hits = np.zeros(width), np.zeros(width)
    for e in evals:
        counts[: len(e["n_by_class"])] += e["n_by_class"]
        hits[: len(e["correct_by_class"])] += e["correct_by_class"]
    present = counts > 0
    return float(np.mean(hits[present] / counts[present])) if present.any() else math.nan


def score(evals: Mapping[str, Mapping[str, Any]], criterion: Criterion) -> float:
    """The one number model selection ranks a round by."""
    figures = summarize(evals)
    key = {Criterion.ACCURACY: "accuracy", Criterion.BALANCED_ACCURACY: "balanced_accuracy"}[criterion]
    value = figures[key]
    if not math.isfinite(value):
        raise ConfigError(f"model selection by {criterion.value} needs every site's per-class counts on its validation split; "
                          f"the answers of {sorted(evals)} do not carry them")
    return value


#: the criterion each selection of the plan ranks rounds by (insitu.plan.Selection values; LAST: none)
CRITERIA = {"best-val": Criterion.ACCURACY, "best-val-balanced": Criterion.BALANCED_ACCURACY}


def criterion_of(selection: Any) -> Criterion | None:
    """The criterion of a plan's ``select`` (None for ``last``: no round is scored on validation)."""
    return CRITERIA.get(getattr(selection, "value", selection))


__all__ = ["Criterion", "CRITERIA", "criterion_of", "summarize", "balanced_accuracy", "score"]
