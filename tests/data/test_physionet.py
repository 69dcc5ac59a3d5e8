"""PhysioNet 2012 loader: the raw format's quirks on small files written here, then the real archives."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from insitu.data import physionet as P
from insitu.data.partition import Partition
from insitu.errors import ConfigError, DataError

from .physionet_files import OUTCOMES, QUIRKY, record_text, write_set

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "physionet2012"
V = len(P.FEATURES)
HR, WEIGHT, PH, GCS = (P.TIME_SERIES.index(n) for n in ("HR", "Weight", "pH", "GCS"))
AGE, HEIGHT = len(P.TIME_SERIES), len(P.TIME_SERIES) + 2


def test_quirks_of_the_raw_format(tmp_path):
    raw = P.read_set(write_set(tmp_path, "x", QUIRKY, archive=True), "x")
    assert [r.record_id for r in raw.records] == [1001, 1002, 1003]
    assert raw.label.tolist() == [0, 1, 0]
    assert np.isnan(raw.saps[1]) and raw.saps[0] == 14 and np.isnan(raw.sofa[2])
    assert raw.dropped_empty_parameter == 1
    assert raw.cleaned == {"HR": 1, "pH": 1}
    r1, r2, r3 = raw.records
    assert r2.minutes.size == 0 and r2.icu_type is P.ICUType.CCU  # descriptor-only
    assert sorted(r3.value[r3.variable == WEIGHT].tolist()) == [79.0, 81.0]
    X = P.featurize(raw)
    assert X.shape == (3, 48, 3 * V) and X.dtype == np.float32
    val, mask, delta = X[..., :V], X[..., V:2 * V], X[..., 2 * V:]
    mu, sd = P.REFERENCE["HR"]
    assert val[0, 0, HR] == pytest.approx((90 - mu) / sd, rel=1e-5)  # mean of 80 and 100
    assert val[0, 2, HR] == pytest.approx((90 - mu) / sd, rel=1e-5)
    assert mask[0, :, HR].nonzero()[0].tolist() == [0, 2]  # HR 0 and HR -1 are not observations
    assert mask[0, :, PH].sum() == 0
    assert delta[0, :5, HR].tolist() == [0, 1, 2, 1, 2]  # hours since the last observation (Che et al.)
    assert mask[0, :, GCS].nonzero()[0].tolist() == [47]
    mu_w, sd_w = P.REFERENCE["Weight"]
    assert val[2, 0, WEIGHT] == pytest.approx((80 - mu_w) / sd_w, rel=1e-5)  # two Weight lines averaged
    assert mask[1, :, : len(P.TIME_SERIES)].sum() == 0 and val[1, :, : len(P.TIME_SERIES)].sum() == 0
    assert mask[1, :, len(P.TIME_SERIES):].sum() == 48 * 6  # static known every hour, height missing
    assert mask[0, :, HEIGHT].all() and not mask[1, :, HEIGHT].any()
    assert delta[1, 47, HEIGHT] == 47 and delta[0, 47, AGE] == 0
    mu_a, sd_a = P.REFERENCE["Age"]
    assert np.allclose(val[0, :, AGE], (70 - mu_a) / sd_a)


def test_archive_and_folder_give_the_same_arrays(tmp_path):
    a = P.featurize(P.read_set(write_set(tmp_path / "tar", "x", QUIRKY, archive=True), "x"))
    b = P.featurize(P.read_set(write_set(tmp_path / "dir", "x", QUIRKY, archive=False), "x"))
    assert np.array_equal(a, b)


def test_bins_are_configurable(tmp_path):
    raw = P.read_set(write_set(tmp_path, "x", QUIRKY, archive=False), "x")
    X = P.featurize(raw, bins=96)
    assert X.shape == (3, 96, 3 * V)
    mask, delta = X[..., V:2 * V], X[..., 2 * V:]
    assert mask[0, :, HR].nonzero()[0].tolist() == [0, 1, 4]  # 00:10, 00:50, 02:05 in half hours
    assert delta[0, 2, HR] == pytest.approx(0.5)
    first24 = P.featurize(raw, bins=24, hours=24)
    assert first24[0, :, V + GCS].sum() == 0  # GCS at 48:00 lies outside the first 24 hours
    with pytest.raises(ConfigError, match="window"):
        P.featurize(raw, hours=72)


@pytest.mark.parametrize("line,match", [
    ("01:00,Lactose,3", "unknown parameter 'Lactose'"),
    ("01:00,HR,fast", "value 'fast' of 'HR' is not a number"),
    ("1:0,HR,80", "time '1:0' is not HH:MM"),
    ("01:00,HR", "three fields"),
    ("03:00,Age,55", "descriptor Age at 03:00"),
    ("00:00,Age,71", "second Age line"),
])
def test_bad_lines_are_named(tmp_path, line, match):
    recs = {1001: record_text(1001, 3, ["00:30,HR,80", line])}
    write_set(tmp_path, "x", recs, archive=True, outcomes=OUTCOMES)
    with pytest.raises(DataError, match=match) as err:
        P.read_set(tmp_path, "x")
    assert "1001.txt line 9" in str(err.value)


def test_structural_errors(tmp_path):
    no_icu = record_text(7, 3, []).replace("00:00,ICUType,3\n", "")
    write_set(tmp_path / "a", "x", {7: no_icu}, archive=False, outcomes=OUTCOMES + "7,1,1,1,1,0\n")
    with pytest.raises(DataError, match="record 7 has no ICUType"):
        P.read_set(tmp_path / "a", "x")
    write_set(tmp_path / "g", "x", {7: record_text(7, 7, [])}, archive=False, outcomes=OUTCOMES + "7,1,1,1,1,0\n")
    with pytest.raises(DataError, match=r"record 7 ICUType: unknown value 7; choose one of 1 \(CCU\)"):
        P.read_set(tmp_path / "g", "x")
    write_set(tmp_path / "b", "x", {9: record_text(9, 3, [])}, archive=False)
    with pytest.raises(DataError, match="record 9 has no row in Outcomes-x.txt"):
        P.read_set(tmp_path / "b", "x")
    write_set(tmp_path / "c", "x", {8: record_text(1001, 3, [])}, archive=False)
    with pytest.raises(DataError, match="RecordID line says 1001, the file name says 8"):
        P.read_set(tmp_path / "c", "x")
    write_set(tmp_path / "d", "x", {1001: "Time;Parameter;Value\n"}, archive=False)
    with pytest.raises(DataError, match="expected 'Time,Parameter,Value'"):
        P.read_set(tmp_path / "d", "x")
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "Outcomes-x.txt").write_text(OUTCOMES)
    with pytest.raises(DataError, match="neither set-x.tar.gz nor a folder set-x/"):
        P.read_set(tmp_path / "e", "x")
    (tmp_path / "e" / "set-x.tar.gz").write_bytes(b"not a tar file")
    with pytest.raises(DataError, match="cannot be read as a gzip tar archive"):
        P.read_set(tmp_path / "e", "x")
    write_set(tmp_path / "f", "x", QUIRKY, archive=False, outcomes=OUTCOMES.replace("1002,-1,2,5,-1,1", "1002,-1,2,5,-1,2"))
    with pytest.raises(DataError, match="In-hospital_death is 2"):
        P.read_set(tmp_path / "f", "x")


def test_partitions_and_validation_split(tmp_path):
    rng = np.random.default_rng(0)
    recs, outs = {}, ["RecordID,SAPS-I,SOFA,Length_of_stay,Survival,In-hospital_death"]
    for i in range(200):
        rid = 2000 + i
        recs[rid] = record_text(rid, 1 + i % 4, [f"0{h}:00,HR,{70 + rng.integers(0, 40)}" for h in range(1, 6)])
        outs.append(f"{rid},10,3,5,-1,{int(i % 5 == 0)}")
    for name in ("p", "q"):
        write_set(tmp_path, name, recs, archive=False, outcomes="\n".join(outs) + "\n")
    d = P.load_physionet(tmp_path, train_sets=("p",), test_sets=("q",), seed=3)
    assert [s.name for s in d.sites] == ["ccu", "csru", "micu", "sicu"]
    assert d.input_shape == (48, 3 * V) and d.num_outputs == 1 and len(d.schema) == 3 * V
    for s in d.sites:
        assert s.n_train + s.X_val.shape[0] == 50 and s.n_test == 50
        assert s.X_val.shape[0] == 10 and s.y_val.sum() > 0  # 20 %, stratified
    d2 = P.load_physionet(tmp_path, train_sets=("p",), test_sets=("q",), seed=3)
    assert all(np.array_equal(a.X_val.numpy(), b.X_val.numpy()) for a, b in zip(d.sites, d2.sites))
    iid = P.load_physionet(tmp_path, "iid", 5, train_sets=("p",), test_sets=("q",))
    assert [s.name for s in iid.sites] == [f"hospital-{i}" for i in range(1, 6)]
    assert sum(s.n_train + s.X_val.shape[0] for s in iid.sites) == 200 and sum(s.n_test for s in iid.sites) == 200
    dirich = P.load_physionet(tmp_path, Partition.parse("dirichlet:0.5"), 3, train_sets=("p",), test_sets=("q",))
    assert sum(s.n_test for s in dirich.sites) == 200
    with pytest.raises(ConfigError, match="natural PhysioNet partition has 4 sites"):
        P.load_physionet(tmp_path, "natural", 3, train_sets=("p",), test_sets=("q",))
    with pytest.raises(ConfigError, match="both training and test"):
        P.load_physionet(tmp_path, train_sets=("p",), test_sets=("p",))


# -- the real archives --------------------------------------------------------------------------------
def test_smoke_read_of_the_real_archive():
    raw = P.read_set(DATA, "a", max_records=60)
    assert len(raw.records) == 60 and raw.records[0].record_id == 132539
    first = raw.records[0]
    assert first.icu_type is P.ICUType.SICU and first.static[0] == 54 and np.isnan(first.static[2])
    outcomes = P.read_outcomes(DATA / "Outcomes-a.txt")
    assert raw.label.tolist() == [outcomes[r.record_id][0] for r in raw.records]
    X = P.featurize(raw)
    assert np.isfinite(X).all() and np.abs(X[..., :V]).max() < 40


def test_reference_constants_are_set_a_statistics():
    """REFERENCE is public: a fixed function of set A, recomputed here from the raw archive."""
    raw = P.read_set(DATA, "a")
    assert len(raw.records) == 4000 and int(raw.label.sum()) == 554
    assert [r.record_id for r in raw.records if r.value.size == 0] == [140501, 140936, 141264]
    stats = P.reference_statistics(raw)
    for name in P.FEATURES:
        assert stats[name] == pytest.approx(P.REFERENCE[name], rel=1e-4, abs=1e-6), name


@pytest.mark.slow
def test_natural_sites_match_the_published_counts():
    d = P.load_physionet(DATA, train_sets=("a",), test_sets=("c",))
    assert d.info["dropped_empty_parameter"] == 2403  # all in set C
    test = {s.name: (s.n_test, int(s.y_test.sum())) for s in d.sites}
    assert test == {"ccu": (602, 71), "csru": (874, 46), "micu": (1376, 291), "sicu": (1148, 177)}
    train = {s.name: s.n_train + s.X_val.shape[0] for s in d.sites}
    assert train == {"ccu": 577, "csru": 874, "micu": 1481, "sicu": 1068}
