"""/predict for every task kind: the request form comes from the served model's task (a PhysioNet
48-hour series, an image), is validated strictly after authentication and the policy, and a
refusal names the field and leaves an audit entry."""
from __future__ import annotations

import datetime as dt
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from insitu.audit import AuditLog
from insitu.audit.keys import generate_signing_key
from insitu.data import physionet
from insitu.federation.task import TaskSpec
from insitu.gateway.app import Gateway, create_app
from insitu.gateway.auditing import GroupCommitAudit
from insitu.gateway.model import ServedModel
from insitu.gateway.policy import PolicyDecisionPoint
from insitu.gateway.records import RecordStore
from insitu.gateway.tokens import TokenIssuer, TokenVerifier
from insitu.learn.models import build_model, get_flat

from .support import ISSUER, T0, Clock, TestClient

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "physionet2012"


def first_records(n: int = 3) -> list[str]:
    out = []
    with tarfile.open(DATA / "set-a.tar.gz", mode="r|gz") as tf:
        for m in tf:
            if m.isfile():
                out.append(tf.extractfile(m).read().decode())
                if len(out) == n:
                    return out
    return out


class Served:
    def __init__(self, tmp: Path, spec: TaskSpec, seed: int = 3):
        run = tmp / "run"
        run.mkdir()
        torch.manual_seed(seed)
        self.net = build_model(spec.model, spec.input_shape, spec.num_outputs, seed=seed)
        (run / "task.json").write_text(json.dumps(spec.to_meta()))
        np.savez(run / "model.npz", params=get_flat(self.net))
        (run / "summary.json").write_text(json.dumps({"config": {"strategy": "fedavg"}, "sites": {s.site: {} for s in physionet.ICUType},
                                                      "final": {"rounds_completed": 2}}))
        key, self.audit_key = Ed25519PrivateKey.generate(), generate_signing_key()
        self.audit_path = tmp / "audit.db"
        self.gw = Gateway(pdp=PolicyDecisionPoint(()), verifier=TokenVerifier(key.public_key(), ISSUER, dt.timedelta(hours=12)),
                          store=RecordStore(f"sqlite:///{tmp / 'records.db'}"),
                          audit=GroupCommitAudit(AuditLog.open(self.audit_path, self.audit_key, writer="gateway")),
                          model=ServedModel.load(run), clock=Clock())
        self.client = TestClient(create_app(self.gw))
        self.issuer = TokenIssuer(key, ISSUER, dt.timedelta(hours=12))

    def auth(self, role: str = "ai-model") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.issuer.issue(role + '-1', role, dt.timedelta(hours=1), now=T0)}"}

    def expected(self, x: np.ndarray) -> float:
        with torch.no_grad():
            return float(torch.sigmoid(self.net.eval()(torch.from_numpy(x).unsqueeze(0))).reshape(-1)[0])

    def outcomes(self) -> list[dict]:
        return [e.details for e in AuditLog.read(self.audit_path).entries() if e.details.get("stage") == "outcome"]


@pytest.fixture(scope="module")
def icu(tmp_path_factory):
    shape, outputs, schema = physionet.task_shape()
    spec = TaskSpec(model="grud", input_shape=shape, num_outputs=outputs, schema=schema, lr=0.002, local_steps=25,
                    batch_size=64, optimizer="adam")
    return Served(tmp_path_factory.mktemp("icu"), spec)


def test_a_real_48_hour_series_gets_the_risk_of_the_loaders_own_tensor(icu):
    for text in first_records(3):
        rec, _, _ = physionet.parse_record(text, "set-a")
        raw = physionet.RawSet("a", (rec,), np.zeros(1, np.int64), np.full(1, np.nan), np.full(1, np.nan))
        x = physionet.featurize(raw)[0]  # what the sites trained on for this stay
        rows = physionet.series_rows(text)
        assert all(p != "RecordID" for _, p, _ in rows)
        r = icu.client.post("/predict", json={"observations": [list(o) for o in rows]}, headers=icu.auth())
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["risk"] == pytest.approx(icu.expected(x), abs=1e-6) and 0 < body["risk"] < 1
        assert body["model"]["input"] == "physionet2012" and body["model"]["model"] == "grud"
    # the object form of a row is the same observation
    rows = physionet.series_rows(first_records(1)[0])
    objs = [{"time": t, "parameter": p, "value": v} for t, p, v in rows]
    a = icu.client.post("/predict", json={"observations": objs}, headers=icu.auth()).json()
    b = icu.client.post("/predict", json={"observations": [list(o) for o in rows]}, headers=icu.auth()).json()
    assert a["risk"] == b["risk"]


