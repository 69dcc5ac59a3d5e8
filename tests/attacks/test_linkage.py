"""Linkage attack on heart records: who is re-identified from a release, before and after generalising."""
from __future__ import annotations

import pandas as pd
import pytest

from insitu.attacks.linkage import linkage_attack
from insitu.errors import DataError

QI = ["age", "sex", "hospital", "trestbps", "chol"]


@pytest.fixture(scope="module")
def frame():
    from insitu.data.heart import load_heart_frame

    return load_heart_frame()


def test_raw_release_is_mostly_reidentified(frame):
    aux = frame[["id", *QI]]  # e.g. a registry that holds names and these values
    release = frame.sample(200, random_state=0)
    res = linkage_attack(release.drop(columns="id"), aux, QI, identity="id", truth=release["id"])
    assert res.rate > 0.9
    assert res.n_correct <= res.n_unique <= res.n_released == 200


def test_generalised_release_is_much_harder(frame):
    aux = frame[["id", *QI]]
    release = frame.sample(200, random_state=0)
    g = pd.DataFrame({
        "age": [f"{a // 10 * 10}-{a // 10 * 10 + 9}" for a in release["age"].astype(int)],
        "sex": release["sex"].to_numpy(),
        "hospital": release["hospital"].to_numpy(),
        "trestbps": "*",
        "chol": [pd.Interval(c // 100 * 100, c // 100 * 100 + 100, closed="left") for c in release["chol"]],
    })
    res = linkage_attack(g, aux, QI, identity="id", truth=release["id"])
    assert res.rate < 0.05
    assert res.expected_rate < 0.2


def test_range_and_prefix_generalisations_match_what_they_cover():
    aux = pd.DataFrame({"id": [1, 2, 3], "age": [39, 40, 50], "zip": ["02139", "02141", "10001"]})
    rel = pd.DataFrame({"age": ["[40, 50)", "40-50", "*"], "zip": ["021**", "021**", "100*"]})
    res = linkage_attack(rel, aux, ["age", "zip"], identity="id", truth=[2, 2, 3])
    # row 0: [40,50) excludes 50 and 39 → only id 2; row 1: 40-50 inclusive with zip 021 → id 2; row 2 → id 3
    assert res.n_correct == 3


def test_missing_columns_are_named():
    with pytest.raises(DataError, match=r"lacks quasi-identifier column\(s\) \['zip'\]"):
        linkage_attack(pd.DataFrame({"age": [1]}), pd.DataFrame({"id": [1], "age": [1], "zip": [1]}), ["age", "zip"], identity="id", truth=[1])
