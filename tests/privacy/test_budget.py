"""The per-site ledger: immutable records, totals by composition, refusal before any training."""
from __future__ import annotations

import sqlite3

import numpy as np
import pytest
import torch

from insitu.errors import BudgetExceeded, ConfigError
from insitu.privacy import Budget, Mechanism, PrivacyEvent, PrivacyLedger, epsilon_of, gaussian_round

ROUND = gaussian_round(3.0)


@pytest.fixture
def ledger(tmp_path):
    with PrivacyLedger(tmp_path / "ledger.sqlite") as led:
        led.set_budget("a", Budget(2.0, 1e-5))
        yield led


def test_totals_are_composed_not_added(ledger):
    r1 = ledger.charge("a", "job", 1, ROUND)
    r2 = ledger.charge("a", "job", 2, ROUND)
    assert r2.epsilon_total == pytest.approx(epsilon_of(list(ROUND) * 2, 1e-5))
    assert r2.epsilon_total < r1.epsilon_total + r2.epsilon_round + 1e-12
    assert r2.epsilon_total < 2 * r1.epsilon_total  # composition beats adding ε's
    assert [r.round for r in ledger.records("a")] == [1, 2]


def test_refusal_records_nothing_and_names_the_numbers(ledger):
    n = 0
    while True:
        n += 1
        try:
            ledger.charge("a", "job", n, ROUND)
        except BudgetExceeded as exc:
            msg = str(exc)
            break
    assert f"round {n} would spend ε=" in msg and "left (limit 2" in msg and "site a" in msg
    assert len(ledger.records("a")) == n - 1
    assert ledger.spent("a") <= 2.0


def test_records_are_immutable(ledger):
    ledger.charge("a", "job", 1, ROUND)
    db = sqlite3.connect(ledger.path)
    with pytest.raises(sqlite3.DatabaseError, match="immutable"):
        db.execute("UPDATE ledger SET epsilon_total = 0")
    with pytest.raises(sqlite3.DatabaseError, match="immutable"):
        db.execute("DELETE FROM ledger")
    db.close()


def test_a_round_is_charged_once(ledger):
    ledger.charge("a", "job", 1, ROUND)
    with pytest.raises(BudgetExceeded, match="already charged"):
        ledger.charge("a", "job", 1, ROUND)


def test_ledger_survives_reopen_and_keeps_the_budget(tmp_path, ledger):
    ledger.charge("a", "job", 1, ROUND)
    spent = ledger.spent("a")
    with PrivacyLedger(ledger.path) as again:
        assert again.budget("a") == Budget(2.0, 1e-5)
        assert again.spent("a") == pytest.approx(spent)
        assert again.records("a")[0].events == ROUND


def test_no_budget_means_no_dp_round(tmp_path):
    with PrivacyLedger(tmp_path / "l.sqlite") as led:
        with pytest.raises(ConfigError, match="no privacy budget"):
            led.charge("b", "job", 1, ROUND)
        led.set_budget("b", Budget(1.0))
        led.charge("b", "job", 1, gaussian_round(10.0))
        with pytest.raises(ConfigError, match="already spent"):
            led.set_budget("b", Budget(1e-4))


def test_charges_are_written_to_the_audit_log(tmp_path):
    from insitu.audit import AuditAction, AuditLog
    from insitu.audit.keys import write_keypair

    key, _ = write_keypair(tmp_path / "keys", "site-a")
    log = AuditLog.open(tmp_path / "audit.db", key, writer="site-a")
    with PrivacyLedger(tmp_path / "l.sqlite", audit=log) as led:
        led.set_budget("a", Budget(5.0))
        led.charge("a", "job", 1, ROUND)
    actions = [e.action for e in AuditLog.read(tmp_path / "audit.db").entries()]
    assert actions == [AuditAction.BUDGET_CHANGE, AuditAction.EPSILON_SPEND]


