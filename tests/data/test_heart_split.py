"""The heart loader's train/test split is FLamby's, bit for bit, without scikit-learn on the hot path."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from sklearn.model_selection import train_test_split

from insitu.data.heart import HOSPITALS, SITE_NAMES, flamby_split, load_heart, read_heart


def sklearn_split(y: np.ndarray, seed: int = 43) -> tuple[np.ndarray, np.ndarray]:
    """FLamby's call, as the loader made it before (stratified where both classes have > 2 records)."""
    strat = y if np.bincount(y, minlength=2).min() > 2 else None
    tr, te = train_test_split(np.arange(len(y)), train_size=0.66, random_state=seed, stratify=strat)
    return tr, te


@pytest.mark.parametrize("hospital", HOSPITALS)
def test_split_equals_sklearn_on_each_hospital(hospital):
    rec = read_heart()
    y = rec.label[rec.hospital == hospital]
    ours, theirs = flamby_split(y), sklearn_split(y)
    np.testing.assert_array_equal(ours[0], theirs[0])  # same rows, same order
    np.testing.assert_array_equal(ours[1], theirs[1])


def test_loaded_sites_are_built_from_sklearns_split():
    rec = read_heart()
    X, y = rec.features(), rec.label
    for hosp, site in zip(HOSPITALS, load_heart().sites):
        rows = np.flatnonzero(rec.hospital == hosp)
        tr, te = sklearn_split(y[rows])
        raw_tr, raw_te = X[rows][tr], X[rows][te]
        sd = raw_tr.std(0)
        sd[sd < 1e-8] = 1.0
        np.testing.assert_array_equal(site.X_train.numpy(), ((raw_tr - raw_tr.mean(0)) / sd).astype(np.float32))
        np.testing.assert_array_equal(site.X_test.numpy(), ((raw_te - raw_tr.mean(0)) / sd).astype(np.float32))
        np.testing.assert_array_equal(site.y_train.numpy(), y[rows][tr].astype(np.float32))
    assert [s.name for s in load_heart().sites] == list(SITE_NAMES)


@pytest.mark.parametrize("seed", range(40))
def test_split_equals_sklearn_on_random_labels(seed):
    """Sizes 4-400, balanced and skewed, stratified and not (a class with <= 2 records), other seeds."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(4, 400))
    y = (rng.random(n) < rng.choice([0.5, 0.1, 0.9, 1.5 / n, 0.0])).astype(int)
    for s in (43, seed):
        ours, theirs = flamby_split(y, seed=s), sklearn_split(y, seed=s)
        np.testing.assert_array_equal(ours[0], theirs[0])
        np.testing.assert_array_equal(ours[1], theirs[1])


def test_simulate_path_imports_neither_pandas_nor_sklearn():
    code = ("import sys; from insitu.data.heart import load_heart; load_heart(); "
            "print(sorted(m for m in ('pandas', 'sklearn', 'scipy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
