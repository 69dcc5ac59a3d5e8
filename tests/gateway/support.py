"""Test support: a served model in a run directory, a gateway with an injectable clock, tokens."""
from __future__ import annotations

import datetime as dt
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

warnings.filterwarnings("ignore", message=".*httpx2.*")
from fastapi.testclient import TestClient  # noqa: E402

from insitu.audit import AuditLog  # noqa: E402
from insitu.audit.keys import generate_signing_key  # noqa: E402
from insitu.federation.task import TaskSpec  # noqa: E402
from insitu.gateway.app import Gateway, create_app  # noqa: E402
from insitu.gateway.auditing import GroupCommitAudit  # noqa: E402
from insitu.gateway.config import GatewayConfig  # noqa: E402
from insitu.gateway.model import ServedModel  # noqa: E402
from insitu.gateway.policy import PolicyDecisionPoint, Rule  # noqa: E402
from insitu.gateway.records import RecordBody, RecordStore  # noqa: E402
from insitu.gateway.tokens import TokenIssuer, TokenVerifier  # noqa: E402

FEATURES = ("age", "sex", "trestbps", "chol", "fbs", "thalch", "exang", "oldpeak",
            "cp_2", "cp_3", "cp_4", "restecg_1", "restecg_2")
FEATS = {f: 0.25 * (i - 6) for i, f in enumerate(FEATURES)}  # a standardized feature vector
ISSUER = "gateway.test"
T0 = dt.datetime(2026, 11, 25, 10, 0, tzinfo=dt.timezone.utc)  # a Wednesday, mid-morning


class Clock:
    """Injectable clock: tests move time to expire tokens and to step across shifts."""

    def __init__(self, now: dt.datetime = T0):
        self.now = now

    def __call__(self) -> dt.datetime:
        return self.now


def write_run_dir(d: Path, seed: int = 7, epsilon: float | None = 2.5, delta: float | None = 1e-5) -> np.ndarray:
    """What `insitu simulate` leaves: task.json, model.npz, summary.json.  Returns the parameters."""
    d.mkdir(parents=True, exist_ok=True)
    spec = TaskSpec(model="logreg", input_shape=(13,), num_outputs=1, schema=FEATURES, lr=0.1, local_steps=5, batch_size=16)
    params = np.random.default_rng(seed).normal(0, 0.5, 14).astype(np.float32)
    (d / "task.json").write_text(json.dumps(spec.to_meta()))
    np.savez(d / "model.npz", params=params)
    summary: dict[str, Any] = {
        "config": {"strategy": "fedavg"},
        "sites": {s: {"n_train": 100} for s in ("cleveland", "hungary", "switzerland", "va-long-beach")},
        "final": {"rounds_completed": 20, "mean_site_accuracy": 0.71},
    }
    if epsilon is not None:  # as insitu.federation.dp writes it into summary["final"]
        summary["final"].update({"epsilon": epsilon, "delta": delta, "epsilon_per_site": {}})
    (d / "summary.json").write_text(json.dumps(summary))
    return params


def record_body(ward: str = "cardio", **kw: Any) -> dict[str, Any]:
    body = dict(ward=ward, name="Jane Roe", birth_date="1958-03-14", sex="female", diagnosis="stable angina",
                physician_notes="consider angiography", medications=["aspirin 100 mg"], allergies=["penicillin"],
                care_notes="fall risk at night", mobility="assisted", resting_bp=138, cholesterol=241,
                max_heart_rate=142, fasting_blood_sugar_high=False, exercise_angina=True, st_depression=1.4,
                chest_pain="asymptomatic", rest_ecg="normal")
    body.update(kw)
    return body


@dataclass
class Harness:
    gw: Gateway
    client: TestClient
    issuer: TokenIssuer
    clock: Clock
    audit_path: Path
    audit_key: Ed25519PrivateKey
    params: np.ndarray
    extra: dict[str, Any] = field(default_factory=dict)

    def token(self, role: str, subject: str | None = None, *, ward: str | None = None, shift: str | None = None,
              ttl: dt.timedelta = dt.timedelta(hours=1)) -> str:
        return self.issuer.issue(subject or f"{role}-1", role, ttl, ward=ward, shift=shift, now=self.clock())

    def auth(self, role: str, **kw: Any) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(role, **kw)}"}

    def audit_entries(self) -> list:
        return list(AuditLog.read(self.audit_path).entries())

    def verify_audit(self):
        return AuditLog.read(self.audit_path).verify({"gateway": self.audit_key.public_key()})


def make_harness(tmp: Path, rules: tuple[Rule, ...] = (), tz: str = "UTC", model: bool = True) -> Harness:
    run = tmp / "run"
    params = write_run_dir(run)
    key = Ed25519PrivateKey.generate()
    clock = Clock()
    audit_key = generate_signing_key()
    cfg = GatewayConfig.from_dict({"policy": {"timezone": tz}}, base=tmp)
    gw = Gateway(
        pdp=PolicyDecisionPoint(rules),
        verifier=TokenVerifier(key.public_key(), ISSUER, dt.timedelta(hours=12)),
        store=RecordStore(f"sqlite:///{tmp / 'records.db'}"),
        audit=GroupCommitAudit(AuditLog.open(tmp / "audit.db", audit_key, writer="gateway")),
        model=ServedModel.load(run) if model else None,
        clock=clock,
        tz=cfg.timezone,
    )
    gw.store.put("cardio-0001", RecordBody(**record_body("cardio")), T0)
    gw.store.put("icu-0002", RecordBody(**record_body("icu", name="John Doe", birth_date="1940-07-01", sex="male")), T0)
    h = Harness(gw, TestClient(create_app(gw)), TokenIssuer(key, ISSUER, dt.timedelta(hours=12)), clock,
                tmp / "audit.db", audit_key, params)
    return h
