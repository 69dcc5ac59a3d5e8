"""Deployed image jobs: hospitals whose site.toml reads a folder of chest X-rays (one sub-folder per
class, written here from PneumoniaMNIST) through ``[data] source = "records"`` and the consortium's
schema, training the built-in CNN or a model the consortium wrote as a specification.

Each deployed job must give, site by site, the accuracy ``insitu simulate`` gives for the same plan,
seed and site secrets on the same folders read through the library (``read_dataset`` →
``site_data`` → ``federated_data``).  A site whose ``[policy] max_params`` is below the model's size
refuses it, naming the count and the cap.  The fast tests run the real deployed job path (``JobSpec``,
the deployed coordinator, one ``SiteNode`` per hospital with its own site.toml) over the in-process
transport, as tests/test_plan_parity.py does; the slow one runs the same jobs as real processes over
mTLS on 127.0.0.1.
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from insitu.apps.simulate import simulate
from insitu.coordinator.jobs import JobSpec
from insitu.coordinator.service import job_coordinator, mean_accuracy
from insitu.data import imaging
from insitu.data.features import federated_data, site_data
from insitu.data.medmnist import load_npz
from insitu.data.sources import RecordSchema, read_dataset
from insitu.errors import PolicyViolation
from insitu.federation.transport import InProcessTransport
from insitu.net import sandbox
from insitu.site.node import SiteNode, site_records
from insitu.site.policy import SitePolicy

SITES = ("hospital-a", "hospital-b", "hospital-c")
CAPPED = "hospital-d"  # holds images too, but builds no model over CAP parameters
CAP = 20_000
SECRETS = {s: bytes([i + 1]) * 32 for i, s in enumerate(SITES + (CAPPED,))}
CLASSES = ["normal", "pneumonia"]
#: (normal, pneumonia) images per hospital: label skew, as between a clinic and a referral centre
MIX = {"hospital-a": (40, 20), "hospital-b": (15, 45), "hospital-c": (30, 30), CAPPED: (20, 20)}
SCHEMA = """\
[pixels]
height = 28
width = 28
channels = 1

