"""The run directory written from a coordinator's model answer: checked before anything is renamed into place."""
from __future__ import annotations

import json

import numpy as np
import pytest

from insitu.coordinator.jobs import JobSpec
from insitu.coordinator.publish import model_summary, params_digest, write_run_dir
from insitu.coordinator.store import JobStore
from insitu.errors import ConfigError, ProtocolError

JOB = {"name": "h", "dataset": "heart", "rounds": 2}


def _answer(tmp_path):
    spec = JobSpec.from_dict(JOB)
    store = JobStore(tmp_path / "c.db")
    store.add_job("h", spec.to_dict(), spec.plan.content_hash(), 2, "ops")
    params = np.arange(14, dtype=np.float32) / 10
    r = store.begin_round("h")
    ev = {"mean_site_accuracy": 0.7, "pooled_accuracy": 0.71, "site_accuracy": {"a": 0.6, "b": 0.8}}
    store.apply_round("h", r, expected_version=0, params=params, state={}, participants=("a", "b"), dropped={},
                      metrics={"a": {"epsilon_total": 0.5}, "b": {"epsilon_total": 0.9}}, evaluation=ev, seconds=0.1)
    row = store.job("h")
    summary = model_summary(row.public(), row.spec, store.rounds("h"), 1, r, params, {"a": {"n_train": 10, "delta": 1e-5}})
    return {"summary": summary, "rounds": store.rounds("h")}, {"params": params}


def test_summary_of_a_running_job_uses_its_newest_scored_round(tmp_path):
    result, _ = _answer(tmp_path)
    s = result["summary"]
    assert s["job_status"] == "queued" and s["final"]["mean_site_accuracy"] == 0.7 and s["final"]["rounds_completed"] == 1
    assert s["sites"] == {"a": {"rounds_joined": 1, "n_train": 10}, "b": {"rounds_joined": 1}}
    assert s["final"]["epsilon"] == 0.9 and s["final"]["epsilon_per_site"] == {"a": 0.5, "b": 0.9} and s["final"]["delta"] == 1e-5
    assert s["config"]["dataset"] == "heart"


def test_written_directory_is_what_simulate_writes(tmp_path):
    result, tensors = _answer(tmp_path)
    out = write_run_dir(tmp_path / "run", result, tensors)
    assert sorted(p.name for p in out.iterdir()) == ["model.npz", "plan.json", "rounds.jsonl", "summary.json", "task.json"]
    with np.load(out / "model.npz") as z:
        assert np.array_equal(z["params"], tensors["params"])
    from insitu.federation.task import TaskSpec
    from insitu.plan import Plan

    plan = Plan.from_meta(json.loads((out / "plan.json").read_text()))
    assert plan.content_hash() == result["summary"]["plan_hash"] == JobSpec.from_dict(JOB).plan.content_hash()
    assert TaskSpec.from_meta(json.loads((out / "task.json").read_text())) == plan.task
    with pytest.raises(ConfigError, match="already exists"):
        write_run_dir(out, result, tensors)


def test_tampered_parameters_or_task_refused_and_nothing_written(tmp_path):
    result, tensors = _answer(tmp_path)
    bad = {"params": tensors["params"] + np.float32(1e-3)}
    with pytest.raises(ProtocolError, match="SHA-256"):
        write_run_dir(tmp_path / "run", result, bad)
    other = json.loads(json.dumps(result))
    other["summary"]["plan"]["task"]["lr"] = 0.5
    with pytest.raises(ProtocolError, match="hashes to"):
        write_run_dir(tmp_path / "run", other, tensors)
    other = json.loads(json.dumps(result))
    other["summary"]["task"]["lr"] = 0.5  # task.json would not be the approved plan's task
    with pytest.raises(ProtocolError, match="not its plan's task"):
        write_run_dir(tmp_path / "run", other, tensors)
    assert not (tmp_path / "run").exists() and not (tmp_path / "run.partial").exists()
    assert params_digest(tensors["params"]) == result["summary"]["params_sha256"]


def test_a_done_jobs_validation_threshold_reaches_the_summary_and_the_gateway_card(tmp_path):
    """The decision threshold the coordinator chose from the sites' validation answers (final.clinical) is
    written where simulate writes it, so the gateway serving the downloaded model says positive there."""
    from insitu.coordinator.store import JobStatus
    from insitu.gateway.model import ServedModel

    result, tensors = _answer(tmp_path)
    store = JobStore(tmp_path / "c.db")
    clinical = {"pooled": {"threshold": 0.23, "threshold_source": "rule"}, "sites": {"a": {"threshold": 0.2, "positives": 3}}}
    store.set_status("h", JobStatus.DONE, final={"mean_site_accuracy": 0.7, "rounds_applied": 1, "clinical": clinical})
    row = store.job("h")
    params = tensors["params"]
    summary = model_summary(row.public(), row.spec, store.rounds("h"), 1, 1, params, {})
    assert summary["final"]["clinical"] == clinical
    out = write_run_dir(tmp_path / "run", {"summary": summary, "rounds": store.rounds("h")}, tensors)
    assert ServedModel.load(out).card.threshold == 0.23
    # a running job's summary (no final record yet) carries none: the card says 0.5
    assert "clinical" not in result["summary"]["final"] and ServedModel.load(write_run_dir(tmp_path / "r2", result, tensors)).card.threshold == 0.5
