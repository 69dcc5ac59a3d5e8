"""Onboarding without friction: short task ids the admin can approve, pending lists that shrink, job names reused."""
from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from insitu.coordinator.jobs import JobSpec
from insitu.coordinator.store import JobStatus, JobStore
from insitu.errors import ConfigError
from insitu.site.policy import Approvals


def plan(**kw):
    return JobSpec.from_dict({"name": "p", "dataset": "heart", "lr": 0.05, **kw}).plan


TASK = plan()


def test_prefix_resolves_only_when_unambiguous(tmp_path):
    ap = Approvals(tmp_path)
    a, b = TASK, plan(lr=0.06)
    ap.remember_refused(a, "not approved", count=False, job="j1")
    ap.remember_refused(b, "not approved")
    ha, hb = a.content_hash(), b.content_hash()
    assert ap.pending()[ha]["count"] == 0 and ap.pending()[ha]["job"] == "j1" and ap.pending()[hb]["count"] == 1
    assert ap.resolve(ha[:12]) == ha and ap.resolve(ha.upper()[:8]) == ha and ap.resolve(ha) == ha
    common = next(i for i in range(64) if ha[i] != hb[i])
    if common >= 6:  # a prefix both share is refused, naming both
        with pytest.raises(ConfigError, match="matches 2 tasks"):
            ap.resolve(ha[:common])
    with pytest.raises(ConfigError, match="at least 6 hex digits"):
        ap.resolve(ha[:5])
    with pytest.raises(ConfigError, match="no task this site has seen"):
        ap.resolve("0123456789ab" if not ha.startswith("0123456789ab") else "ba9876543210")
    assert set(ap.waiting()) == {ha, hb}
    ap.approve(ap.resolve(ha[:10]))
    assert set(ap.waiting()) == {hb}  # an approved task leaves the list


def _site_config(tmp_path):
    from insitu.kit import write_kit

    kit = write_kit(tmp_path / "kit", ["cleveland"])
    return kit.sites["cleveland"]


def test_site_pending_and_approve_by_the_id_it_shows(tmp_path):
    from insitu.cli import app
    from insitu.site.policy import SitePolicy

    cfg = _site_config(tmp_path)
    policy = SitePolicy.load(cfg)
    ap = Approvals(policy.state)
    ap.remember_refused(TASK, "task not approved at this site", count=False, job="heart-x")
    h = TASK.content_hash()
    runner = CliRunner()
    res = runner.invoke(app, ["site", "pending", "--config", str(cfg)])
    assert res.exit_code == 0, res.output
    assert f"plan {h[:12]}" in res.output and h not in res.output  # a narrow terminal: a line per field, nothing cut
    assert "job:" in res.output and "heart-x" in res.output and "task not approved at this site" in res.output
    assert "fedavg" in res.output and "plain" in res.output  # the plan's strategy and protection are shown
    wide = runner.invoke(app, ["site", "pending", "--config", str(cfg), "--wide"])
    assert h in wide.output
    js = runner.invoke(app, ["site", "pending", "--config", str(cfg), "--json"])
    assert h in json.loads(js.output)
    res = runner.invoke(app, ["site", "approve", h[:12], "--config", str(cfg)])
    assert res.exit_code == 0 and h in res.output
    ap.check(TASK)
    assert "no plan is waiting" in runner.invoke(app, ["site", "pending", "--config", str(cfg)]).output


def test_job_name_free_again_once_ended_and_round_numbers_go_on(tmp_path):
    store = JobStore(tmp_path / "c.db")
    store.add_job("h", {"x": 1}, "t" * 64, 2, "ops")
    with pytest.raises(ConfigError, match="is queued; choose another name, or cancel it first"):
        store.add_job("h", {"x": 2}, "t" * 64, 2, "ops")
    for _ in range(2):
        r = store.begin_round("h")
    store.apply_round("h", r, expected_version=0, params=np.zeros(3, np.float32), state={}, participants=("a",), dropped={},
                      metrics={}, evaluation=None, seconds=0.1)
    store.set_status("h", JobStatus.DONE)
    new = store.add_job("h", {"x": 2}, "u" * 64, 3, "ops")
    assert new.status is JobStatus.QUEUED and new.next_round == 3 and new.rounds_applied == 0
    assert store.latest_model("h") is None  # the new job starts from scratch
    old = store.job("h~1")
    assert old.spec == {"x": 1} and old.status is JobStatus.DONE and old.rounds_applied == 1
    assert [x["round"] for x in store.rounds("h~1")] == [1, 2] and store.latest_model("h~1")[1] == 2
    assert store.begin_round("h") == 3  # a site never sees round 1 or 2 of job "h" again
    store.cancel("h")
    store.add_job("h", {"x": 3}, "v" * 64, 1, "ops")
    assert store.job("h~2").spec == {"x": 2} and store.job("h").next_round == 4


def test_site_refuse_takes_a_task_off_the_list_with_its_reason(tmp_path):
    from insitu.cli import app
    from insitu.errors import TaskNotApproved
    from insitu.site.policy import SitePolicy

    cfg = _site_config(tmp_path)
    ap = Approvals(SitePolicy.load(cfg).state)
    ap.remember_refused(TASK, "not approved", count=False, job="j")
    h = TASK.content_hash()
    res = CliRunner().invoke(app, ["site", "refuse", h[:8], "--reason", "schema not reviewed", "--config", str(cfg)])
    assert res.exit_code == 0 and h in res.output
    assert ap.waiting() == {} and ap.refused()[h]["reason"] == "schema not reviewed"
    with pytest.raises(TaskNotApproved, match="refused by this site's admin: schema not reviewed"):
        ap.check(TASK)
    ap.approve(h)  # approving undoes the refusal
    ap.check(TASK)
    assert ap.refused() == {}
