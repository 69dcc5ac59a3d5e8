"""Operating a real consortium on 127.0.0.1 (issue 16): taking the model out, onboarding, watching.

One deployment (a coordinator and four heart-hospital processes, mutual TLS 1.3) is shared by
the module; every command runs through the `insitu` CLI with an operator.toml, as an operator would.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from typer.testing import CliRunner

from insitu.cli import app
from insitu.coordinator.jobs import JobSpec
from insitu.net import sandbox

pytestmark = pytest.mark.slow

HEART = {"name": "heart-ops", "dataset": "heart", "rounds": 3, "seed": 0, "min_sites": 4, "round_timeout": 60.0}
# rounds long enough (~0.3 s) that the status is seen mid-job
WATCHED = {**HEART, "name": "watched", "rounds": 6, "local_steps": 1500, "lr": 0.001}
THREE = {**HEART, "name": "three-left", "rounds": 1, "min_sites": 3, "approval_timeout": 5.0}  # min_sites and rounds are part of the plan
INSITU = [sys.executable, "-m", "insitu"]


def task_hash(job: dict) -> str:
    """The hash the sites approve: the job's plan's."""
    return JobSpec.from_dict(job).plan.content_hash()


def cli(*args) -> str:
    res = CliRunner().invoke(app, [str(a) for a in args])
    if res.exit_code != 0:
        raise AssertionError(f"insitu {' '.join(map(str, args))} exited {res.exit_code}: {res.output} {res.exception!r}")
    return res.output


@pytest.fixture(scope="module")
def dep(tmp_path_factory, consortium_running):
    root = tmp_path_factory.mktemp("ops-consortium")
    sb = sandbox.create(root, approved=[task_hash(HEART), task_hash(WATCHED), task_hash(THREE)])
    yield from consortium_running(sb)


def test_model_downloaded_exported_and_served_by_the_gateway(dep, tmp_path, gateway_dir, gateway_predict):
    dep.operator("submit", {"job": HEART})
    st = dep.wait_job(HEART["name"], timeout=120)
    assert st["status"] == "done", st
    run = tmp_path / "heart-run"
    out = cli("job", "model", HEART["name"], "--out", run, "--config", dep.root / "ops.toml")
    assert "model version 3" in out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["plan_hash"] == task_hash(HEART) and summary["final"]["rounds_completed"] == 3
    assert summary["final"]["mean_site_accuracy"] == pytest.approx(st["final"]["mean_site_accuracy"])
    assert sorted(summary["sites"]) == sorted(dep.sites) and all(s["n_train"] > 0 for s in summary["sites"].values())
    with np.load(run / "model.npz") as z:
        params = z["params"]
    assert params.dtype == np.float32 and params.shape == (14,)
    # the same model as the deployment's own evaluation: rebuild it and score the sites' test splits
    from insitu.compress.export import load_run_data, load_run_model

    model, task = load_run_model(run)
    assert task == JobSpec.from_dict(HEART).task
    # an existing directory is refused, nothing overwritten
    with pytest.raises(AssertionError, match="already exists"):
        cli("job", "model", HEART["name"], "--out", run, "--config", dep.root / "ops.toml")

    # insitu export takes the directory as is (it reloads the heart data from summary.json's config)
    onnx = tmp_path / "heart.onnx"
    out = cli("export", run, "--out", onnx)
    assert onnx.stat().st_size > 0 and "wrote" in out
    import onnxruntime as ort

    _, _, _, Xte, _ = load_run_data(run)
    sess = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    import torch

    with torch.no_grad():
        ref = model(Xte[:16]).numpy()
    assert np.allclose(sess.run(None, {"x": Xte[:16].numpy()})[0], ref, atol=1e-4)

    # insitu gateway serves it: a prediction from the federated model, with its model card
    cfg, port = gateway_dir(tmp_path, run, dep.ca, "gateway.ops-test")
    token = cli("gateway", "token", "--role", "ai-model", "--subject", "agent-x", "--ttl", "5m", "--config", cfg).strip()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    log = open(tmp_path / "gateway.log", "wb")
    proc = subprocess.Popen([*INSITU, "gateway", "serve", "--config", str(cfg)], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        from insitu.data.heart import FEATURES

        x = Xte[0].numpy()
        body = {"features": {f: float(v) for f, v in zip(FEATURES, x)}}
        r = gateway_predict(port, body, token, dep.root / "ca" / "ca.pem", proc, tmp_path / "gateway.log")
        assert r.status_code == 200, r.text
        pred = r.json()
        expected = float(1 / (1 + np.exp(-ref[0, 0])))
        assert pred["risk"] == pytest.approx(expected, abs=1e-5)
        card = pred["model"]
        assert card["task_hash"] == JobSpec.from_dict(HEART).task.content_hash() and card["rounds"] == 3
        assert card["plan_hash"] == JobSpec.from_dict(HEART).plan.content_hash()  # the hash the sites approved
        assert sorted(card["training_sites"]) == sorted(dep.sites) and card["strategy"] == "fedavg"
        assert card["differential_privacy"] is False
    finally:
        proc.terminate()
        proc.wait(20)


def test_model_of_unknown_job_or_job_without_rounds_refused(dep, tmp_path):
    res = CliRunner().invoke(app, ["job", "model", "no-such-job", "--out", str(tmp_path / "x"), "--config", str(dep.root / "ops.toml")])
    assert res.exit_code != 0 and "no job named 'no-such-job'" in str(res.exception)
    assert not (tmp_path / "x").exists()


def test_status_shows_eta_per_site_metrics_and_watch_follows_to_the_end(dep):
    dep.operator("submit", {"job": WATCHED})
    st = dep.wait_job("watched", rounds=2, timeout=120)
    if st["status"] == "running":
        assert st["progress"]["seconds_per_round"] > 0 and st["progress"]["eta_seconds"] is not None
        assert 0 <= st["progress"]["eta_seconds"] < 60 * st["progress"]["seconds_per_round"]
    rows = {r["site"]: r for r in st["sites"]}
    assert sorted(rows) == sorted(dep.sites) and all(r["online"] for r in rows.values())
    assert all(0 <= rows[s]["accuracy"] <= 1 and rows[s]["loss"] > 0 and rows[s]["train_loss"] > 0 for s in dep.sites)
    assert all(r["cert_not_after"] > time.time() + 300 * 86400 and time.time() - r["last_seen"] < 30 for r in rows.values())
    from rich.console import Console

    from insitu.coordinator.views import job_view

    con = Console(width=200, record=True)
    con.print(job_view(st))
    text = con.export_text()
    assert "sites (4 of 4 online)" in text and "test acc" in text and ("ETA" in text or st["status"] == "done")
    # --watch refreshes until the job ends, then leaves the final view on screen
    out = cli("job", "status", "watched", "--watch", "--interval", "0.3", "--config", dep.root / "ops.toml")
    assert "job watched: done, 6/6 rounds applied" in out and "final mean site accuracy" in out


def test_job_logs_tell_the_jobs_story(dep):
    out = cli("job", "logs", "watched", "--config", dep.root / "ops.toml")
    lines = out.splitlines()
    assert any("submitted by ops" in ln for ln in lines[:2])  # the job may start in the same millisecond
    assert "plan approved by cleveland, hungary, switzerland, va-long-beach" in out
    assert sum("applied as version" in ln for ln in lines) == 6 and "watched done" in lines[-1]
    res = json.loads(cli("job", "logs", "watched", "--json", "--config", dep.root / "ops.toml"))
    assert [e["at"] for e in res] == sorted(e["at"] for e in res)


def test_killed_site_shows_offline_with_its_reason(dep):
    """Destructive: the last test of the module."""
    before = cli("sites", "--config", dep.root / "ops.toml")
    assert "sites (4 of 4 online)" in before
    dep.kill("site-switzerland")
    deadline = time.monotonic() + 60
    while True:
        rows = {r["site"]: r for r in dep.operator("sites")["detail"]}
        if not rows["switzerland"]["online"]:
            break
        assert time.monotonic() < deadline, rows
        time.sleep(0.2)
    assert rows["switzerland"]["offline_reason"] and "channel lost" in rows["switzerland"]["offline_reason"]
    out = cli("sites", "--config", dep.root / "ops.toml")
    assert "sites (3 of 4 online)" in out and "offline" in out and "lost" in out
    listed = {r["site"]: r for r in json.loads(cli("sites", "--json", "--config", dep.root / "ops.toml"))}
    assert listed["switzerland"]["online"] is False and "channel lost" in listed["switzerland"]["offline_reason"]
    # a job run now names the missing site in its status, with the reason, instead of three sites and nothing else
    dep.operator("submit", {"job": THREE})
    st = dep.wait_job("three-left", timeout=90)
    assert st["status"] == "done" and sorted(st["rounds"][0]["participants"]) == ["cleveland", "hungary", "va-long-beach"]
    sw = next(r for r in st["sites"] if r["site"] == "switzerland")
    assert sw["online"] is False and "channel lost" in sw["offline_reason"]
