"""The site's border: nothing undeclared leaves, no exact metric travels around a protected vector,
evaluation is refused for models the site cannot verify, and DP noise is the site's own secret."""
from __future__ import annotations

import numpy as np
import pytest

from insitu.apps.simulate import SimulationConfig, simulate
from insitu.builder import build_federation, site_egress
from insitu.errors import ProtocolError
from insitu.federation.egress import Release
from insitu.federation.instructions import EvalInstructions
from insitu.federation.messages import Message, MessageKind


@pytest.fixture(scope="module")
def heart():
    from insitu.data.heart import load_heart

    return load_heart()


def _fed(heart, **options):
    cfg = SimulationConfig(**{"rounds": 3, "local_steps": 5, "min_sites": 3, **options}).resolved()
    plan = cfg.plan_for(heart.input_shape, heart.num_outputs, heart.schema)
    ledger = None
    if plan.dp.on:
        from insitu.privacy import Budget, PrivacyLedger

        ledger = PrivacyLedger(":memory:")
        for s in heart.sites:
            ledger.set_budget(s.name, Budget(1e6))
    return build_federation(plan, heart.sites, ledger=ledger)


def test_an_undeclared_field_or_metric_is_refused_before_it_leaves(heart):
    coord, sites = _fed(heart)
    site = sites["cleveland"]
    reply = site.handle(coord.round_plan(1).train_request("cleveland"))
    assert set(reply.meta["metrics"]) <= {"train_loss", "num_samples", "steps"}  # plain, no DP: public by the plan
    for bad in (Message(reply.kind, reply.round, reply.job, {**reply.meta, "seed": 3}, reply.tensors),
                Message(reply.kind, reply.round, reply.job, reply.meta, {**reply.tensors, "gradient": np.zeros(3, np.float32)}),
                Message(reply.kind, reply.round, reply.job, {**reply.meta, "metrics": {"train_loss": 0.1, "dp_update_norm": 2.0}}, reply.tensors),
                Message(MessageKind.HE_DECRYPT_REPLY, 1, "job", {}, {"sum": np.zeros(3)})):
        with pytest.raises(ProtocolError, match="undeclared|does not declare"):
            site.egress.check(bad)


@pytest.mark.parametrize("options", [{"secure_aggregation": True}, {"dp": "record", "epsilon": 1.0},
                                     {"dp": "site", "epsilon": 3.0, "dp_placement": "distributed", "secure_aggregation": True}])
def test_no_exact_training_metric_travels_around_a_protected_or_noised_update(heart, options):
    """The audit recovered single records from the exact losses sent beside masked updates."""
    coord, sites = _fed(heart, **options)
    rec = coord.run_round(1)
    for metrics in rec.train.values():
        assert not {"train_loss", "num_samples", "dp_update_norm", "dp_clipped_fraction", "dp_mean_batch"} & set(metrics), metrics
    table = sites["hungary"].egress.table()
    if options.get("secure_aggregation"):
        assert table["train_reply"]["tensor.masked"] == Release.PROTECTED.value
    if "dp" in options:
        assert set(table["train_reply.metrics"]) == {"epsilon_round", "epsilon_total"}


def test_evaluation_of_a_model_the_site_was_never_sent_is_refused(heart):
    """The evaluation oracle: a coordinator scoring chosen parameters on a site's test split."""
    coord, sites = _fed(heart)
    site = sites["switzerland"]
    coord.run_round(1)
    coord.evaluate(1)  # the new global model: a candidate the next round will confirm
    coord.run_round(2)
    coord.evaluate(2)
    ins = EvalInstructions().to_meta()
    plan_meta = coord.round_plan(3).plan
    probes = [np.full(site.size, v, np.float32) for v in (0.1, 0.2, 0.3, 0.4)]
    answered = refused = 0
    for p in probes:
        try:
            site.handle(Message(MessageKind.EVALUATE, 9, coord.job, {"plan": plan_meta, "instructions": ins}, {"params": p}))
            answered += 1
        except ProtocolError as exc:
            assert "never sent to this site for training" in str(exc)
            refused += 1
    assert answered <= 1 and refused >= 3  # at most the one unverified slot left (the final model's)
    # the global models it trained on can always be scored again
    site.handle(Message(MessageKind.EVALUATE, 9, coord.job, {"plan": plan_meta, "instructions": ins}, {"params": coord.params}))


def test_two_dp_runs_with_the_same_seed_draw_different_noise_and_the_same_splits(tmp_path):
    a = simulate(rounds=2, dp="record", epsilon=1.0, baselines=False, out=str(tmp_path / "a"))
    b = simulate(rounds=2, dp="record", epsilon=1.0, baselines=False, out=str(tmp_path / "b"))
    assert a["sites"] == b["sites"] and a["plan_hash"] == b["plan_hash"]  # splits and plan from --seed
    pa, pb = (np.load(tmp_path / n / "model.npz")["params"] for n in ("a", "b"))
    assert not np.array_equal(pa, pb)  # noise and sampling from each site's own secret
    assert a["private_randomness"] and "seed" not in str(a["plan"])


def test_site_level_dp_states_its_adjacency_and_defaults_to_replace(heart):
    cfg = SimulationConfig(dp="site", epsilon=3.0).resolved()
    plan = cfg.plan_for(heart.input_shape, heart.num_outputs, heart.schema)
    assert plan.dp.adjacency.value == "replace" and plan.dp.sensitivity_factor == 2.0
    loose = SimulationConfig(dp="site", epsilon=3.0, dp_adjacency="add-remove").resolved()
    assert loose.plan_for(heart.input_shape, heart.num_outputs, heart.schema).dp.sensitivity_factor == 1.0
    egress = site_egress(plan, build_federation(plan, heart.sites, ledger=_ledger(heart))[1]["cleveland"].pipeline.protection)
    assert set(egress.metrics) == {"epsilon_round", "epsilon_total"}


def _ledger(heart):
    from insitu.privacy import Budget, PrivacyLedger

    led = PrivacyLedger(":memory:")
    for s in heart.sites:
        led.set_budget(s.name, Budget(1e6))
    return led
