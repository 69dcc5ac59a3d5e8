"""A binary clinical model scored the way a rare outcome needs: AUROC, AUPRC and Score 1 beside
accuracy, per site and over every test record, with Score 1 thresholds taken from validation data.

Thresholds: each site's Score 1 uses the threshold that maximises Score 1 on that site's own
validation split (a site picks its own operating point without showing anyone a record); the
pooled figure uses the threshold that maximises it on the union of the validation splits.  The
test labels never choose anything.  Accuracy is reported at those same thresholds and at 0.5.
"""
from __future__ import annotations

import math
from typing import Any

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


def _threshold(y: np.ndarray, s: np.ndarray) -> float | None:
    return M.best_threshold(y, s) if len(y) and y.any() else None


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
    pooled_thr = _threshold(yv, sv)
    if pooled_thr is None:
        raise ConfigError("no validation split holds a positive record; Score 1 has no threshold")
    sites: dict[str, dict[str, float]] = {}
    for name, (y, s) in test.items():
        own = _threshold(*val[name])
        m = M.clinical_metrics(y, s, own if own is not None else pooled_thr).as_dict()
        m["threshold_source"] = "site validation" if own is not None else "pooled validation"
        m["accuracy_at_0.5"] = M.accuracy(y, s, 0.5)
        sites[name] = m
    yt = np.concatenate([t[0] for t in test.values()])
    st = np.concatenate([t[1] for t in test.values()])
    pooled = M.clinical_metrics(yt, st, pooled_thr).as_dict()
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


__all__ = ["clinical_evaluation", "model_of", "risk_scores"]
