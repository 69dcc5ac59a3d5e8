"""What a release gives away beyond its cells, attacked with and without each defence.

- token length -> diagnosis: succeeds on unpadded tokens, no better than the majority guess on padded ones;
- row position -> hidden visit date (and the date shift): succeeds on a release in source order of a
  date-sorted source, Spearman ~ 0 on the keyed random order;
- visit intervals -> patient: singles out most multi-visit patients on exact intervals, fewer with
  coarsening; the report's rates match an independent recount on the released table.
"""
from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest

from insitu.attacks.linkage import interval_linkage_attack, row_position_attack, token_length_attack
from insitu.data.sources import RecordSchema, conform
from insitu.deid import DeidPolicy, FieldKeyring, Pseudonymizer, decrypt_frame, deidentify
from insitu.deid.fieldcrypt import unpadded_tokens
from insitu.deid.release import DateCoarsening, coarsen, release_order, singling_out
from insitu.errors import ConfigError, DataError

from .helpers import POLICY, SCHEMA, visits

SECRET = bytes(range(32))
NONCE = bytes(16)
#: ICD-10 codes of different lengths, unevenly common: what made token length informative
CODES = ["I10", "E11.9", "J45.909", "C50.911", "F32.A", "Z00.00", "M54.5", "K21.9", "E78.5", "N39.0"]
WEIGHTS = np.array([22, 14, 12, 10, 10, 9, 8, 7, 5, 3], float) / 100


def _schema() -> RecordSchema:
    s = copy.deepcopy(SCHEMA)
    s["columns"]["note"] = {"role": "sensitive", "type": "string"}
    return RecordSchema.from_dict(s)


def _policy(coarsening: str = "none", note_bytes: int = 40, **deid) -> DeidPolicy:
    p = copy.deepcopy(POLICY)
    p["deid"].update({"date_coarsening": coarsening, **deid})
    p["sensitive"]["note"] = {"encrypt": True, "diversity": False, "max_bytes": note_bytes}
    return DeidPolicy.from_dict(p)


def _source(n: int = 1500, seed: int = 3) -> pd.DataFrame:
    """Visits sorted by visit date (as an export ordered by date is), diagnoses of varied length."""
    raw = visits(n, seed=seed)
    rng = np.random.default_rng(seed)
    raw["diagnosis"] = rng.choice(CODES, size=n, p=WEIGHTS)
    raw["note"] = [("follow-up " * int(k))[:40] for k in rng.integers(0, 5, size=n)]
    raw = raw.sort_values("visit_date", kind="stable").reset_index(drop=True)
    return conform(raw, _schema())


@pytest.fixture(scope="module")
def source() -> pd.DataFrame:
    return _source()


@pytest.fixture(scope="module")
def release(source):
    ring = FieldKeyring.generate()
    return deidentify(source, _schema(), _policy(), SECRET, keyring=ring, release_nonce=NONCE), ring


# -- 1. fixed-length tokens -----------------------------------------------------------------------
def test_token_length_is_constant_per_column(release, source):
    res, ring = release
    out = res.frame
    for col in ("diagnosis", "note"):
        assert out[col].str.len().nunique() == 1, col
        assert out[col].str.len().iloc[0] == res.report.tokens[col]["token_chars"]
    assert res.report.tokens["diagnosis"]["max_bytes"] == 64 and res.report.tokens["note"]["max_bytes"] == 40
    assert out["diagnosis"].str.len().iloc[0] != out["note"].str.len().iloc[0]  # per column, not global
    plain = decrypt_frame(out, ["diagnosis", "note"], "mrn", ring)  # the length prefix makes decryption exact
    src = source.iloc[res.source_rows].reset_index(drop=True)
    assert plain["diagnosis"].tolist() == src["diagnosis"].tolist()
    assert plain["note"].tolist() == src["note"].tolist()


