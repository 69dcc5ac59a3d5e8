"""`insitu simulate --dataset physionet2012` end to end, as a user runs it (a real subprocess)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from .physionet_files import write_cohort


def _simulate(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "160"}
    return subprocess.run([sys.executable, "-m", "insitu", "simulate", "--dataset", "physionet2012", *args],
                          capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.slow
def test_tiny_physionet_run_writes_clinical_metrics(tmp_path):
    data = write_cohort(tmp_path / "physionet", per_set=200)
    out = tmp_path / "run"
    res = _simulate("--data", str(data), "--rounds", "2", "--local-steps", "3", "--batch-size", "16", "--out", str(out))
    assert res.returncode == 0, res.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["model"] == "grud" and summary["config"]["partition"] == "natural"
    assert list(summary["sites"]) == ["ccu", "csru", "micu", "sicu"]
    assert {s["n_test"] for s in summary["sites"].values()} == {50}
    clin = summary["final"]["clinical"]
    assert clin["pooled"]["n"] == 200 and 0 <= clin["pooled"]["auroc"] <= 1 and 0 <= clin["pooled"]["score1"] <= 1
    assert set(clin["sites"]) == set(summary["sites"])
    assert sum(clin["calibration"]["count"]) == 200
    assert (out / "calibration.png").stat().st_size > 0 and (out / "model.npz").exists()
    assert "Score 1" in res.stdout and "AUROC" in res.stdout


def test_missing_data_folder_is_one_clear_line(tmp_path):
    res = _simulate("--data", str(tmp_path / "nowhere"), "--rounds", "1", "--out", str(tmp_path / "run"))
    assert res.returncode == 2
    assert "does not exist" in res.stderr and "set-a.tar.gz" in res.stderr and "Traceback" not in res.stderr
    res = _simulate("--rounds", "1", "--out", str(tmp_path / "run"))
    assert res.returncode == 2 and "needs --data PATH (a folder with set-a.tar.gz" in " ".join(res.stderr.split())


@pytest.mark.slow
def test_personalised_clinical_metrics_beside_the_federated_ones(tmp_path):
    """--personalize: each ICU fine-tunes the final model itself; its AUROC/AUPRC/Score 1 (threshold from
    its own validation split) are reported beside the global model's, per site."""
    data = write_cohort(tmp_path / "physionet", per_set=200)
    out = tmp_path / "run"
    res = _simulate("--data", str(data), "--rounds", "2", "--local-steps", "3", "--batch-size", "16", "--personalize", "6",
                    "--out", str(out))
    assert res.returncode == 0, res.stderr
    summary = json.loads((out / "summary.json").read_text())
    per = summary["final"]["personalized"]
    assert set(per["sites"]) == set(summary["final"]["clinical"]["sites"]) == {"ccu", "csru", "micu", "sicu"}
    for m in per["sites"].values():
        assert m["n"] == 50 and 0 <= m["auroc"] <= 1 and 0 <= m["score1"] <= 1 and m["val_best"] >= m["val_start"]
        assert m["threshold_source"] in ("site validation", "0.5 (no positive validation record)")
    assert "federated + local fine-tuning" in res.stdout
