"""Site rules: approvals by content hash with hyper-parameter ranges, limits, group size, budget."""
from __future__ import annotations

from dataclasses import replace

import pytest

from insitu.errors import ConfigError, PolicyViolation, TaskNotApproved
from insitu.federation.task import TaskSpec
from insitu.plan import Plan, StrategySpec
from insitu.site.policy import Approvals, Range, SitePolicy, check_group, check_ranges

TASK = Plan(TaskSpec(model="logreg", input_shape=(13,), num_outputs=1, schema=tuple(f"f{i}" for i in range(13)), lr=0.05, local_steps=50, batch_size=4))


def test_exact_hash_approval(tmp_path):
    ap = Approvals(tmp_path)
    with pytest.raises(TaskNotApproved, match="not approved"):
        ap.check(TASK)
    ap.remember_refused(TASK, "not approved")
    ap.approve(TASK.content_hash())
    ap.check(TASK)
    with pytest.raises(TaskNotApproved):
        ap.check(TASK.with_task(lr=0.06))  # any change is a different task


def test_range_approval_accepts_only_hyper_parameters_within_range(tmp_path):
    ap = Approvals(tmp_path)
    ap.remember_refused(TASK, "x")  # the site has seen the spec; the admin approves it with a range
    ap.approve(TASK.content_hash(), {"lr": Range.parse("lr", "0.01:0.1"), "local_steps": Range.parse("local_steps", [10, 100])})
    ap.check(TASK.with_task(lr=0.09, local_steps=20))
    with pytest.raises(TaskNotApproved):
        ap.check(TASK.with_task(lr=0.2))
    with pytest.raises(TaskNotApproved):
        ap.check(TASK.with_task(batch_size=8))  # not opened to a range
    with pytest.raises(TaskNotApproved):
        ap.check(TASK.with_task(model="mlp"))  # model is never a range
    with pytest.raises(TaskNotApproved):
        ap.check(replace(TASK, rounds=31))  # nor is anything else of the plan
    with pytest.raises(ConfigError, match="no range can be set"):
        Range.parse("model", "0:1")
    with pytest.raises(ConfigError, match="not a task content hash"):
        ap.approve("abc")


def test_fedprox_mu_may_be_opened_to_a_range():
    prox = replace(TASK, strategy=StrategySpec("fedprox", mu=0.01))
    check_ranges(prox, {"mu": Range(0.0, 0.1)})
    with pytest.raises(TaskNotApproved, match="mu = 1.0 is outside"):
        check_ranges(replace(prox, strategy=StrategySpec("fedprox", mu=1.0)), {"mu": Range(0.0, 0.1)})


def test_site_limits_and_secure_aggregation_group():
    check_ranges(TASK, {"local_steps": Range(1, 100)})
    with pytest.raises(TaskNotApproved, match="outside this site's allowed range"):
        check_ranges(TASK, {"local_steps": Range(1, 10)})
    check_group("plain", 4, 0)
    check_group("secagg", 4, 3)
    with pytest.raises(PolicyViolation, match="effective group of 1"):
        check_group("plain", 4, 3)
    with pytest.raises(PolicyViolation):
        check_group("secagg", 2, 3)


def test_site_config_errors(tmp_path):
    p = tmp_path / "site.toml"
    p.write_text('[site]\ncoordinator = "localhost"\ncert="a"\nkey="b"\nca="c"\n')
    with pytest.raises(ConfigError, match="HOST:PORT"):
        SitePolicy.load(p)
    p.write_text('[site]\ncoordinator = "127.0.0.1:1"\ncert="a"\nkey="b"\nca="c"\n[policy]\nepsilon_budget = -1\n')
    with pytest.raises(ConfigError, match="epsilon_budget"):
        SitePolicy.load(p)
    p.write_text('[site]\ncoordinator = "127.0.0.1:1"\ncert="a"\nkey="b"\nca="c"\n[policy]\nepsilon_budget = 1\ndelta = 0.5e1\n')
    with pytest.raises(ConfigError, match=r"delta must be in \(0, 1\), got 5.0"):
        SitePolicy.load(p)
