"""A deployed EHR job (issue 17 item 5): four ICUs on 127.0.0.1, each holding its own PhysioNet
2012 records, train GRU-D together; the result equals `insitu simulate` on the same records,
plan and site secrets, and the downloaded model answers a risk score at the gateway.

The records are real: the first files of the challenge's sets A, B and C (../shared/data),
written by the test the way PhysioNet ships them into one folder (what `insitu simulate --data`
reads) and split by ICU type into one folder per hospital (what each site's `[data]` names).
"""
from __future__ import annotations

import re
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from insitu.coordinator.jobs import JobSpec
from insitu.data.physionet import ICUType, parse_record
from insitu.net import sandbox

pytestmark = pytest.mark.slow

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "physionet2012"
PER_SET = {"a": 360, "b": 240, "c": 240}  # records read from the start of each archive
ICUS = tuple(t.site for t in ICUType)  # ccu, csru, micu, sicu: the sites' certificate names
JOB = {"name": "ehr-grud", "dataset": "physionet2012", "model": "grud", "rounds": 2, "local_steps": 3,
       "batch_size": 16, "seed": 0, "min_sites": 4, "round_timeout": 120.0}
SECRETS = {s: bytes([i + 7]) * 32 for i, s in enumerate(ICUS)}
#: the same job choosing its final round on the sites' validation splits (the deployed coordinator does what simulate does)
SELECT = {**JOB, "name": "ehr-select", "rounds": 3, "select": "best-val-balanced"}


def write_records(root: Path) -> tuple[Path, dict[str, Path]]:
    """The pooled folder (challenge layout) and one folder per ICU type with only its stays."""
    pooled = root / "physionet"
    sites = {s: root / "hospitals" / s for s in ICUS}
    for name, n in PER_SET.items():
        kept: dict[int, str] = {}
        with tarfile.open(DATA / f"set-{name}.tar.gz", mode="r|gz") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                text = tf.extractfile(m).read().decode()
                rec, _, _ = parse_record(text, m.name)
                kept[rec.record_id] = text
                for d in (pooled, sites[rec.icu_type.site]):
                    (d / f"set-{name}").mkdir(parents=True, exist_ok=True)
                    (d / f"set-{name}" / f"{rec.record_id}.txt").write_text(text)
                if len(kept) >= n:
                    break
        lines = (DATA / f"Outcomes-{name}.txt").read_text().splitlines()
        rows = {int(ln.split(",")[0]): ln for ln in lines[1:]}
        (pooled / f"Outcomes-{name}.txt").write_text("\n".join([lines[0]] + [rows[r] for r in sorted(kept)]) + "\n")
        for s, d in sites.items():
            mine = sorted(int(p.stem) for p in (d / f"set-{name}").glob("*.txt")) if (d / f"set-{name}").is_dir() else []
            (d / f"Outcomes-{name}.txt").write_text("\n".join([lines[0]] + [rows[r] for r in mine]) + "\n")
    return pooled, sites


def use_physionet_records(sb, site: str, folder: Path) -> None:
    """Point a sandbox site's [data] at its own PhysioNet-format folder (a hospital's export)."""
    cfg = sb.root / "sites" / site / "site.toml"
    text = re.sub(r"\[data\]\n(?:[^\[].*\n)*", f'[data]\nsource = "physionet2012"\npath = "{folder}"\n', cfg.read_text())
    cfg.write_text(text)


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    return write_records(tmp_path_factory.mktemp("ehr-records"))


@pytest.fixture(scope="module")
def dep(tmp_path_factory, records, consortium_running):
    _, sites = records
    root = tmp_path_factory.mktemp("ehr-consortium")
    sb = sandbox.create(root, ICUS, approved=[JobSpec.from_dict(j).plan.content_hash() for j in (JOB, SELECT)], fixed_secrets=SECRETS)
    for s in ICUS:
        use_physionet_records(sb, s, sites[s])
    yield from consortium_running(sb, timeout=120)


def test_deployed_grud_job_equals_simulation_on_the_same_records(dep, records, tmp_path):
    from insitu.apps.simulate import simulate
    from insitu.cli import app

    pooled, _ = records
    dep.operator("submit", {"job": JOB})
    st = dep.wait_job(JOB["name"], timeout=300)
    assert st["status"] == "done", st
    assert [r["status"] for r in st["rounds"]] == ["applied"] * 2 and all(sorted(r["participants"]) == sorted(ICUS) for r in st["rounds"])
    sim_dir = tmp_path / "sim"
    sim = simulate(dataset="physionet2012", data=str(pooled), model="grud", rounds=2, local_steps=3, batch_size=16, seed=0,
                   baselines=False, out=str(sim_dir), site_secrets=SECRETS)
    # every site trained on exactly the records simulation gives its ICU type
    # every site trained on exactly the records simulation gives its ICU type
    assert {s["site"]: (s["info"]["n_train"], s["info"]["n_test"]) for s in st["sites"]} == \
        {s: (v["n_train"], v["n_test"]) for s, v in sim["sites"].items()}
    assert st["final"]["site_accuracy"] == pytest.approx(sim["final"]["site_accuracy"], abs=1e-12)
    run = tmp_path / "deployed"
    res = CliRunner().invoke(app, ["job", "model", JOB["name"], "--out", str(run), "--config", str(dep.root / "ops.toml")])
    assert res.exit_code == 0, res.output
    with np.load(run / "model.npz") as dz, np.load(sim_dir / "model.npz") as sz:
        assert dz["params"].shape == sz["params"].shape and np.array_equal(dz["params"], sz["params"])
    assert (run / "task.json").read_text() == (sim_dir / "task.json").read_text()
    # the served model's decision threshold: chosen from the sites' validation answers exactly as simulate chooses it
    import json

    dep_clin = json.loads((run / "summary.json").read_text())["final"]["clinical"]
    sim_clin = sim["final"]["clinical"]
    assert dep_clin["pooled"]["threshold"] == sim_clin["pooled"]["threshold"] != 0.5
    assert dep_clin["pooled"]["threshold_source"] == sim_clin["pooled"]["threshold_source"]
    assert {s: m["threshold"] for s, m in dep_clin["sites"].items() if m["threshold"] is not None} == \
        {s: m["threshold"] for s, m in sim_clin["sites"].items() if m["threshold_source"] == "site validation"}
    MODEL["run"] = run
    MODEL["threshold"] = sim_clin["pooled"]["threshold"]