def test_token_length_attack_succeeds_unpadded_and_fails_padded(release, source):
    res, ring = release
    truth = source["diagnosis"].to_numpy()[res.source_rows]
    unpadded = unpadded_tokens(truth, "diagnosis", res.frame["mrn"].tolist(), ring)
    before = token_length_attack(unpadded, truth)
    after = token_length_attack(res.frame["diagnosis"], truth)
    assert before.distinct_lengths >= 3 and before.accuracy > before.majority_rate + 0.15
    assert after.distinct_lengths == 1 and after.accuracy <= after.majority_rate + 0.02


def test_value_longer_than_the_declared_maximum_is_refused_naming_the_column_only(source):
    long = source.copy()
    long.loc[7, "note"] = "a very private note that runs well past forty bytes"
    with pytest.raises(DataError) as exc:
        deidentify(long, _schema(), _policy(), SECRET, keyring=FieldKeyring.generate())
    msg = str(exc.value)
    assert "'note'" in msg and "max_bytes" in msg and "at least 51" in msg and "Nothing was written" in msg
    assert "private" not in msg
    with pytest.raises(ConfigError, match=r"\[sensitive.note\] max_bytes must be an integer in \[1, 65535\]"):
        _policy(note_bytes=0)


# -- 2. keyed random row order -------------------------------------------------------------------
def _spearman(a, b) -> float:
    return float(pd.Series(a).rank().corr(pd.Series(b).rank()))


def test_release_order_does_not_follow_source_order(release, source):
    res, _ = release
    n = len(res.source_rows)
    assert sorted(res.source_rows) == list(range(len(source)))  # a permutation (nothing suppressed here)
    assert abs(_spearman(res.source_rows, np.arange(n))) < 4 / np.sqrt(n)
    assert (res.source_rows == np.arange(n)).mean() < 0.01
    again = deidentify(source, _schema(), _policy(), SECRET, encrypt=False, release_nonce=NONCE)
    assert (again.source_rows == res.source_rows).all()  # the site recomputes it from secret + nonce
    assert res.report.row_order_nonce == NONCE.hex()
    fresh = deidentify(source, _schema(), _policy(), SECRET, encrypt=False)  # default: a fresh nonce
    other_key = deidentify(source, _schema(), _policy(), bytes(32), encrypt=False, release_nonce=NONCE)
    for other in (fresh, other_key):
        assert abs(_spearman(other.source_rows, res.source_rows)) < 4 / np.sqrt(n)


def test_release_order_is_a_keyed_permutation():
    a = release_order(SECRET, NONCE, 10_000)
    assert sorted(a) == list(range(10_000))
    assert (release_order(SECRET, NONCE, 10_000) == a).all()
    assert not (release_order(SECRET, b"\x01" * 16, 10_000) == a).all()
    with pytest.raises(ValueError, match="16 bytes"):
        release_order(SECRET, b"short", 10)


def test_row_position_attack_reads_dates_off_source_order_but_not_keyed_order(release, source):
    res, _ = release
    src = source.iloc[res.source_rows].reset_index(drop=True)
    shift = (res.frame["admitted"] - src["admitted"]).dt.days  # the evaluator's truth
    keyed = row_position_attack(src["visit_date"], shifted=res.frame["admitted"], true_shift_days=shift)
    back = np.argsort(res.source_rows)  # the same release in source order, as before this defence
    in_order = row_position_attack(src["visit_date"].iloc[back], shifted=res.frame["admitted"].iloc[back],
                                   true_shift_days=shift.iloc[back])
    assert in_order.spearman > 0.999 and in_order.median_error_days < 30 and in_order.shift_median_error_days < 30
    assert abs(keyed.spearman) < 0.1
    # no better than guessing without the order (the middle of the span; no shift)
    assert keyed.median_error_days >= 0.9 * keyed.baseline_error_days
    assert keyed.shift_median_error_days >= keyed.shift_baseline_error_days
    assert in_order.shift_median_error_days < 0.5 * in_order.shift_baseline_error_days


