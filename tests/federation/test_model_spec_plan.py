"""A model is a specification the plan carries: covered by the hash sites approve, parsed strictly,
built by each site itself; built-in names resolve to specifications and keep their plans' hashes;
``insitu simulate --model-spec`` and job.toml's ``model_spec`` give the same plan."""
from __future__ import annotations

import json

import numpy as np
import pytest

from insitu.apps.simulate import SimulationConfig, simulate
from insitu.builder import build_federation, initial_params
from insitu.coordinator.jobs import JobSpec, inline_model_spec
from insitu.errors import ConfigError, PolicyViolation, ProtocolError
from insitu.federation.task import TaskSpec
from insitu.learn.models import MAX_PARAMS, build_model, get_flat, num_params, param_count
from insitu.learn.spec import BUILTIN_SPECS, ModelSpec, SpecModel, validate_spec
from insitu.plan import Plan
from insitu.site.policy import SitePolicy, check_model_size

#: a small MLP for the 13 heart features (not one of the built-ins)
SPEC = {"layers": [{"type": "linear", "out_features": 8}, {"type": "tanh"}, {"type": "dropout", "p": 0.1},
                   {"type": "linear", "out_features": "outputs"}]}
HEART = {"name": "j", "dataset": "heart", "rounds": 2, "local_steps": 5}


def _job(**kw) -> JobSpec:
    return JobSpec.from_dict({**HEART, **kw})


def test_the_plan_carries_the_specification_and_its_hash_covers_every_layer():
    plan = _job(model_spec=SPEC).plan
    assert plan.task.model == "spec" and plan.to_meta()["task"]["model_spec"] == validate_spec(SPEC)
    assert plan.task.param_count() == 13 * 8 + 8 + 8 + 1 == num_params(plan.task.build_model())
    assert Plan.from_meta(json.loads(json.dumps(plan.to_meta()))) == plan
    wider = json.loads(json.dumps(SPEC))
    wider["layers"][0]["out_features"] = 9
    other = [_job(model_spec=wider).plan, _job(model_spec={"layers": SPEC["layers"][:2] + SPEC["layers"][3:]}).plan,
             _job(model="mlp").plan]
    assert len({plan.content_hash(), *(p.content_hash() for p in other)}) == 4
    # key order and defaults written out or not: the same specification, the same plan
    reordered = {"layers": [dict(reversed(list(layer.items()))) for layer in validate_spec(SPEC)["layers"]]}
    assert _job(model_spec=reordered).plan.content_hash() == plan.content_hash()


def test_builtin_names_resolve_to_specifications_and_keep_their_hash():
    for name, shape in (("logreg", (13,)), ("mlp", (13,)), ("cnn", (1, 28, 28))):
        task = TaskSpec(name, shape, 1, ("x",) if len(shape) == 1 else ("image",), 0.01, 1, 4)
        assert task.resolved_spec() == ModelSpec.parse(BUILTIN_SPECS[name])
        assert "model_spec" not in task.to_meta()  # a built-in name hashes as before specifications existed
        built = task.build_model(seed=5)
        assert isinstance(built, SpecModel)
        np.testing.assert_array_equal(get_flat(built), get_flat(build_model(name, shape, 1, seed=5)))
    for name in ("lstm", "grud"):  # recurrent cells the vocabulary cannot write: named built-ins
        task = TaskSpec(name, (48, 111), 1, ("x",), 0.01, 1, 4)
        assert task.resolved_spec() is None
        assert task.param_count() == param_count(name, (48, 111), 1) == num_params(task.build_model())