def test_threshold_is_the_runs_validation_choice(tmp_path):
    """A simulate run of the ICU task chose its Score 1 threshold on validation data; the gateway says
    positive at that risk, not at 0.5 (a 14 % outcome)."""
    shape, outputs, schema = physionet.task_shape()
    spec = TaskSpec(model="grud", input_shape=shape, num_outputs=outputs, schema=schema, lr=0.002, local_steps=25,
                    batch_size=64, optimizer="adam")
    served = Served(tmp_path, spec)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    summary["final"]["clinical"] = {"pooled": {"threshold": 0.2}}
    (tmp_path / "run" / "summary.json").write_text(json.dumps(summary))
    m = ServedModel.load(tmp_path / "run")
    assert m.card.threshold == 0.2 and served.gw.model.card.threshold == 0.5
    served.gw.model = m
    client = TestClient(create_app(served.gw))
    r = client.post("/predict", json={"observations": BASE}, headers=served.auth())
    assert r.status_code == 200 and r.json()["threshold"] == 0.2 and r.json()["positive"] == (r.json()["risk"] >= 0.2)
    assert r.json()["model"]["threshold"] == 0.2


def test_impossible_values_are_dropped_as_in_training_and_reported(icu):
    rows = [["00:00", "Age", 70], ["00:00", "Gender", 1], ["00:00", "ICUType", 3], ["01:00", "HR", 0], ["02:00", "HR", 90]]
    r = icu.client.post("/predict", json={"observations": rows}, headers=icu.auth())
    assert r.status_code == 200, r.text
    assert r.json()["ignored"] == {"HR": 1}
    x, _ = physionet.featurize_series([tuple(o) for o in rows if o[1] != "HR" or o[2] != 0])
    assert r.json()["risk"] == pytest.approx(icu.expected(x), abs=1e-6)


BASE = [["00:00", "Age", 70], ["00:00", "ICUType", 2], ["00:30", "HR", 88]]


@pytest.mark.parametrize("body,field,words", [
    ({"observations": BASE + [["03:00", "Heartrate", 80]]}, "body.observations.3.parameter", "Input should be"),
    ({"observations": BASE + [["03:00", "RecordID", 132539]]}, "body.observations.3.parameter", "Input should be"),
    ({"observations": BASE + [["49:00", "HR", 80]]}, "body.observations.3.time", "should match pattern"),
    ({"observations": BASE + [["3:00", "HR", 80]]}, "body.observations.3.time", "should match pattern"),
    ({"observations": BASE + [["03:00", "HR", "80"]]}, "body.observations.3.value", "valid number"),
    ({"observations": BASE + [["03:00", "HR"]]}, "body.observations.3", "got 2 element"),
    ({"observations": BASE + [["03:00", "HR", 80, 1]]}, "body.observations.3", "got 4 element"),
    ({"observations": BASE + [["03:00", "HR", 1e9]]}, "body.observations.3.value", "less than or equal"),
    ({"observations": BASE + [["05:00", "Age", 71]]}, "body.observations.3", "descriptor Age at 05:00"),
    ({"observations": BASE + [["00:00", "ICUType", 3]]}, "body.observations.3", "disagrees with the first"),
    ({"observations": BASE[:1]}, "body.observations", "has no ICUType"),
    ({"observations": BASE[:1] + [["00:00", "ICUType", 7]]}, "body.observations", "unknown value 7"),
    ({"observations": []}, "body.observations", "at least 1 item"),
    ({"observations": BASE, "record_id": 5}, "body.record_id", "Extra inputs"),
    ({"features": {"HR": 80}}, "body.observations", "Field required"),
])
def test_malformed_series_refused_422_naming_the_field_and_audited(icu, body, field, words):
    r = icu.client.post("/predict", json=body, headers=icu.auth())
    assert r.status_code == 422, r.text
    assert r.json()["field"] == field, r.json()
    assert words in r.json()["detail"], r.json()["detail"]
    last = icu.outcomes()[-1]
    assert last["status"] == 422 and last["field"] == field and last["path"] == "/predict"
    assert "132539" not in json.dumps(last)  # the audit entry names fields, it does not copy the record


