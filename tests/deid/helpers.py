"""Synthetic visit records and matching schema/policy dicts shared by the deid tests."""
from __future__ import annotations

import numpy as np
import pandas as pd

SCHEMA = {
    "table": "visits",
    "columns": {
        "mrn": {"role": "direct_identifier", "type": "string", "nullable": False},
        "name": {"role": "direct_identifier", "type": "string"},
        "age": {"role": "quasi_identifier", "type": "integer"},
        "zip": {"role": "quasi_identifier", "type": "string"},
        "sex": {"role": "quasi_identifier", "type": "string"},
        "visit_date": {"role": "quasi_identifier", "type": "date"},
        "diagnosis": {"role": "sensitive", "type": "string"},
        "admitted": {"role": "feature", "type": "date"},
        "chol": {"role": "feature", "type": "float"},
        "num": {"role": "label", "type": "integer", "feature": "target"},
    },
}

POLICY = {
    "deid": {"k": 5, "l": 2, "max_suppression": 0.05, "patient_id": "mrn", "date_shift_days": 180},
    "identifiers": {"mrn": "pseudonymize", "name": "drop"},
    "generalize": {
        "age": {"hierarchy": "age_band", "levels": [5, 10, 20, "*"]},
        "zip": {"hierarchy": "zip_prefix", "levels": [3, 2, 1, "*"]},
        "sex": {"hierarchy": "category"},
        "visit_date": {"hierarchy": "date", "levels": ["month", "year", "*"]},
    },
    "sensitive": {"diagnosis": {"encrypt": True, "diversity": True}},
}


def visits(n: int, seed: int = 0) -> pd.DataFrame:
    """Raw (string-typed, as in a CSV export) visits; about three visits per patient."""
    rng = np.random.default_rng(seed)
    pids = rng.integers(10**6, 10**7, size=max(n // 3, 1))
    pid = rng.choice(pids, size=n)
    base = pd.Timestamp("2020-01-01")
    visit = base + pd.to_timedelta(rng.integers(0, 1500, size=n), unit="D")
    return pd.DataFrame({
        "mrn": pid.astype(str),
        "name": ["Patient " + str(x) for x in pid],
        "age": rng.integers(18, 99, size=n).astype(str),
        "zip": rng.choice([f"{z:05d}" for z in rng.integers(1000, 99999, size=60)], size=n),
        "sex": rng.choice(["F", "M"], size=n),
        "visit_date": visit.strftime("%Y-%m-%d"),
        "diagnosis": rng.choice(["I10", "E11", "J45", "C50", "F32"], size=n),
        "admitted": (visit - pd.to_timedelta(rng.integers(0, 10, size=n), unit="D")).strftime("%Y-%m-%d"),
        "chol": rng.normal(200, 30, size=n).round(1).astype(str),
        "num": rng.integers(0, 2, size=n).astype(str),
    })