def test_a_plan_with_an_invalid_or_ambiguous_specification_is_refused():
    meta = _job(model_spec=SPEC).plan.to_meta()

    def with_spec(spec, **task):
        return {**meta, "task": {**meta["task"], "model_spec": spec, **task}}

    bad_layer = validate_spec({"layers": [{"type": "linear", "out_features": 8}, {"type": "conv2d", "out_channels": 4, "kernel_size": 3}]})
    with pytest.raises(ProtocolError, match=r"layer 1 \(conv2d\): needs an image"):
        Plan.from_meta(with_spec(bad_layer))
    with pytest.raises(ProtocolError, match=r"layer 0: type: unknown value 'python'"):
        Plan.from_meta(with_spec({"layers": [{"type": "python", "code": "import os"}]}))
    with pytest.raises(ProtocolError, match="not in canonical form"):  # defaults left out: two encodings of one plan
        Plan.from_meta(with_spec(SPEC))
    integer_p = validate_spec(SPEC)
    integer_p["layers"][2]["p"] = 0  # 0 and 0.0 are one value but two byte strings, two hashes
    with pytest.raises(ProtocolError, match="not in canonical form"):
        Plan.from_meta(with_spec(integer_p))
    with pytest.raises(ProtocolError, match='model_spec is given with model = "mlp"'):
        Plan.from_meta(with_spec(validate_spec(SPEC), model="mlp"))
    no_spec = {**meta, "task": {k: v for k, v in meta["task"].items() if k != "model_spec"}}
    with pytest.raises(ProtocolError, match='model = "spec" needs model_spec'):
        Plan.from_meta(no_spec)
    huge = {"layers": [{"type": "linear", "out_features": 65536}, {"type": "linear", "out_features": 200}, {"type": "linear", "out_features": "outputs"}]}
    with pytest.raises(ConfigError, match=f"{65536 * 13 + 65536 + 65536 * 200 + 200 + 201:,} parameters.*limit is {MAX_PARAMS:,}"):
        _job(model_spec=huge)


def test_each_site_builds_the_specification_itself(tmp_path):
    from insitu.data.heart import load_heart

    heart = load_heart()
    plan = _job(model_spec=SPEC).plan
    coord, sites = build_federation(plan, heart.sites, seed=3)
    for site in sites.values():
        assert isinstance(site.model, SpecModel) and site.size == plan.task.param_count()
    np.testing.assert_array_equal(coord.params, initial_params(plan, 3))
    coord.run_round(1)
    assert coord.params.shape == (plan.task.param_count(),) and not np.array_equal(coord.params, initial_params(plan, 3))


def test_simulate_option_and_job_key_give_one_plan(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(SPEC))
    sim = SimulationConfig(model_spec=str(path), rounds=2, local_steps=5).resolved()
    from insitu.coordinator.jobs import HEART_SCHEMA

    assert sim.model == "spec" and sim.model_spec == validate_spec(SPEC)
    plan = sim.plan_for((len(HEART_SCHEMA),), 1, HEART_SCHEMA)
    (tmp_path / "job.toml").write_text('name = "j"\nrounds = 2\nlocal_steps = 5\nmodel_spec = "mine.json"\n')
    import tomllib

    job = inline_model_spec(tomllib.loads((tmp_path / "job.toml").read_text()), tmp_path)
    assert JobSpec.from_dict(job).plan == plan == _job(model_spec=SPEC).plan
    stored = JobSpec.from_dict(job).to_dict()
    assert stored["model_spec"] == validate_spec(SPEC) and JobSpec.from_dict(stored).plan == plan
    with pytest.raises(ConfigError, match="a job carries the specification itself"):
        JobSpec.from_dict({**HEART, "model_spec": "mine.json"})  # the coordinator never opens a path an operator names
    with pytest.raises(ConfigError, match="not both"):
        SimulationConfig(model="cnn", model_spec=SPEC).resolved()
    with pytest.raises(ConfigError, match='model = "spec" needs model_spec'):
        SimulationConfig(model="spec").resolved()
    with pytest.raises(ConfigError, match="cannot read the model specification"):
        SimulationConfig(model_spec=str(tmp_path / "missing.json")).resolved()
    (tmp_path / "bad.json").write_text('{"layers": [{"type": "linear", "out_features": 8, "activation": "relu"}]}')
    with pytest.raises(ConfigError, match=r"bad.json: model spec layer 0 \(linear\): unknown key\(s\) \['activation'\]"):
        SimulationConfig(model_spec=str(tmp_path / "bad.json")).resolved()


