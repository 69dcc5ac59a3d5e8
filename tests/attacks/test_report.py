"""`insitu privacy report` on real (tiny) heart runs: the table says what the defence bought."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from insitu.cli import app
from insitu.errors import ConfigError, DataError
from insitu.apps.simulate import simulate
from insitu.report.privacy import CompareConfig, PrivacyReport, attack_run, compare, compare_configs, heart_reidentification, load_report, markdown_table, mean_row, merge_reports

TINY = dict(dataset="heart", rounds=2, local_steps=5, baselines=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    simulate(**TINY, out=str(root / "none"))
    simulate(**TINY, secure_aggregation=True, out=str(root / "secagg"))
    return root


def test_report_cli_on_an_undefended_run(runs):
    res = CliRunner().invoke(app, ["privacy", "report", str(runs / "none"), "--shadows", "2"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "privacy · heart" in res.output
    page = (runs / "none" / "privacy.html").read_text()
    assert "100.0% exact" in page  # every single-record update reconstructed
    assert "lira-online" in page and "data:image/png;base64," in page
    saved = load_report(runs / "none" / "privacy.json")
    assert saved.rows[0].defence == "none" and saved.rows[0].reconstruction.success_rate == 1.0
    assert saved.rows[0].reconstruction.records == 32  # 8 probe rounds of the run's 4 sites


def test_secure_aggregation_run_defeats_the_coordinator_but_not_the_outsider(runs):
    row = attack_run(runs / "secagg", shadows=0)
    assert row.defence == "secure aggregation" and row.epsilon is None
    assert row.reconstruction.success_rate == 0.0
    assert row.reconstruction.quality > 0.5 * row.reconstruction.guess_quality
    assert [m.attack for m in row.membership] == ["loss-threshold"]
    table = markdown_table(merge_reports([PrivacyReport((row,)), PrivacyReport((row,))]))
    assert "| secure aggregation | ∞ |" in table and "(+0.000)" in table


def test_deid_policy_takes_heart_linkage_from_almost_all_to_almost_none():
    risk = heart_reidentification()
    assert risk.before.rate > 0.9
    assert risk.after.rate < 0.02
    assert risk.suppressed <= 0.05 * risk.before.n_released


def test_compare_runs_every_defence():
    names = [n for n, _ in compare_configs(CompareConfig(epsilons=(8.0, 1.0)))]
    assert names == ["none", "dp-eps8", "dp-eps1", "secagg", "he-paillier"]
    cnn = dict(compare_configs(CompareConfig(dataset="pneumoniamnist", data="x.npz", epsilons=())))
    assert cnn["he-ckks"]["homomorphic"] == "ckks"


def test_mean_over_seeds_averages_every_figure_and_keeps_each_seed(runs, tmp_path):
    simulate(**TINY, seed=1, out=str(tmp_path / "none"))
    a = attack_run(runs / "none", shadows=0, probe_records=4, seed=0)
    b = attack_run(tmp_path / "none", shadows=0, probe_records=4, seed=1)
    row = mean_row([a, b])
    m = row.membership[0]
    assert row.seeds == 2 and m.per_seed == (a.membership[0].auc, b.membership[0].auc)
    assert m.auc == pytest.approx((a.membership[0].auc + b.membership[0].auc) / 2)
    assert m.auc_low < m.auc < m.auc_high or a.membership[0].auc == b.membership[0].auc
    assert row.accuracy == pytest.approx((a.accuracy + b.accuracy) / 2)
    assert row.reconstruction.records == a.reconstruction.records + b.reconstruction.records
    assert "mean of 2 seeds" in markdown_table(PrivacyReport((row,)))
    secagg = attack_run(runs / "secagg", shadows=0, probe_records=4)
    with pytest.raises(DataError, match="different defences"):
        mean_row([a, secagg])


def test_compare_refuses_zero_seeds(tmp_path):
    with pytest.raises(ConfigError, match="--seeds must be at least 1, got 0"):
        compare(CompareConfig(seeds=0, out=str(tmp_path / "c")))


def test_report_refuses_a_directory_that_is_not_a_run(tmp_path):
    with pytest.raises(DataError, match="not a finished run"):
        attack_run(tmp_path)
