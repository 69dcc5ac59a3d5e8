"""`insitu privacy ledger` shows budgets and per-round records; a missing file is a one-line error."""
from __future__ import annotations


from typer.testing import CliRunner

from insitu.cli import app
from insitu.privacy import Budget, PrivacyLedger, gaussian_round


def test_ledger_command_shows_budget_and_rounds(tmp_path):
    path = tmp_path / "l.sqlite"
    with PrivacyLedger(path) as led:
        led.set_budget("hospital-a", Budget(3.0))
        led.charge("hospital-a", "job-1", 1, gaussian_round(4.0))
        led.charge("hospital-a", "job-1", 2, gaussian_round(4.0))
        total = led.spent("hospital-a")
    res = CliRunner().invoke(app, ["privacy", "ledger", str(path)], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "hospital-a" in res.output and f"{total:.4f}" in res.output and "gaussian(z=4)" in res.output
    res = CliRunner().invoke(app, ["privacy", "ledger", str(path), "--json"])
    assert res.exit_code == 0 and '"round": 2' in res.output


def test_missing_ledger_is_an_error(tmp_path):
    res = CliRunner().invoke(app, ["privacy", "ledger", str(tmp_path / "nope.sqlite")])
    assert res.exit_code != 0
