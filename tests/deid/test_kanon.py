"""k-anonymity and l-diversity hold on every output, checked independently with pandas."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from insitu.data.sources import RecordSchema, conform
from insitu.deid import DeidPolicy, deidentify
from insitu.deid.hierarchy import HierarchyKind, build_hierarchy
from insitu.deid.kanon import risk
from insitu.errors import PolicyViolation

from .helpers import POLICY, SCHEMA, visits

SECRET = bytes(range(32))
QI_FEATURES = ["age", "zip", "sex", "visit_date"]


def _check_output(out: pd.DataFrame, k: int, l: int) -> None:
    if out.empty:
        return
    g = out.groupby(QI_FEATURES, dropna=False)
    assert g.size().min() >= k
    assert g["mrn"].nunique().min() >= k  # k distinct patients, not k visits of one
    if l > 1:
        assert g["diagnosis"].nunique(dropna=False).min() >= l


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 250), seed=st.integers(0, 10_000), k=st.integers(2, 8), l=st.integers(1, 3),
       max_suppression=st.sampled_from([0.0, 0.02, 0.1, 0.3]), capped=st.booleans())
def test_k_anonymity_and_l_diversity_hold_on_random_data(n, seed, k, l, max_suppression, capped):
    schema = RecordSchema.from_dict(SCHEMA)
    raw = conform(visits(n, seed=seed), schema)
    rng = np.random.default_rng(seed)
    raw.loc[rng.random(n) < 0.05, "age"] = pd.NA  # missing values are a value class of their own
    pol = {**POLICY, "deid": {**POLICY["deid"], "k": k, "l": l, "max_suppression": max_suppression}}
    if capped:  # no "*": the policy forbids generalizing attributes away, so suppression may be refused
        pol = {**pol, "generalize": {**pol["generalize"],
                                     "age": {"hierarchy": "age_band", "levels": [5, 10]},
                                     "zip": {"hierarchy": "zip_prefix", "levels": [3]}}}
    try:
        result = deidentify(raw, schema, DeidPolicy.from_dict(pol), SECRET, encrypt=False)
    except PolicyViolation as exc:
        assert "Nothing was written" in str(exc)
        return
    rep = result.report
    assert rep.suppressed <= max_suppression * n + 1e-9
    assert rep.rows_out == len(result.frame) == n - rep.suppressed
    _check_output(result.frame, k, l if l > 1 else 1)
    if rep.rows_out:
        assert rep.after["k"] >= k and rep.after["prosecutor_max"] <= 1 / k


def test_unreachable_k_is_refused_with_numbers():
    schema = RecordSchema.from_dict(SCHEMA)
    raw = conform(visits(200, seed=1), schema)
    pol = {**POLICY, "deid": {**POLICY["deid"], "k": 50, "max_suppression": 0.01},
           "generalize": {"age": {"hierarchy": "age_band", "levels": [5]},
                          "zip": {"hierarchy": "zip_prefix", "levels": [3]},
                          "sex": {"hierarchy": "category", "levels": ["value"]},
                          "visit_date": {"hierarchy": "date", "levels": ["year"]}}}
    with pytest.raises(PolicyViolation, match=r"k=50.*of 200 records .* max_suppression=1.0%"):
        deidentify(raw, schema, DeidPolicy.from_dict(pol), SECRET, encrypt=False)


def test_suppression_is_used_and_reported_before_generalizing_away():
    schema = RecordSchema.from_dict(SCHEMA)
    raw = conform(visits(400, seed=2), schema)
    raw.loc[0, "age"] = 17  # one teenager: suppressing that record is cheaper than coarser ages
    pol = {**POLICY, "deid": {**POLICY["deid"], "k": 2, "l": 1, "max_suppression": 0.5}}
    rep = deidentify(raw, schema, DeidPolicy.from_dict(pol), SECRET, encrypt=False).report
    assert rep.suppressed >= 1 and rep.before["uniqueness"] > rep.after["uniqueness"] == 0.0


def test_risk_known_answer():
    # classes of sizes 1, 2, 3
    codes = [np.array([0, 1, 1, 2, 2, 2])]
    sens = [np.array([0, 0, 1, 0, 1, 2])]
    r = risk(codes, sens, k=2)
    assert (r.records, r.classes, r.k, r.l) == (6, 3, 1, 1)
    assert r.uniqueness == pytest.approx(1 / 6)
    assert r.prosecutor_max == 1.0 and r.prosecutor_avg == pytest.approx(3 / 6)
    assert r.share_below_k == pytest.approx(1 / 6)


def test_hierarchies_label_as_documented():
    age = build_hierarchy(HierarchyKind.AGE_BAND, [5, 10, "*"], {}, column="age")
    u = np.array([47, 92, None, 0], dtype=object)
    assert list(age.generalize(u, 0)) == ["45-49", "90+", "missing", "0-4"]
    assert list(age.generalize(u, 1)) == ["40-49", "90+", "missing", "0-9"]
    assert list(age.generalize(u, 2)) == ["*"] * 4
    z = build_hierarchy(HierarchyKind.ZIP_PREFIX, None, {}, column="zip")
    assert list(z.generalize(np.array(["02139", "03601", "2139"], dtype=object), 0)) == ["021**", "000**", "021**"]
    d = build_hierarchy(HierarchyKind.DATE, ["day", "month", "year"], {}, column="d")
    ts = np.array([pd.Timestamp("2021-03-04")], dtype=object)
    assert [d.generalize(ts, i)[0] for i in range(3)] == ["2021-03-04", "2021-03", "2021"]


def test_k_counts_patients_not_visits():
    """Six visits of one patient form a class of one person: record-level k would be fooled."""
    schema = RecordSchema.from_dict(SCHEMA)
    raw = conform(visits(300, seed=4), schema)
    lone = raw.iloc[:6].copy()
    lone["mrn"], lone["age"], lone["zip"] = "4242424", 17, "99999"
    raw = pd.concat([raw, lone], ignore_index=True)
    pol = {**POLICY, "deid": {**POLICY["deid"], "k": 3, "l": 1, "max_suppression": 0.1}}
    result = deidentify(raw, schema, DeidPolicy.from_dict(pol), SECRET, encrypt=False)
    _check_output(result.frame, 3, 1)  # the lone patient's class holds >= 3 patients, or it was suppressed
    assert result.report.before["k"] == 1
    codes = [np.zeros(6, dtype=np.int64)]
    assert risk(codes, k=3).k == 6 and risk(codes, k=3, people=np.zeros(6, dtype=np.int64)).k == 1
