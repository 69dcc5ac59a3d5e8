"""A binary clinical model scored the way a rare outcome needs: AUROC, AUPRC and Score 1 beside
accuracy, per site and over every test record, with Score 1 thresholds taken from validation data.

Thresholds: each site's Score 1 uses the threshold that maximises Score 1 on that site's own
validation split (a site picks its own operating point without showing anyone a record).  The
pooled figure, and the threshold a served model says ``positive`` at, is :func:`pooled_threshold`
of those site thresholds: their mean weighted by each validation split's positive records.  A
deployed coordinator computes exactly this from the sites' evaluation answers on their validation
splits (each answer carries its site's threshold and per-class counts, nothing else about the
scores), so a simulated run and a deployed job of the same plan choose the same number; the
threshold maximising Score 1 on the union of the validation splits would need every validation
score to leave its site.  The test labels never choose anything.  Accuracy is reported at those
same thresholds and at 0.5.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from insitu.data.dataset import FederatedData
from insitu.errors import ConfigError
from insitu.learn import metrics as M
from insitu.learn.models import set_flat


def model_of(task: Any, params: np.ndarray) -> nn.Module:
    """The task's model (a :class:`~insitu.federation.task.TaskSpec`: built-in or specification) holding ``params``."""
    model = task.build_model()
    set_flat(model, params)
    return model


@torch.no_grad()
def risk_scores(model: nn.Module, X: torch.Tensor, batch: int = 1024) -> np.ndarray:
    """Predicted probability of the outcome for every record (the model in eval mode)."""
    model.eval()
    if X.shape[0] == 0:
        return np.zeros(0)
    return np.concatenate([torch.sigmoid(model(X[i : i + batch]).reshape(-1)).numpy() for i in range(0, X.shape[0], batch)])


def site_threshold(y: np.ndarray, s: np.ndarray) -> float | None:
    """One site's Score 1 threshold on its validation labels ``y`` and risks ``s``; None with no positive record."""
    return M.best_threshold(y, s) if len(y) and y.any() else None


#: how :func:`pooled_threshold` combines the sites' thresholds (written beside it in summaries)
POOLED_RULE = "mean of the sites' validation Score 1 thresholds weighted by their validation positives"


def pooled_threshold(sites: Mapping[str, tuple[float | None, int]]) -> float | None:
    """The pooled decision threshold from each site's (validation threshold, validation positives):
    the positives-weighted mean over the sites that have a threshold, summed in site-name order (the
    same float wherever it is computed); None when no site's validation split holds a positive."""
    num = den = 0.0
    for name in sorted(sites):
        thr, pos = sites[name]
        if thr is not None and pos > 0:
            num += float(pos) * float(thr)
            den += float(pos)
    return num / den if den > 0 else None


def threshold_from_answers(evals: Mapping[str, Mapping[str, Any]]) -> dict[str, Any] | None:
    """The served model's decision threshold from the sites' evaluation answers on their validation
    splits (each: ``threshold`` and ``n_by_class``), as :func:`clinical_evaluation` chooses it from
    the records themselves: ``{"pooled": {"threshold", "threshold_source"}, "sites": {name: {"threshold",
    "positives"}}}`` (the part of a run summary's ``final.clinical`` a deployment can know), or None
    when no answer carries a threshold."""
    sites = {name: (e.get("threshold"), int(e["n_by_class"][1])) for name, e in evals.items()
             if "threshold" in e and len(e.get("n_by_class") or ()) == 2}
    thr = pooled_threshold(sites)
    if thr is None:
        return None
    return {"pooled": {"threshold": thr, "threshold_source": POOLED_RULE},
            "sites": {name: {"threshold": t, "positives": pos} for name, (t, pos) in sorted(sites.items())}}


def clinical_evaluation(model: nn.Module, data: FederatedData) -> dict[str, Any]:
    """Metrics of ``model`` on every site's test split and on all of them (see the module docstring),
    plus its AUROC on the union of the validation splits: the figure to choose recipes by."""
    if data.num_outputs != 1:
        raise ConfigError(f"clinical metrics need a binary task (one logit); {data.name} has {data.num_classes} classes")
    if any(s.X_val is None for s in data.sites):
        raise ConfigError(f"clinical metrics choose thresholds on validation splits; {data.name} has none")
    val = {s.name: (s.y_val.numpy().astype(int), risk_scores(model, s.X_val)) for s in data.sites}
    test = {s.name: (s.y_test.numpy().astype(int), risk_scores(model, s.X_test)) for s in data.sites}
    yv = np.concatenate([v[0] for v in val.values()])
    sv = np.concatenate([v[1] for v in val.values()])
    own_thr = {name: site_threshold(*v) for name, v in val.items()}
    pooled_thr = pooled_threshold({name: (own_thr[name], int(v[0].sum())) for name, v in val.items()})
    if pooled_thr is None:
        raise ConfigError("no validation split holds a positive record; Score 1 has no threshold")
    sites: dict[str, dict[str, float]] = {}
    for name, (y, s) in test.items():
        own = own_thr[name]
        m = M.clinical_metrics(y, s, own if own is not None else pooled_thr).as_dict()
        m["threshold_source"] = "site validation" if own is not None else "pooled validation"
        m["accuracy_at_0.5"] = M.accuracy(y, s, 0.5)
        sites[name] = m
    yt = np.concatenate([t[0] for t in test.values()])
    st = np.concatenate([t[1] for t in test.values()])
    pooled = M.clinical_metrics(yt, st, pooled_thr).as_dict()
    pooled["threshold_source"] = POOLED_RULE
    pooled["accuracy_at_0.5"] = M.accuracy(yt, st, 0.5)
    mean_p, freq, count = M.calibration(yt, st, bins=10)
    aurocs = [m["auroc"] for m in sites.values() if not math.isnan(m["auroc"])]
    return {
        "validation": {"n": int(len(yv)), "auroc": M.auroc(yv, sv), "auprc": M.auprc(yv, sv), "threshold": pooled_thr},
        "pooled": pooled,
        "sites": sites,
        "mean_site_auroc": float(np.mean(aurocs)) if aurocs else math.nan,
        "calibration": {"mean_predicted": mean_p.tolist(), "observed": freq.tolist(), "count": count.tolist()},
    }


__all__ = ["POOLED_RULE", "clinical_evaluation", "model_of", "pooled_threshold", "risk_scores", "site_threshold", "threshold_from_answers"]
