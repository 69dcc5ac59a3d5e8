"""One plan, one builder: ``insitu simulate`` and a deployed job give the same model, and every
round instruction and plan field reaches the site.

The deployment side here is the real job path (``JobSpec`` from a job description, the deployed
coordinator of ``coordinator.service.job_coordinator``, one ``SiteNode`` per hospital with its own
``site.toml``, approvals, certificates and ledger) over the in-process transport instead of mTLS.
Both sides get the same site secrets explicitly; a real run draws them from the OS.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from insitu.apps.simulate import SimulationConfig, simulate
from insitu.builder import build_federation
from insitu.coordinator.jobs import JobSpec
from insitu.coordinator.service import job_coordinator, mean_accuracy
from insitu.errors import ProtocolError
from insitu.federation.instructions import RoundInstructions
from insitu.federation.messages import Message
from insitu.federation.transport import InProcessTransport
from insitu.net import sandbox
from insitu.plan import Plan, StrategySpec
from insitu.site.node import SiteNode, load_site_data
from insitu.site.policy import SitePolicy

SITES = sandbox.SITES
SECRETS = {s: bytes([i + 1]) * 32 for i, s in enumerate(SITES)}
COORDINATOR = b"c" * 32
#: normalize site: the DP moments release of ``--normalize federated`` (simulate's default) is simulate-only so far
BASE = {"dataset": "heart", "rounds": 3, "local_steps": 10, "seed": 3, "min_sites": 3, "normalize": "site"}

#: strategy × protection × DP × compression, every value of each axis at least once
MATRIX = [
    ({"strategy": "fedavg"}, {}, {}, {}),
    ({"strategy": "fedprox", "mu": 0.5}, {"secure_aggregation": True}, {}, {"compress": "shared:0.5"}),
    ({"strategy": "fedyogi"}, {}, {"dp": "record", "epsilon": 3.0}, {"compress": "int8"}),
    ({"strategy": "scaffold"}, {"secure_aggregation": True}, {"dp": "site", "noise_multiplier": 0.5}, {}),
    ({"strategy": "fedadam"}, {"homomorphic": "paillier"}, {"dp": "site", "noise_multiplier": 0.5, "dp_placement": "distributed"}, {}),
    ({"strategy": "fedadagrad"}, {"secure_aggregation": True, "secagg_recovery": "survivors"},
     {"dp": "site", "epsilon": 5.0, "dp_placement": "distributed"}, {"compress": "shared:0.3"}),
    ({"strategy": "fedavg"}, {}, {"dp": "site", "epsilon": 5.0, "adaptive_clip": True}, {"compress": "topk:0.5+int8"}),
]


def _ids(case):
    return "-".join(f"{v}" for part in case for v in part.values()) or "plain"


@pytest.fixture(scope="module")
def consortium(tmp_path_factory):
    """Certificates and site.toml files for the four heart hospitals (no process is started)."""
    return sandbox.create(tmp_path_factory.mktemp("parity"), SITES, fixed_secrets=SECRETS)


def deployed(consortium, job: dict, state: str) -> dict:
    spec = JobSpec.from_dict(job)
    h = spec.plan.content_hash()
    nodes = {}
    for s in SITES:
        policy = SitePolicy.load(consortium.write_site_config(s, approved=[h], policy={"epsilon_budget": 1000.0} if spec.plan.dp.on else None))
        policy = dataclasses.replace(policy, state=consortium.root / "state" / state / s)
        data = load_site_data(policy)
        from insitu.data.heart import FEATURES

        nodes[s] = SiteNode(policy, s, data, schema=tuple(FEATURES))
    coord, _, _ = job_coordinator(spec, job["name"], InProcessTransport(nodes), coordinator_secret=COORDINATOR)
    for r in range(1, spec.rounds + 1):
        coord.run_round(r)
    return mean_accuracy(coord.evaluate(spec.rounds + 1))


@pytest.mark.slow
@pytest.mark.parametrize("case", MATRIX, ids=[_ids(c) for c in MATRIX])
def test_simulate_and_deployed_job_give_the_same_model(consortium, case):
    options = {k: v for part in case for k, v in part.items()}
    budget = {"site_budget": "1000"} if options.get("dp") else {}
    sim = simulate(**BASE, **options, **budget, baselines=False, write=False, site_secrets=SECRETS, coordinator_secret=COORDINATOR)
    assert sim["final"]["rounds_completed"] == 3, sim
    # the job id seeds public choices (shared:F's coordinates): named as simulate names its job
    dep = deployed(consortium, {"name": f"sim-{BASE['seed']}", **BASE, **options}, state=str(MATRIX.index(case)))
    for s in SITES:
        assert dep["site_accuracy"][s] == pytest.approx(sim["final"]["site_accuracy"][s], abs=1e-9)


# -- the contract: every plan field and every round instruction reaches what the site trains ------
@pytest.fixture(scope="module")
def heart():
    from insitu.data.heart import load_heart

    return load_heart()


def _update(heart, plan: Plan, instructions: RoundInstructions | None = None, site: str = "cleveland") -> np.ndarray:
    ledger = None
    if plan.dp.on:
        from insitu.privacy import Budget, PrivacyLedger

        ledger = PrivacyLedger(":memory:")
        for s in heart.sites:
            ledger.set_budget(s.name, Budget(1e6))
    coord, sites = build_federation(plan, heart.sites, secrets=SECRETS, seed=0, ledger=ledger)
    req = coord.round_plan(1).train_request(site)
    if instructions is not None:
        req = Message(req.kind, req.round, req.job, {**req.meta, "instructions": instructions.to_meta()}, req.tensors)
    reply = sites[site].handle(req)
    return np.concatenate([np.asarray(reply.tensors[k], dtype=np.float64).ravel() for k in sorted(reply.tensors)])


def _plan(heart, **kw) -> Plan:
    cfg = SimulationConfig(**{"rounds": 5, "local_steps": 10, **kw}).resolved()
    return cfg.plan_for(heart.input_shape, heart.num_outputs, heart.schema)


def test_every_round_instruction_changes_what_the_site_trains(heart):
    base = _plan(heart)
    ref = _update(heart, base, RoundInstructions(group=4))
    assert np.array_equal(ref, _update(heart, base, RoundInstructions(group=4)))  # same secret, same update
    assert not np.allclose(ref, _update(heart, base, RoundInstructions(lr_scale=0.5, group=4)))
    adaptive = _plan(heart, dp="site", noise_multiplier=1.0, adaptive_clip=True)
    a = _update(heart, adaptive, RoundInstructions(group=4, dp_clip=0.01))
    b = _update(heart, adaptive, RoundInstructions(group=4, dp_clip=0.02))
    assert np.linalg.norm(a) <= 0.01 * 14 + 1e-9 and not np.allclose(a, b)  # the clip the site applies


def test_every_plan_field_a_site_trains_with_changes_the_update(heart):
    """This would have caught FedProx's μ never reaching the sites."""
    ref = _update(heart, _plan(heart))
    for kw in ({"strategy": "fedprox", "mu": 10.0}, {"lr": 0.02}, {"local_steps": 11}, {"batch_size": 8},
               {"optimizer": "adam"}, {"dp": "record", "noise_multiplier": 1.0}, {"compress": "int8"}):
        other = _update(heart, _plan(heart, **kw))
        assert other.shape != ref.shape or not np.allclose(ref, other, atol=1e-9), kw
    mu_small = _update(heart, _plan(heart, strategy="fedprox", mu=0.001))
    mu_big = _update(heart, _plan(heart, strategy="fedprox", mu=100.0))
    assert np.linalg.norm(mu_big) < np.linalg.norm(mu_small)  # the proximal term pulls toward the global model


