"""The default demo's numbers do not depend on how fast they are computed: ``insitu simulate`` with the
logistic regression's direct gradient (insitu.learn.train._logistic_gradient) and the baselines that
skip their loss gives exactly what autograd everywhere gives, for the same seed and site secrets:
every figure of the table (federated, local-only, pooled), every round of rounds.jsonl and the model's bits."""
from __future__ import annotations

import json

import numpy as np
import pytest

SECRETS = {s: bytes([i + 1]) * 32 for i, s in enumerate(("cleveland", "hungary", "switzerland", "va-long-beach"))}


def _strip(o):
    if isinstance(o, dict):
        return {k: _strip(v) for k, v in o.items() if k not in ("seconds", "wall_seconds", "run_dir", "out")}
    if isinstance(o, list):
        return [_strip(v) for v in o]
    return o


def _run(out):
    from insitu.apps.simulate import simulate

    s = simulate(seed=0, out=str(out), progress=False, site_secrets=SECRETS)
    rounds = [_strip(json.loads(x)) for x in (out / "rounds.jsonl").read_text().splitlines()]
    return _strip(s["final"]), s["baselines"], rounds, np.load(out / "model.npz")["params"]


@pytest.mark.slow  # two whole default demos (~4 s on an idle machine)
def test_default_demo_is_bit_identical_to_autograd(tmp_path, monkeypatch):
    import insitu.learn.train as train

    fast = _run(tmp_path / "fast")
    monkeypatch.setattr(train, "_logistic_gradient", lambda *a, **k: None)  # every step through autograd
    slow = _run(tmp_path / "autograd")
    assert fast[0] == slow[0] and fast[1] == slow[1] and fast[2] == slow[2]
    assert fast[3].tobytes() == slow[3].tobytes()
    assert len(fast[2]) == 30 and set(fast[1]) == {"local_only", "pooled"}  # the whole default demo, baselines on
    assert all(np.isfinite(r["sites"]["cleveland"]["train_loss"]) for r in fast[2])  # the sites' losses are reported
