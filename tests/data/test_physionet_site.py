"""A deployed ICU's own PhysioNet-format records (``[data] source = "physionet2012"``) are exactly
the records ``insitu simulate --dataset physionet2012`` gives its site."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from insitu.data.physionet import ICUType, load_physionet, load_site, read_set, site_from_config, task_shape
from insitu.errors import ConfigError, DataError

from .physionet_files import write_cohort


def _same(a, b) -> None:
    for part in ("X_train", "y_train", "X_val", "y_val", "X_test", "y_test"):
        assert torch.equal(getattr(a, part), getattr(b, part)), part


def test_shipped_layout_filtered_to_one_icu_equals_the_simulated_site(tmp_path):
    root = write_cohort(tmp_path / "pn", per_set=80)
    fed = load_physionet(root, seed=3)
    for k, icu in enumerate(ICUType):
        site = load_site(root, icu.site, icu_type=icu.site, seed=3)
        _same(site, fed.sites[k])
        assert site.n_train > 0 and site.X_val.shape[0] > 0 and site.n_test == 20
    assert tuple(fed.input_shape) == task_shape()[0] and fed.schema == task_shape()[2]


def test_a_hospitals_own_export_of_one_icu_type_needs_no_filter(tmp_path):
    """An export holding only this hospital's stays (the files rewritten, not the shipped archive)."""
    root = write_cohort(tmp_path / "pn", per_set=40)
    own = tmp_path / "csru"
    for s in ("a", "b", "c"):
        raw = read_set(root, s)
        keep = {r.record_id for r in raw.records if r.icu_type is ICUType.CSRU}
        (own / f"set-{s}").mkdir(parents=True)
        import tarfile

        with tarfile.open(root / f"set-{s}.tar.gz") as tf:
            for m in tf.getmembers():
                rid = int(m.name.rsplit("/", 1)[-1].split(".")[0])
                if rid in keep:
                    (own / f"set-{s}" / f"{rid}.txt").write_bytes(tf.extractfile(m).read())
        lines = (root / f"Outcomes-{s}.txt").read_text().splitlines()
        (own / f"Outcomes-{s}.txt").write_text("\n".join([lines[0]] + [ln for ln in lines[1:] if int(ln.split(",")[0]) in keep]) + "\n")
    _same(site_from_config({"path": str(own)}, "csru"), load_site(root, "csru", icu_type=2))


def test_site_config_errors_name_the_key(tmp_path):
    root = write_cohort(tmp_path / "pn", per_set=8)
    with pytest.raises(ConfigError, match="needs path"):
        site_from_config({})
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['hospital'\]"):
        site_from_config({"path": str(root), "hospital": "x"})
    with pytest.raises(ConfigError, match="icu_type: unknown value 'neuro'"):
        site_from_config({"path": str(root), "icu_type": "neuro"})
    with pytest.raises(ConfigError, match="train_sets must be a list"):
        site_from_config({"path": str(root), "train_sets": [1]})
    with pytest.raises(ConfigError, match="both training and test"):
        site_from_config({"path": str(root), "test_sets": ["a"]})
    shutil.rmtree(tmp_path / "pn")
    with pytest.raises(DataError, match="does not exist"):
        site_from_config({"path": str(root)})


def test_a_set_without_this_icus_stays_is_skipped(tmp_path):
    root = write_cohort(tmp_path / "pn", sets=("a", "c"), per_set=16)
    write_cohort(root, sets=("b",), per_set=2, seed=1)  # set B holds only coronary-care and cardiac-surgery stays
    site = load_site(root, "sicu", icu_type="sicu")
    assert site.n_train + site.X_val.shape[0] == 4 and site.n_test == 4