def test_fedprox_mu_changes_the_simulated_model():
    runs = [simulate(rounds=3, strategy=s, mu=mu, baselines=False, write=False, site_secrets=SECRETS)
            for s, mu in (("fedavg", 0.01), ("fedprox", 0.01), ("fedprox", 100.0))]
    accs = [tuple(r["final"]["site_accuracy"].values()) for r in runs]
    assert runs[0]["plan"]["strategy"]["mu"] == 0.0 and runs[2]["plan"]["strategy"]["mu"] == 100.0
    assert accs[0] != accs[2]


def test_unknown_or_missing_instruction_is_refused_naming_it(heart):
    coord, sites = build_federation(_plan(heart), heart.sites, secrets=SECRETS)
    req = coord.round_plan(1).train_request("hungary")
    ins = dict(req.meta["instructions"])
    for bad, name in (({**ins, "prox_mu": 1.0}, "prox_mu"), ({k: v for k, v in ins.items() if k != "lr_scale"}, "lr_scale")):
        with pytest.raises(ProtocolError, match=name):
            sites["hungary"].handle(Message(req.kind, req.round, req.job, {**req.meta, "instructions": bad}, req.tensors))
    with pytest.raises(ProtocolError, match="undeclared field.*'seed'"):
        sites["hungary"].handle(Message(req.kind, req.round, req.job, {**req.meta, "seed": 1}, req.tensors))


def test_plan_parses_strictly_and_job_and_simulate_share_one_vocabulary(heart):
    from insitu.errors import ConfigError

    job = JobSpec.from_dict({"name": "j", "dataset": "heart", "strategy": "fedprox", "mu": 0.1, "secure_aggregation": True,
                             "compress": "shared:0.1", "dp": "site", "epsilon": 3.0, "dp_placement": "distributed", "min_sites": 3})
    sim = SimulationConfig(strategy="fedprox", mu=0.1, secure_aggregation=True, compress="shared:0.1", dp="site", epsilon=3.0,
                           dp_placement="distributed", min_sites=3, normalize="site").resolved()
    assert job.plan == sim.plan_for(heart.input_shape, heart.num_outputs, heart.schema)
    assert Plan.from_meta(job.plan.to_meta()) == job.plan
    meta = job.plan.to_meta()
    for bad in ({**meta, "extra": 1}, {**meta, "strategy": {**meta["strategy"], "prox_mu": 1}}, {k: v for k, v in meta.items() if k != "dp"}):
        with pytest.raises(ConfigError):
            Plan.from_meta(bad)
    with pytest.raises(ConfigError, match="protocol' is gone"):
        JobSpec.from_dict({"name": "j", "dataset": "heart", "protocol": "secagg"})
    with pytest.raises(ConfigError, match="insitu simulate only"):
        JobSpec.from_dict({"name": "j", "dataset": "heart", "dropout": 0.1})
    with pytest.raises(ConfigError, match="mu = 0.5 is FedProx's"):
        StrategySpec("fedavg", mu=0.5)