# -- 3. interval coarsening ----------------------------------------------------------------------
def test_coarsening_rounds_down_after_the_shift():
    d = pd.Series(pd.to_datetime(["2024-05-15", "2024-05-19", "2024-05-20", None, "2024-12-31"]))
    assert coarsen(d, DateCoarsening.WEEK).dt.strftime("%Y-%m-%d").tolist()[:3] == ["2024-05-13"] * 2 + ["2024-05-20"]
    assert coarsen(d, DateCoarsening.MONTH).iloc[0] == pd.Timestamp("2024-05-01")
    assert coarsen(d, DateCoarsening.QUARTER).iloc[4] == pd.Timestamp("2024-10-01")
    assert coarsen(d, DateCoarsening.YEAR).iloc[4] == pd.Timestamp("2024-01-01")
    assert pd.isna(coarsen(d, DateCoarsening.MONTH).iloc[3])
    with pytest.raises(ConfigError, match="date_coarsening: unknown value 'fortnight'"):
        _policy("fortnight")


def test_singling_out_counts_unique_interval_sequences():
    pid = ["a", "a", "b", "b", "c", "c", "d"]
    days = pd.Series(pd.to_datetime(["2020-01-01", "2020-01-11", "2021-06-01", "2021-06-11",  # a, b: same gap
                                     "2020-03-01", "2020-03-04", "2020-01-01"]))              # c alone; d one visit
    so = singling_out(pid, [days])
    assert (so.multi_visit_patients, so.singled_out) == (3, 1)
    assert singling_out(pid, [coarsen(days, DateCoarsening.YEAR)]).singled_out == 0


def test_singling_out_falls_with_coarsening_and_the_report_matches_the_release(source):
    schema = _schema()
    rates = {}
    for unit in ("none", "week", "month"):
        res = deidentify(source, schema, _policy(unit), SECRET, encrypt=False, release_nonce=NONCE)
        iv = res.report.intervals
        out = res.frame
        # recount on the release as written: day-level dates, and the quasi-identifier date as labelled
        dates = [out["admitted"]]
        if res.report.levels["visit_date"] != "*":
            dates.append(pd.to_datetime(out["visit_date"], errors="coerce"))
        recount = singling_out(out["mrn"], dates)
        assert iv["singling_out"][unit] == pytest.approx(recount.rate)
        assert iv["multi_visit_patients"] == recount.multi_visit_patients > 300
        assert res.report.date_coarsening == iv["applied"] == unit
        rates[unit] = recount.rate
        if unit == "none":
            assert set(iv["singling_out"]) == {u.value for u in DateCoarsening}
            assert list(iv["singling_out"].values()) == sorted(iv["singling_out"].values(), reverse=True)
    assert rates["none"] > 0.9  # exact intervals are a fingerprint
    assert rates["none"] - rates["week"] > 0.05 and rates["week"] - rates["month"] > 0.03


@pytest.mark.parametrize("unit", ["none", "month"])
def test_interval_linkage_attack_falls_with_coarsening(source, unit):
    """The attacker holds every patient's true admission dates and knows the policy, not the shifts."""
    res = deidentify(source, _schema(), _policy(unit), SECRET, encrypt=False, release_nonce=NONCE)
    out = res.frame
    truth = dict(zip(source["mrn"], Pseudonymizer(SECRET).pseudonyms(source["mrn"])))
    attack = interval_linkage_attack(out["mrn"], [out["admitted"]], source["mrn"], [source["admitted"]],
                                     truth=truth, coarsening=unit, max_shift_days=180)
    assert attack.correct == attack.unique  # the true patient always matches: the attack is sound
    if unit == "none":
        assert attack.rate > 0.9
    else:
        exact = res.report.intervals["singling_out"]["none"]
        assert attack.rate < exact - 0.2