def test_nan_in_a_series_refused(icu):
    raw = '{"observations": [["00:00", "ICUType", 2], ["01:00", "HR", NaN]]}'
    r = icu.client.post("/predict", content=raw, headers={**icu.auth(), "content-type": "application/json"})
    assert r.status_code == 422 and r.json()["field"] == "body.observations.1.value", r.text


def test_series_body_is_read_only_after_authentication_and_policy(icu):
    bad = {"observations": [["99:99", "nonsense", "x"]]}
    r = icu.client.post("/predict", json=bad)
    assert r.status_code == 401
    r = icu.client.post("/predict", json=bad, headers=icu.auth("nurse"))
    assert r.status_code == 403 and "observations" not in r.text


@pytest.fixture(scope="module")
def xray(tmp_path_factory):
    spec = TaskSpec(model="cnn", input_shape=(1, 28, 28), num_outputs=1, schema=("image",), lr=0.001, local_steps=20,
                    batch_size=64, optimizer="adam")
    return Served(tmp_path_factory.mktemp("xray"), spec)


def test_image_task_takes_one_image_of_its_shape(xray):
    img = np.random.default_rng(0).uniform(-1, 1, (1, 28, 28)).astype(np.float32)
    r = xray.client.post("/predict", json={"image": img.tolist()}, headers=xray.auth())
    assert r.status_code == 200, r.text
    assert r.json()["risk"] == pytest.approx(xray.expected(img), abs=1e-5) and r.json()["model"]["input"] == "image"
    short = img[:, :, :27].tolist()
    r = xray.client.post("/predict", json={"image": short}, headers=xray.auth())
    assert r.status_code == 422 and r.json()["field"] == "body.image.0.0" and "at least 28" in r.json()["detail"], r.text
    r = xray.client.post("/predict", json={"image": img[0].tolist()}, headers=xray.auth())
    assert r.status_code == 422 and r.json()["field"] == "body.image" and "at most 1 item" in r.json()["detail"], r.text
    r = xray.client.post("/predict", json={"features": {"image": 1.0}}, headers=xray.auth())
    assert r.status_code == 422 and r.json()["field"] in ("body.image", "body.features"), r.text
    card = xray.client.get("/model", headers=xray.auth()).json()
    assert card["input"] == "image" and card["features"] == ["image"]


def test_a_consortium_defined_model_is_served(tmp_path):
    """A model = "spec" task (layers declared in the plan, no code shipped) is rebuilt from its
    specification and answers like any other."""
    spec = TaskSpec(model="spec", input_shape=(1, 8, 8), num_outputs=1, schema=("image",), lr=0.01, local_steps=5, batch_size=8,
                    model_spec={"layers": [{"type": "conv2d", "out_channels": 2, "kernel_size": 3}, {"type": "relu"},
                                           {"type": "flatten"}, {"type": "linear", "out_features": "outputs"}]})
    run = tmp_path / "run"
    run.mkdir()
    net = spec.build_model(seed=5)
    (run / "task.json").write_text(json.dumps(spec.to_meta()))
    np.savez(run / "model.npz", params=get_flat(net))
    served = ServedModel.load(run)
    img = np.random.default_rng(1).normal(size=(1, 8, 8)).astype(np.float32)
    with torch.no_grad():
        expected = float(torch.sigmoid(net.eval()(torch.from_numpy(img)[None])).reshape(-1)[0])
    assert served.input.kind.value == "image" and served.card.model == "spec"
    assert served.risk(img) == pytest.approx(expected, abs=1e-6)