[columns.label]
role = "label"
type = "string"
levels = ["normal", "pneumonia"]
file = "folder"          # the class is the name of the image's folder
"""
#: the consortium's own model (not a built-in): ~25 k parameters, over the capped site's limit
SPEC = {"layers": [
    {"type": "conv2d", "out_channels": 8, "kernel_size": 3, "padding": 1}, {"type": "groupnorm", "groups": 2},
    {"type": "relu"}, {"type": "avgpool", "kernel_size": 2}, {"type": "flatten"},
    {"type": "linear", "out_features": 16}, {"type": "gelu"}, {"type": "linear", "out_features": "outputs"}]}
#: small on purpose (3 sites × 2 rounds × 3 steps); the job is named as simulate names its coordinator's job
TRAIN = {"rounds": 2, "local_steps": 3, "batch_size": 16, "seed": 0, "min_sites": 3}
TASK = {"input_shape": [1, 28, 28], "num_outputs": 1, "schema": ["image"]}
JOBS = {"cnn": {"name": "sim-0", "dataset": "medmnist", **TRAIN, "task": TASK},
        "spec": {"name": "sim-0", "dataset": "medmnist", **TRAIN, "task": TASK, "model_spec": SPEC}}


@pytest.fixture(scope="module")
def folders(pneumonia_npz, tmp_path_factory):
    """One image folder per hospital (disjoint images) and the schema file they share."""
    root = tmp_path_factory.mktemp("xray")
    arrays = load_npz(pneumonia_npz)
    images, labels = arrays["train_images"], arrays["train_labels"].reshape(-1)
    pools = [iter(np.flatnonzero(labels == c)) for c in (0, 1)]
    for site, counts in MIX.items():
        pick = np.sort(np.concatenate([[next(pools[c]) for _ in range(n)] for c, n in enumerate(counts)]))
        imaging.write_image_folder(images[pick], labels[pick], CLASSES, root / site)
    (root / "schema.toml").write_text(SCHEMA)
    return root


def _data_table(folders, site: str) -> dict:
    return {"source": "records", "uri": str(folders / site), "schema": str(folders / "schema.toml")}


def simulated(folders, kind: str, out=None) -> dict:
    """``insitu simulate`` on the same folders, read through the library, with the sites' secrets
    (``out``: write the run directory, whose model.npz holds the final parameters)."""
    schema = RecordSchema.from_toml(folders / "schema.toml")
    sites = [site_data(read_dataset(folders / s, schema), schema, s, test_fraction=0.3, seed=0) for s in SITES]
    fd = federated_data(sites, schema, "xray")
    extra = {"model_spec": SPEC} if kind == "spec" else {}
    return simulate(data=fd, **TRAIN, **extra, baselines=False, write=out is not None, out=str(out) if out else None,
                    site_secrets={s: SECRETS[s] for s in SITES})


@pytest.fixture(scope="module")
def consortium(tmp_path_factory):
    return sandbox.create(tmp_path_factory.mktemp("images"), SITES + (CAPPED,), fixed_secrets=SECRETS)


def deployed_in_process(consortium, folders, job: dict, state: str, sites=SITES) -> tuple[dict, np.ndarray]:
    """(accuracies, final parameters) of ``job`` run by the deployed coordinator and site nodes."""
    spec = JobSpec.from_dict(job)
    nodes = {}
    for s in sites:
        path = consortium.write_site_config(s, approved=[spec.plan.content_hash()], data=_data_table(folders, s),
                                            policy={"max_params": CAP} if s == CAPPED else None)
        policy = dataclasses.replace(SitePolicy.load(path), state=consortium.root / "state" / state / s)
        data, schema = site_records(policy, s)
        nodes[s] = SiteNode(policy, s, data, schema=schema)
    coord, _, _ = job_coordinator(spec, job["name"], InProcessTransport(nodes))
    for r in range(1, spec.rounds + 1):
        coord.run_round(r)
    assert coord.params.shape == (spec.plan.task.param_count(),)  # the job's model, whichever it is
    return mean_accuracy(coord.evaluate(spec.rounds + 1)), coord.params


@pytest.mark.parametrize("kind", ["cnn", "spec"])
def test_deployed_image_job_equals_simulate(consortium, folders, kind, tmp_path):
    sim = simulated(folders, kind, out=tmp_path / "run")
    assert sim["final"]["rounds_completed"] == TRAIN["rounds"]
    assert sim["plan_hash"] == JobSpec.from_dict(JOBS[kind]).plan.content_hash()  # one plan on both paths
    assert sim["plan"]["task"]["model"] == kind and sorted(sim["sites"]) == sorted(SITES)
    dep, params = deployed_in_process(consortium, folders, JOBS[kind], state=kind)
    assert sorted(dep["site_accuracy"]) == sorted(SITES)
    for s in SITES:
        assert dep["site_accuracy"][s] == pytest.approx(sim["final"]["site_accuracy"][s], abs=1e-9)
    with np.load(tmp_path / "run" / "model.npz") as z:  # not only the accuracies: the very same model
        np.testing.assert_array_equal(params, z["params"])


def test_a_site_refuses_a_model_over_its_cap_naming_count_and_cap(consortium, folders):
    spec = JobSpec.from_dict(JOBS["spec"])
    n = spec.plan.task.param_count()
    assert n > CAP
    path = consortium.write_site_config(CAPPED, approved=[spec.plan.content_hash()], data=_data_table(folders, CAPPED),
                                        policy={"max_params": CAP})
    policy = dataclasses.replace(SitePolicy.load(path), state=consortium.root / "state" / "capped" / CAPPED)
    data, schema = site_records(policy, CAPPED)
    node = SiteNode(policy, CAPPED, data, schema=schema)
    with pytest.raises(PolicyViolation, match=f"its model specification has {n:,} parameters; this site's policy allows at most {CAP:,}"):
        node.check_task(spec.plan)
    # in a job: its rounds are refused with that reason, the other hospitals train without it
    dep, _ = deployed_in_process(consortium, folders, {**JOBS["spec"], "name": "capped"}, state="capped-job", sites=SITES + (CAPPED,))
    assert sorted(dep["site_accuracy"]) == sorted(SITES)
    log = consortium.root / "state" / "capped-job" / CAPPED / "refusals.jsonl"
    refusals = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(r["kind"], r["round"]) for r in refusals] == [("train", 1), ("train", 2), ("evaluate", 3)]
    assert all(f"{n:,} parameters; this site's policy allows at most {CAP:,}" in r["reason"] for r in refusals)


@pytest.mark.slow
def test_image_and_spec_jobs_as_real_processes(tmp_path, folders):
    """The same two jobs on a real consortium: a coordinator process and four site processes over mTLS
    on 127.0.0.1, submitted by an operator; the capped hospital refuses the specification job's rounds."""
    jobs = {"cnn": {**JOBS["cnn"], "sites": list(SITES)},
            "spec": {**JOBS["spec"], "name": "sim-0-spec", "sites": list(SITES + (CAPPED,))}}
    hashes = [JobSpec.from_dict(j).plan.content_hash() for j in jobs.values()]
    sb = sandbox.create(tmp_path / "c", SITES + (CAPPED,), fixed_secrets=SECRETS)
    for s in SITES + (CAPPED,):
        sb.write_site_config(s, approved=hashes, data=_data_table(folders, s), policy={"max_params": CAP} if s == CAPPED else None)
    try:
        sb.start_all()
        assert sb.wait_sites(4, timeout=120) == sorted(SITES + (CAPPED,))
        for kind, job in jobs.items():
            sb.operator("submit", {"job": job})
            st = sb.wait_job(job["name"], timeout=240)
            assert st["status"] == "done", st
            sim = simulated(folders, kind)
            assert sorted(st["final"]["site_accuracy"]) == sorted(SITES)
            for s in SITES:
                assert st["final"]["site_accuracy"][s] == pytest.approx(sim["final"]["site_accuracy"][s], abs=1e-9)
    finally:
        sb.stop()
    n = JobSpec.from_dict(jobs["spec"]).plan.task.param_count()
    refusals = [json.loads(line) for line in (sb.root / "sites" / CAPPED / "state" / "refusals.jsonl").read_text().splitlines()]
    assert refusals and all(r["job"] == "sim-0-spec" and f"has {n:,} parameters; this site's policy allows at most {CAP:,}" in r["reason"]
                            for r in refusals)