MODEL: dict[str, Any] = {}


def test_deployed_job_selects_its_round_on_validation_as_simulate_does(dep, records, tmp_path):
    from insitu.apps.simulate import simulate
    from insitu.cli import app

    pooled, _ = records
    dep.operator("submit", {"job": SELECT})
    st = dep.wait_job(SELECT["name"], timeout=300)
    assert st["status"] == "done", st
    # every round scored on validation only; the test splits read once, for the chosen model
    assert all(r["evaluation"]["split"] == "val" and isinstance(r["evaluation"]["score"], float) for r in st["rounds"])
    sim_dir = tmp_path / "sim"
    sim = simulate(dataset="physionet2012", data=str(pooled), model="grud", rounds=3, local_steps=3, batch_size=16, seed=0,
                   select="best-val-balanced", baselines=False, out=str(sim_dir), site_secrets=SECRETS)
    scores = [r["evaluation"]["score"] for r in st["rounds"]]
    import json

    sim_scores = [json.loads(line)["val_score"] for line in (sim_dir / "rounds.jsonl").read_text().splitlines()]
    assert scores == pytest.approx(sim_scores, abs=1e-12)  # the same validation answers, round by round
    assert st["final"]["selected_round"] == sim["final"]["selected_round"] == 1 + scores.index(max(scores))
    assert st["final"]["selection"]["value"] == pytest.approx(sim["final"]["selection"]["value"], abs=1e-12)
    assert st["final"]["site_accuracy"] == pytest.approx(sim["final"]["site_accuracy"], abs=1e-12)
    run = tmp_path / "deployed"
    res = CliRunner().invoke(app, ["job", "model", SELECT["name"], "--out", str(run), "--config", str(dep.root / "ops.toml")])
    assert res.exit_code == 0, res.output
    with np.load(run / "model.npz") as dz, np.load(sim_dir / "model.npz") as sz:
        assert np.array_equal(dz["params"], sz["params"])  # the chosen round's model (round 1 of 3 with these secrets)


def test_gateway_serves_the_deployed_model_a_risk_for_a_48_hour_series(dep, records, tmp_path, gateway_dir, gateway_predict):
    """`insitu job model` → `insitu gateway serve` (a real process, TLS 1.3) → a risk score for one
    ICU stay's raw observations, equal to the model applied to the loader's own tensor of that stay."""
    import os
    import subprocess
    import sys

    import torch

    from insitu.cli import app
    from insitu.compress.export import load_run_model
    from insitu.data import physionet

    if "run" not in MODEL:
        pytest.skip("needs the deployed job's model from the test before")
    cfg, port = gateway_dir(tmp_path, MODEL["run"], dep.ca, "gateway.icu")
    runner = CliRunner()
    res = runner.invoke(app, ["gateway", "token", "--role", "ai-model", "--subject", "triage-agent", "--ttl", "5m", "--config", str(cfg)])
    assert res.exit_code == 0, res.output
    token = res.stdout.strip()
    pooled, _ = records
    stay = sorted((pooled / "set-c").glob("*.txt"))[0].read_text()
    rec, _, _ = physionet.parse_record(stay, "set-c")
    x = physionet.featurize(physionet.RawSet("c", (rec,), np.zeros(1, np.int64), np.full(1, np.nan), np.full(1, np.nan)))
    model, _ = load_run_model(MODEL["run"])
    with torch.no_grad():
        expected = float(torch.sigmoid(model(torch.from_numpy(x))).reshape(-1)[0])
    body = {"observations": [list(o) for o in physionet.series_rows(stay)]}
    log = open(tmp_path / "gateway.log", "wb")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "insitu", "gateway", "serve", "--config", str(cfg)], stdout=log,
                            stderr=subprocess.STDOUT, env=env)
    try:
        r = gateway_predict(port, body, token, dep.root / "ca" / "ca.pem", proc, tmp_path / "gateway.log")
        assert r.status_code == 200, r.text
        pred = r.json()
        assert pred["risk"] == pytest.approx(expected, abs=1e-5)
        assert pred["threshold"] == MODEL["threshold"] and pred["positive"] == (pred["risk"] >= MODEL["threshold"])
        assert pred["model"]["input"] == "physionet2012" and pred["model"]["model"] == "grud"
        assert sorted(pred["model"]["training_sites"]) == sorted(ICUS) and pred["model"]["rounds"] == 2
        bad = {"observations": body["observations"] + [["12:00", "Lactose", 1.0]]}
        r = gateway_predict(port, bad, token, dep.root / "ca" / "ca.pem", proc, tmp_path / "gateway.log")
        assert r.status_code == 422 and r.json()["field"] == f"body.observations.{len(body['observations'])}.parameter", r.text
    finally:
        proc.terminate()
        proc.wait(20)