def test_simulate_cli_trains_a_model_spec_file(tmp_path, capsys):
    from insitu.cli import main

    (tmp_path / "mine.json").write_text(json.dumps(SPEC))
    out = tmp_path / "run"
    try:
        main(["simulate", "--model-spec", str(tmp_path / "mine.json"), "--rounds", "2", "--local-steps", "5",
              "--no-baselines", "--out", str(out)])
    except SystemExit as exc:
        assert not exc.code, capsys.readouterr()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["plan"]["task"]["model_spec"] == validate_spec(SPEC)
    assert summary["final"]["rounds_completed"] == 2
    task = TaskSpec.from_meta(json.loads((out / "task.json").read_text()))
    with np.load(out / "model.npz") as z:
        assert z["params"].shape == (task.param_count(),)
    # the same run through the Python face, with the same secrets: the same model
    secrets = {s: bytes([i + 1]) * 32 for i, s in enumerate(summary["final"]["site_accuracy"])}
    a = simulate(model_spec=SPEC, rounds=2, local_steps=5, baselines=False, write=False, site_secrets=secrets)
    b = simulate(model_spec=str(tmp_path / "mine.json"), rounds=2, local_steps=5, baselines=False, write=False, site_secrets=secrets)
    assert a["final"]["site_accuracy"] == b["final"]["site_accuracy"]


def test_site_policy_caps_the_parameter_count(tmp_path):
    plan = _job(model_spec=SPEC).plan
    n = plan.task.param_count()
    assert check_model_size(plan, None) == n == check_model_size(plan, n)
    with pytest.raises(PolicyViolation, match=f"its model specification has {n:,} parameters; this site's policy allows at most {n - 1:,}"):
        check_model_size(plan, n - 1)
    with pytest.raises(PolicyViolation, match="its model logreg has 14 parameters; .* at most 10"):
        check_model_size(_job().plan, 10)
    base = 'coordinator = "127.0.0.1:1"\ncert = "c"\nkey = "k"\nca = "a"\n'
    for value, ok in (("1000", True), ("0", False), ("1.5", False), ('"many"', False)):
        (tmp_path / "site.toml").write_text(f"[site]\n{base}[policy]\nmax_params = {value}\n")
        if ok:
            assert SitePolicy.load(tmp_path / "site.toml").max_params == 1000
        else:
            with pytest.raises(ConfigError, match="max_params must be a positive integer"):
                SitePolicy.load(tmp_path / "site.toml")


def test_record_level_dp_refuses_a_specification_it_cannot_clip_when_the_plan_is_made():
    normed = {"layers": [{"type": "linear", "out_features": 8}, {"type": "layernorm"}, {"type": "relu"},
                         {"type": "linear", "out_features": "outputs"}]}
    with pytest.raises(ConfigError, match=r"layer 1 \(layernorm\) has parameters record-level DP-SGD cannot clip"):
        _job(model_spec=normed, dp="record", noise_multiplier=1.0)
    _job(model_spec=normed, dp="site", noise_multiplier=1.0)  # site level clips the whole update: any layer
    plan = _job(model_spec=SPEC, dp="record", noise_multiplier=1.0).plan  # linear, tanh, dropout: clipped per record
    from insitu.data.heart import load_heart
    from insitu.privacy import Budget, PrivacyLedger

    heart = load_heart()
    ledger = PrivacyLedger(":memory:")
    for s in heart.sites:
        ledger.set_budget(s.name, Budget(1e6))
    coord, _ = build_federation(plan, heart.sites, ledger=ledger)
    rec = coord.run_round(1)
    assert not rec.dropped and len(rec.participants) == 4 and all(t["epsilon_round"] > 0 for t in rec.train.values())


def test_a_task_refuses_batchnorm_whose_statistics_would_not_be_federated():
    from insitu.federation.task import TaskSpec

    layers = [{"type": "conv2d", "out_channels": 4, "kernel_size": 3}, {"type": "batchnorm"}, {"type": "flatten"},
              {"type": "linear", "out_features": "outputs"}]
    with pytest.raises(ConfigError, match=r"layer 1 \(batchnorm\): its running statistics .* use groupnorm or layernorm"):
        TaskSpec("spec", (1, 8, 8), 1, ("image",), 0.1, 1, 4, model_spec={"layers": layers})
    layers[1] = {"type": "groupnorm", "groups": 2}
    assert TaskSpec("spec", (1, 8, 8), 1, ("image",), 0.1, 1, 4, model_spec={"layers": layers}).model_spec is not None
