"""`insitu privacy report` on a (tiny) PhysioNet 2012 GRU-D run: every attack of the report runs on
the EHR task, the reconstruction by gradient matching on the clinical series."""
from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from insitu.apps.simulate import simulate
from insitu.attacks.reconstruction import score_series
from insitu.cli import app
from insitu.data.physionet import V
from insitu.report.privacy import load_report

from data.physionet_files import write_cohort  # tests/data (tests/ is on sys.path: its packages are top-level)


def test_series_score_counts_a_recovered_record_and_not_the_guess():
    rng = np.random.default_rng(0)
    target = np.zeros((6, 3 * V))
    target[:, V:2 * V] = rng.random((6, V)) < 0.3
    target[:, :V] = np.where(target[:, V:2 * V] > 0, rng.normal(size=(6, V)), 0.0)
    guess = np.zeros_like(target)
    assert score_series(target, target, guess).success()
    near = target.copy()
    near[:, :V] += 0.05 * target[:, V:2 * V]
    assert score_series(near, target, guess).success()
    off = target.copy()
    off[0, 0] += 0.5 if target[0, V] > 0 else 0.0
    off[1, V + 1] = 1 - off[1, V + 1]  # one observation invented or missed
    assert not score_series(off, target, guess).success()
    s = score_series(guess, target, guess)
    assert not s.success() and s.rms == s.guess_rms and s.mask_accuracy == s.guess_mask_accuracy < 1.0


@pytest.mark.slow
def test_series_matching_gets_closer_than_the_guess_from_one_records_gradient():
    """The attack is real: from one record's update on a small GRU-D it recovers more of the
    record (values and observation pattern) than the population-mean guess knows."""
    import torch

    from insitu.attacks.reconstruction import MatchConfig, series_matching
    from insitu.learn.models import build_model

    T, v = 8, 4
    model = build_model("grud", (T, 3 * v), 1, seed=0)
    rng = np.random.default_rng(1)
    mask = (rng.random((T, v)) < 0.4).astype(np.float32)
    gaps = np.zeros((T, v), np.float32)
    for t in range(1, T):
        gaps[t] = 1 + (1 - mask[t - 1]) * gaps[t - 1]
    x = np.concatenate([rng.normal(size=(T, v)).astype(np.float32) * mask, mask, gaps], 1)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(model(torch.from_numpy(x)[None]).reshape(-1), torch.tensor([1.0]))
    update = -0.1 * torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))]).numpy()
    est = series_matching(update, model, (T, 3 * v), config=MatchConfig(iterations=50))
    s = score_series(est[0], x, np.zeros_like(x))
    assert s.rms < 0.6 * s.guess_rms and s.mask_accuracy > s.guess_mask_accuracy, s


@pytest.mark.slow
def test_privacy_report_runs_on_a_grud_run(tmp_path):
    data = write_cohort(tmp_path / "pn", per_set=60)
    run = tmp_path / "run"
    summary = simulate(dataset="physionet2012", data=str(data), rounds=1, local_steps=2, batch_size=16, baselines=False, out=str(run))
    res = CliRunner().invoke(app, ["privacy", "report", str(run), "--shadows", "2", "--probe-records", "4", "--iterations", "5"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "privacy · physionet2012" in res.output
    row = load_report(run / "privacy.json").rows[0]
    assert row.dataset == "physionet2012" and row.defence == "none"
    rc = row.reconstruction
    assert rc.attack == "series-matching" and rc.records == 4 and rc.views >= 1 and np.isfinite(rc.quality)
    n_train = sum(s["n_train"] for s in summary["sites"].values())
    n_test = sum(s["n_test"] for s in summary["sites"].values())
    attacks = {m.attack: m for m in row.membership}
    assert {"loss-threshold", "lira-online", "lira-offline"} <= set(attacks)
    # members: the training records, subsampled to the test records' label mix
    assert all(0 < m.n_members <= n_train and m.n_nonmembers == n_test and 0.0 <= m.auc <= 1.0 for m in attacks.values())
    assert not row.loss_equation.applicable and row.reid_before is None  # logreg-only attack; no quasi-identifiers here
    page = (run / "privacy.html").read_text()
    assert "series-matching" in page and "What left the hospitals, attacked" in page
    assert json.loads((run / "privacy.json").read_text())["rows"][0]["reconstruction"]["attack"] == "series-matching"
