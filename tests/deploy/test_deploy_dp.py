"""Record-level DP in a real deployment: each hospital process accounts its own ε and stops itself.

Three heart hospitals with privacy budgets, a coordinator, mutual TLS on 127.0.0.1.  The job's
[dp] table puts the noise into the task (and its hash); every site derives its own sampling
rate, charges its own SQLite ledger before training and refuses the round that would pass its
budget; the coordinator never supplies an ε figure.
"""
from __future__ import annotations

import pytest

from insitu.coordinator.jobs import JobSpec
from insitu.net import sandbox
from insitu.privacy import PrivacyLedger

pytestmark = pytest.mark.slow

SITES = ("cleveland", "hungary", "va-long-beach")
DP_JOB = {"name": "heart-dp", "dataset": "heart", "rounds": 4, "seed": 0, "min_sites": 2, "round_timeout": 60.0,
          "dp": "record", "noise_multiplier": 1.5, "clip": 1.0, "batch_size": 4, "local_steps": 50, "lr": 0.01}
PLAIN_JOB = {"name": "heart-plain", "dataset": "heart", "rounds": 1, "seed": 0, "min_sites": 2, "round_timeout": 60.0,
             "max_aborted": 0, "wait_for_sites": 5.0}
# σ = 1.5, batch 4, 50 steps a round: va-long-beach (85 records, q = 0.047) spends ε 1.14, 1.57,
# 1.91 after rounds 1-3 at δ = 1e-5, so a limit of 1.7 lets it take part in two rounds
BUDGETS = {"cleveland": 3.0, "hungary": 3.0, "va-long-beach": 1.7}


@pytest.fixture(scope="module")
def dep(tmp_path_factory, consortium_running):
    root = tmp_path_factory.mktemp("dp-consortium")
    approved = [JobSpec.from_dict(j).plan.content_hash() for j in (DP_JOB, PLAIN_JOB)]
    sb = sandbox.create(root, SITES, approved=approved)
    for s in SITES:
        sb.write_site_config(s, approved=approved, policy={"epsilon_budget": BUDGETS[s], "delta": 1e-5})
    yield from consortium_running(sb)


def test_each_site_enforces_its_own_budget(dep):
    dep.operator("submit", {"job": DP_JOB})
    st = dep.wait_job("heart-dp", timeout=120)
    assert st["status"] == "done", st
    rounds = st["rounds"]
    assert [r["status"] for r in rounds] == ["applied"] * 4, rounds
    assert [sorted(r["participants"]) for r in rounds[:2]] == [sorted(SITES)] * 2
    # the operator sees each site's own ε in the job status
    assert sorted(rounds[1]["epsilon"]) == sorted(SITES) and rounds[1]["epsilon"]["va-long-beach"] == pytest.approx(1.567, abs=0.01)
    assert "va-long-beach" not in rounds[2]["epsilon"] and rounds[3]["epsilon"]["cleveland"] <= BUDGETS["cleveland"]
    for r in rounds[2:]:
        assert sorted(r["participants"]) == ["cleveland", "hungary"]
        why = r["dropped"]["va-long-beach"]
        assert "would spend" in why and "limit 1.7 at δ=1e-05" in why, why
    # each site's ledger holds exactly the rounds it trained, and stays within its limit
    for s in SITES:
        ledger = PrivacyLedger(dep.root / "sites" / s / "state" / "privacy_ledger.sqlite")
        recs = ledger.records(s)
        assert len(recs) == (2 if s == "va-long-beach" else 4), (s, recs)
        assert recs[-1].epsilon_total <= BUDGETS[s]
        assert all(e.noise_multiplier == 1.5 for r in recs for e in r.events)
        ledger.close()
    assert st["final"]["mean_site_accuracy"] > 0.5


def test_sites_with_a_budget_refuse_a_task_without_dp(dep):
    dep.operator("submit", {"job": PLAIN_JOB})
    st = dep.wait_job("heart-plain", timeout=60)
    assert st["status"] == "failed"
    dropped = st["rounds"][0]["dropped"]
    assert set(dropped) == set(SITES)
    assert all("declares no differential privacy" in why for why in dropped.values()), dropped


# -- site-level DP, distributed noise, secure aggregation and compression in one deployed job --------------
SECRETS = {s: bytes([i + 1]) * 32 for i, s in enumerate(sandbox.SITES)}
COMBINED = {"name": "sim-0", "dataset": "heart", "rounds": 3, "seed": 0, "min_sites": 3, "round_timeout": 60.0,
            "secure_aggregation": True, "compress": "shared:0.5", "dp": "site", "epsilon": 4.0, "dp_placement": "distributed"}


@pytest.fixture(scope="module")
def full(tmp_path_factory, consortium_running):
    root = tmp_path_factory.mktemp("full-consortium")
    approved = [JobSpec.from_dict(COMBINED).plan.content_hash()]
    sb = sandbox.create(root, approved=approved, fixed_secrets=SECRETS)
    for s in sandbox.SITES:
        sb.write_site_config(s, approved=approved, policy={"epsilon_budget": 5.0, "delta": 1e-5})
    yield from consortium_running(sb)


def test_site_level_dp_with_secure_aggregation_and_compression_matches_simulation(full):
    """Real processes, mutual TLS: every site clips its update, adds its share of the noise, keeps the
    round's shared half of the coordinates and masks them; the model equals the simulation's."""
    from insitu.apps.simulate import simulate

    full.operator("submit", {"job": COMBINED})
    st = full.wait_job("sim-0", timeout=180)
    assert st["status"] == "done", st
    assert [r["status"] for r in st["rounds"]] == ["applied"] * 3, st["rounds"]
    sim = simulate(**{k: v for k, v in COMBINED.items() if k not in ("name", "round_timeout")}, site_budget="5",
                   baselines=False, write=False, site_secrets=SECRETS)
    assert st["final"]["site_accuracy"] == pytest.approx(sim["final"]["site_accuracy"], abs=1e-9)
    for s in sandbox.SITES:
        ledger = PrivacyLedger(full.root / "sites" / s / "state" / "privacy_ledger.sqlite")
        assert [r.round for r in ledger.records(s)] == [1, 2, 3] and ledger.spent(s) <= 4.0 + 1e-6
