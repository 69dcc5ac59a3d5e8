"""Clinical evaluation: thresholds come from validation splits only, per site and pooled."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from insitu.data.dataset import FederatedData, SiteData
from insitu.errors import ConfigError
from insitu.learn import metrics as M
from insitu.learn.clinical import POOLED_RULE, clinical_evaluation, pooled_threshold


class FirstFeature(nn.Module):
    """A 'model' whose logit is the record's first feature: scores known in advance."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :1]


def _site(name: str, rng: np.random.Generator, n: int = 80) -> SiteData:
    def split():
        y = (rng.random(n) < 0.25).astype(np.float32)
        y[:2] = [0, 1]
        x = (rng.normal(size=(n, 3)) + 1.5 * y[:, None]).astype(np.float32)
        return torch.from_numpy(x), torch.from_numpy(y)

    (xt, yt), (xe, ye), (xv, yv) = split(), split(), split()
    return SiteData(name, xt, yt, xe, ye, xv, yv)


def test_thresholds_come_from_validation_and_metrics_from_test():
    rng = np.random.default_rng(0)
    data = FederatedData("toy", (_site("a", rng), _site("b", rng)), (3,), 2, ("f0", "f1", "f2"))
    res = clinical_evaluation(FirstFeature(), data)
    sig = lambda t: torch.sigmoid(t[:, 0]).numpy()  # noqa: E731
    for s in data.sites:
        own = M.best_threshold(s.y_val.numpy(), sig(s.X_val))
        m = res["sites"][s.name]
        assert m["threshold"] == pytest.approx(own) and m["threshold_source"] == "site validation"
        assert m["auroc"] == pytest.approx(M.auroc(s.y_test.numpy(), sig(s.X_test)))
        assert m["score1"] == pytest.approx(M.score1(s.y_test.numpy(), sig(s.X_test), own))
    yv = np.concatenate([s.y_val.numpy() for s in data.sites])
    sv = np.concatenate([sig(s.X_val) for s in data.sites])
    # pooled: the sites' own thresholds weighted by their validation positives (what a deployed coordinator can compute)
    pos = {s.name: s.y_val.numpy().sum() for s in data.sites}
    want = sum(pos[k] * res["sites"][k]["threshold"] for k in pos) / sum(pos.values())
    assert res["pooled"]["threshold"] == pytest.approx(want) and not res["pooled"]["threshold"] == pytest.approx(M.best_threshold(yv, sv))
    assert res["pooled"]["threshold_source"] == POOLED_RULE
    assert res["validation"]["auroc"] == pytest.approx(M.auroc(yv, sv))
    assert res["pooled"]["n"] == 160 and sum(res["calibration"]["count"]) == 160
    # changing the test labels changes no threshold
    flipped = tuple(SiteData(s.name, s.X_train, s.y_train, s.X_test, 1 - s.y_test, s.X_val, s.y_val) for s in data.sites)
    res2 = clinical_evaluation(FirstFeature(), FederatedData("toy", flipped, (3,), 2, data.schema))
    assert res2["pooled"]["threshold"] == res["pooled"]["threshold"]
    assert all(res2["sites"][k]["threshold"] == res["sites"][k]["threshold"] for k in res["sites"])


def test_needs_a_binary_task_with_validation_splits():
    rng = np.random.default_rng(1)
    s = _site("a", rng)
    with pytest.raises(ConfigError, match="validation"):
        clinical_evaluation(FirstFeature(), FederatedData("toy", (SiteData("a", s.X_train, s.y_train, s.X_test, s.y_test),), (3,), 2, ("x",) * 3))
    with pytest.raises(ConfigError, match="binary"):
        clinical_evaluation(FirstFeature(), FederatedData("toy", (s,), (3,), 3, ("x",) * 3))


def test_pooled_threshold_weighs_sites_by_validation_positives():
    assert pooled_threshold({"b": (0.4, 30), "a": (0.1, 10)}) == pytest.approx((0.1 * 10 + 0.4 * 30) / 40)
    # a site without a positive validation record (no threshold) adds nothing; none at all: no threshold
    assert pooled_threshold({"a": (0.2, 5), "b": (None, 0), "c": (0.9, 0)}) == pytest.approx(0.2)
    assert pooled_threshold({"a": (None, 0)}) is None and pooled_threshold({}) is None
    # the same float whatever order the answers came in
    many = {f"s{i}": (float(np.float32(0.1 + i / 37)), i + 1) for i in range(20)}
    assert pooled_threshold(dict(reversed(list(many.items())))) == pooled_threshold(many)