# -- refusal happens before any training ---------------------------------------------------------
def _site_and_guard(tmp_path, budget_eps):
    from insitu.data.dataset import SiteData
    from insitu.federation.dp import BudgetGuard
    from insitu.federation.site import Site
    from insitu.federation.task import TaskSpec
    from insitu.plan import Plan

    g = torch.Generator().manual_seed(0)
    X = torch.randn(40, 5, generator=g)
    y = (X[:, 0] > 0).long()
    data = SiteData("a", X, y, X[:10], y[:10])
    task = TaskSpec("logreg", (5,), 1, tuple("abcde"), 0.1, 3, 8)
    ledger = PrivacyLedger(tmp_path / "l.sqlite")
    ledger.set_budget("a", Budget(budget_eps))
    calls = []

    def trainer(site, model, cfg, request):
        calls.append(request.round)
        return {}

    guard = BudgetGuard(ledger, "a", (PrivacyEvent(Mechanism.GAUSSIAN, 1.0, 0.2, task.local_steps),), job="job")
    plan = Plan(task)
    site = Site("a", data, task, plan.content_hash(), task.train_config(), guards=[guard], trainer=trainer)
    return site, plan, ledger, calls


def _train_msg(site, plan, rnd):
    from insitu.federation.instructions import RoundInstructions
    from insitu.federation.messages import Message, MessageKind
    from insitu.learn.models import get_flat

    return Message(MessageKind.TRAIN, rnd, "job", {"plan": plan.to_meta(), "instructions": RoundInstructions().to_meta()},
                   {"params": get_flat(site.model)})


def test_budget_refusal_happens_before_any_training(tmp_path):
    site, task, ledger, calls = _site_and_guard(tmp_path, budget_eps=2.5)
    params_before = None
    r = 0
    with pytest.raises(BudgetExceeded, match="would spend"):
        while True:
            r += 1
            params_before = site.model[1].weight.detach().clone()
            site.handle(_train_msg(site, task, r))
    assert calls == list(range(1, r))  # the refused round never reached the trainer
    assert r not in [rec.round for rec in ledger.records("a")]
    assert torch.equal(site.model[1].weight, params_before)  # nor touched the model


@pytest.mark.slow
def test_simulation_reports_which_site_refused_and_why(tmp_path):
    from insitu.apps.simulate import simulate

    s = simulate(dataset="heart", dp="record", noise_multiplier=2.0, rounds=2, local_steps=2, batch_size=32, lr=0.1,
                 site_budget="switzerland=0.5,default=50", baselines=False, write=True, out=str(tmp_path / "run"))
    ref = s["final"]["privacy"]["refusals"]
    assert ref and {r["site"] for r in ref} == {"switzerland"}
    assert "would spend" in ref[0]["reason"] and "limit 0.5" in ref[0]["reason"]
    assert s["final"]["epsilon_per_site"]["switzerland"] <= 0.5
    assert s["final"]["delta"] == 1e-5 and s["final"]["epsilon"] == max(s["final"]["epsilon_per_site"].values())
    with PrivacyLedger(tmp_path / "run" / "privacy_ledger.sqlite") as led:
        assert {r.site for r in led.records()} == {"cleveland", "hungary", "va-long-beach"}  # switzerland refused round 1
        assert "switzerland" in led.sites()
    import json

    rounds = [json.loads(line) for line in (tmp_path / "run" / "rounds.jsonl").read_text().splitlines()]
    assert all("epsilon" in r for r in rounds) and "switzerland" in rounds[-1]["dp_refused"]


def test_site_refuses_a_round_announcing_fewer_noise_shares_than_it_sized_for(tmp_path):
    from insitu.errors import PolicyViolation
    from insitu.federation.dp import BudgetGuard
    from insitu.federation.instructions import RoundInstructions
    from insitu.federation.messages import Message, MessageKind

    with PrivacyLedger(tmp_path / "l.sqlite") as led:
        led.set_budget("a", Budget(5.0))
        guard = BudgetGuard(led, "a", tuple(ROUND), job="job", min_shares=3)
        with pytest.raises(PolicyViolation, match="sized for at least 3"):
            guard(None, Message(MessageKind.TRAIN, 1, "job"), RoundInstructions(dp_min_shares=2))
        with pytest.raises(PolicyViolation, match="announces None"):
            guard(None, Message(MessageKind.TRAIN, 1, "job"), RoundInstructions())
        assert led.records("a") == []  # nothing charged
        guard(None, Message(MessageKind.TRAIN, 2, "job"), RoundInstructions(dp_min_shares=3))
        assert [r.round for r in led.records("a")] == [2]
