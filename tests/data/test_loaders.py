from __future__ import annotations

import numpy as np
import pytest

from insitu.data.heart import FEATURES, load_heart, load_heart_frame
from insitu.data.medmnist import load_medmnist
from insitu.data.partition import Partition, split_indices
from insitu.errors import ConfigError, DataError


def test_heart_matches_flamby_sizes():
    d = load_heart()
    assert d.info["records"] == 740
    assert [(s.n_train, s.n_test) for s in d.sites] == [(199, 104), (172, 89), (30, 16), (85, 45)]
    assert d.input_shape == (13,) and len(FEATURES) == 13


def test_heart_is_standardized_per_site_with_train_statistics():
    for s in load_heart().sites:
        x = s.X_train.numpy()
        m = x.mean(0)
        assert np.all(np.abs(m) < 1e-4)
        sd = x.std(0)
        assert np.all((np.abs(sd - 1) < 1e-3) | (sd < 1e-6))


def test_heart_hospital_counts_after_moving_row_304():
    df = load_heart_frame()
    assert df["hospital"].value_counts().to_dict() == {"Cleveland": 303, "Hungary": 261, "VA Long Beach": 130, "Switzerland": 46}


def test_heart_csv_missing_column(tmp_path):
    df = load_heart_frame()
    p = tmp_path / "bad.csv"
    p.write_text("id,age\n1,2\n")
    with pytest.raises(DataError, match=r"lacks column\(s\) \['sex'"):
        load_heart(p)


def test_heart_csv_non_numeric_value(tmp_path):
    from insitu.data.heart import default_csv

    lines = default_csv().read_text().splitlines()
    cols = lines[0].split(",")
    row = lines[1].split(",")
    row[cols.index("chol")] = "high"
    p = tmp_path / "bad.csv"
    p.write_text("\n".join([lines[0], ",".join(row), *lines[2:]]))
    with pytest.raises(DataError, match="column 'chol' has non-numeric value 'high'"):
        load_heart(p)


def test_partition_parse_errors():
    with pytest.raises(ConfigError, match="partition 'zipf': unknown value 'zipf'; choose one of iid, dirichlet:ALPHA"):
        Partition.parse("zipf")
    with pytest.raises(ConfigError, match="needs a number"):
        Partition.parse("dirichlet:x")
    with pytest.raises(ConfigError, match="positive"):
        Partition.parse("dirichlet:0")


def test_iid_split_sizes_and_coverage():
    labels = np.arange(103) % 2
    parts = split_indices(labels, 4, Partition.parse("iid"), np.random.default_rng(0))
    assert sorted(len(p) for p in parts) == [25, 26, 26, 26]
    assert sorted(np.concatenate(parts).tolist()) == list(range(103))


def test_dirichlet_small_alpha_skews_labels_more_than_large():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 1000)

    def skew(alpha):
        parts = split_indices(labels, 4, Partition.parse(f"dirichlet:{alpha}"), np.random.default_rng(1))
        return np.mean([abs(labels[p].mean() - 0.5) for p in parts])

    assert skew(0.1) > 0.2 > 0.05 > skew(100.0)
    parts = split_indices(labels, 4, Partition.parse("dirichlet:0.5"), rng)
    assert sorted(np.concatenate(parts).tolist()) == list(range(2000))


def test_more_sites_than_records():
    with pytest.raises(ConfigError, match="--sites 50 is more than 20 records"):
        split_indices(np.zeros(20), 50, Partition.parse("iid"), np.random.default_rng(0))


def test_medmnist_partition_covers_official_test_set(pneumonia_npz):
    d = load_medmnist(pneumonia_npz, 4, Partition.parse("dirichlet:0.5"), seed=0)
    assert sum(s.n_train for s in d.sites) == 4690
    assert sum(s.n_test for s in d.sites) == 624
    assert d.input_shape == (1, 28, 28) and d.num_outputs == 1


def test_npz_without_medmnist_arrays(tmp_path):
    p = tmp_path / "x.npz"
    np.savez(p, images=np.zeros((2, 28, 28)))
    with pytest.raises(DataError, match=r"lacks \['train_images'"):
        load_medmnist(p, 2, Partition.parse("iid"))


def test_npz_not_a_zip(tmp_path):
    p = tmp_path / "x.npz"
    p.write_text("hello")
    with pytest.raises(DataError, match="cannot be read"):
        load_medmnist(p, 2, Partition.parse("iid"))


def test_raw_heart_features_are_the_records_and_site_scaling_uses_own_statistics():
    """``raw`` hands the recorded values to a caller that scales them (the DP moments release);
    ``site`` z-scores each site with its own train statistics."""
    from insitu.data.heart import FEATURES, HOSPITALS, _split

    df = load_heart_frame()
    raw, site = load_heart(normalize="raw"), load_heart(normalize="site")
    for h, r, s in zip(HOSPITALS, raw.sites, site.sites):
        tr = _split(df[df["hospital"] == h])[0][list(FEATURES)].to_numpy(float)
        np.testing.assert_allclose(r.X_train.numpy(), tr, rtol=1e-6)
        assert abs(float(s.X_train.numpy().mean(0).max())) < 1e-4
    with pytest.raises(ConfigError, match="normalize: unknown value 'global'"):
        load_heart(normalize="global")


def test_medmnist_validation_split_follows_site_label_mix(pneumonia_npz):
    d = load_medmnist(pneumonia_npz, 4, Partition.parse("dirichlet:0.5"), seed=0)
    assert sum(s.X_val.shape[0] for s in d.sites) == 524
    for s in d.sites:
        tr = s.y_train.numpy().mean()
        if s.X_val.shape[0] >= 20:
            assert abs(s.y_val.numpy().mean() - tr) < 0.25
