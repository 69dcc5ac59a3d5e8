"""`insitu privacy report` on real (tiny) heart runs: the table says what the defence bought."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from insitu.cli import app
from insitu.errors import ConfigError, DataError
from insitu.apps.simulate import simulate
from insitu.report.privacy import (CompareConfig, PrivacyReport, attack_run, compare, compare_configs, heart_reidentification, load_report, markdown_table,
                                   mean_row, merge_reports, verdicts)

TINY = dict(dataset="heart", rounds=2, local_steps=5, baselines=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    simulate(**TINY, out=str(root / "none"))
    simulate(**TINY, secure_aggregation=True, out=str(root / "secagg"))
    simulate(**TINY, secure_aggregation=True, dp="record", epsilon=1.0, out=str(root / "secagg-dp"))
    simulate(**TINY, dp="record", epsilon=1.0, insecure_replayable_randomness=True, out=str(root / "replayable"))
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
    # plain and no DP: the exact training losses are public by the plan, and they alone give every record
    le = saved.rows[0].loss_equation
    assert le.losses_left and le.success_rate == 1.0 and le.records == 32 and le.rms_error < 1e-4
    # the evaluation contract holds whatever the plan; without it the oracle takes every (age, label) pair
    o = saved.rows[0].oracle
    assert o.feature == "age" and o.recovered == 0 and o.refused and o.pre_contract_recovered == o.pairs == 254
    assert saved.rows[0].sampling is None
    assert "Training losses: each hospital's exact loss left" in res.output
    assert "What left the hospitals, attacked" in page and "gave away 254 of 254" in page


def test_secure_aggregation_run_defeats_the_coordinator_but_not_the_outsider(runs):
    row = attack_run(runs / "secagg", shadows=0)
    assert row.defence == "secure aggregation" and row.epsilon is None
    assert row.reconstruction.success_rate == 0.0
    assert row.reconstruction.quality > 0.5 * row.reconstruction.guess_quality
    assert row.undefended_reconstruction == 1.0  # the same probe without the masks
    le = row.loss_equation
    assert le.losses_received == 0 and le.success_rate == 0.0 and le.undefended_success_rate == 1.0
    assert le.rms_error == pytest.approx(le.guess_rms_error)
    said = [v.sentence for v in verdicts(row)]
    assert any(s.startswith("Training losses: none left the hospitals; the loss-equation attack had nothing to work with") for s in said)
    assert any(s.startswith("Model updates: masked by secure aggregation; ") and "no record" in s for s in said)
    assert [m.attack for m in row.membership] == ["loss-threshold"]
    table = markdown_table(merge_reports([PrivacyReport((row,)), PrivacyReport((row,))]))
    assert "| secure aggregation | ∞ |" in table and "(+0.000)" in table


def test_deid_policy_takes_heart_linkage_from_almost_all_to_almost_none():
    risk = heart_reidentification()
    assert risk.before.rate > 0.9
    assert risk.after.rate < 0.02
    assert risk.suppressed <= 0.05 * risk.before.n_released


def test_secure_aggregation_with_record_dp_at_eps1_stops_the_coordinator_everywhere(runs):
    row = attack_run(runs / "secagg-dp", shadows=0, probe_records=8)
    assert row.defence == "record-level DP + secure aggregation"
    assert row.reconstruction.success_rate == 0.0 and row.loss_equation.success_rate == 0.0 and row.loss_equation.losses_received == 0
    assert row.oracle.recovered == 0 and row.oracle.pre_contract_recovered == row.oracle.pairs
    sf = row.sampling
    assert sf.private_randomness and sf.effective_epsilon == pytest.approx(row.epsilon, rel=1e-6)
    assert sf.known_sampling_epsilon > 2 * sf.declared_epsilon  # what the coordinator would face if it knew the batches


def test_a_replayable_dp_run_loses_amplification_by_sampling(runs):
    row = attack_run(runs / "replayable", shadows=0, probe_records=4)
    assert row.defence == "record-level DP (replayable randomness: not private)"
    sf = row.sampling
    assert not sf.private_randomness and sf.effective_epsilon == sf.known_sampling_epsilon > 2 * sf.declared_epsilon
    assert sf.declared_epsilon <= 1.0 + 1e-6
    said = " ".join(v.sentence for v in verdicts(row))
    assert "amplification by sampling does not hold" in said and f"not the declared {sf.declared_epsilon:.2f}" in said
    assert "known-sampling ε" in markdown_table(PrivacyReport((row,)))


def test_compare_runs_every_defence():
    names = [n for n, _ in compare_configs(CompareConfig(epsilons=(8.0, 1.0)))]
    assert names == ["none", "dp-eps8", "dp-eps1", "secagg", "he-paillier", "secagg-dp-eps1", "dp-eps1-replayable"]
    combined = dict(compare_configs(CompareConfig(epsilons=(8.0,))))["secagg-dp-eps1"]
    assert combined["secure_aggregation"] and combined["dp"] == "record" and combined["epsilon"] == 1.0
    assert dict(compare_configs(CompareConfig()))["dp-eps1-replayable"]["insecure_replayable_randomness"] is True
    names = [n for n, _ in compare_configs(CompareConfig(epsilons=(8.0,), combined_epsilon=None))]
    assert names == ["none", "dp-eps8", "secagg", "he-paillier"]
    cnn = dict(compare_configs(CompareConfig(dataset="pneumoniamnist", data="x.npz", epsilons=())))
    assert cnn["he-ckks"]["homomorphic"] == "ckks"


def test_mean_over_seeds_averages_every_figure_and_keeps_each_seed(runs, tmp_path):
    simulate(**TINY, seed=1, out=str(tmp_path / "none"))
    side: dict = {}  # as compare does: the pre-contract oracle is measured once for the same test splits
    a = attack_run(runs / "none", shadows=0, probe_records=4, seed=0, side_cache=side)
    b = attack_run(tmp_path / "none", shadows=0, probe_records=4, seed=1, side_cache=side)
    row = mean_row([a, b])
    m = row.membership[0]
    assert row.seeds == 2 and m.per_seed == (a.membership[0].auc, b.membership[0].auc)
    assert m.auc == pytest.approx((a.membership[0].auc + b.membership[0].auc) / 2)
    assert m.auc_low < m.auc < m.auc_high or a.membership[0].auc == b.membership[0].auc
    assert row.accuracy == pytest.approx((a.accuracy + b.accuracy) / 2)
    assert row.reconstruction.records == a.reconstruction.records + b.reconstruction.records
    assert len(side["oracle"]) == 1  # heart's natural split: the same test records for both seeds
    assert row.loss_equation.records == 8 and row.loss_equation.success_rate == 1.0
    assert row.oracle.pairs == 2 * 254 and row.oracle.pre_contract_recovered == 2 * 254 and row.oracle.recovered == 0
    assert "mean of 2 seeds" in markdown_table(PrivacyReport((row,)))
    secagg = attack_run(runs / "secagg", shadows=0, probe_records=4, side_cache=side)
    with pytest.raises(DataError, match="different defences"):
        mean_row([a, secagg])


def test_compare_refuses_zero_seeds(tmp_path):
    with pytest.raises(ConfigError, match="--seeds must be at least 1, got 0"):
        compare(CompareConfig(seeds=0, out=str(tmp_path / "c")))


def test_report_refuses_a_directory_that_is_not_a_run(tmp_path):
    with pytest.raises(DataError, match="not a finished run"):
        attack_run(tmp_path)
