"""From a site's typed records to what a model trains on: ``SiteData`` tensors, the same encoding at
every site because it comes from the shared schema, never from one site's values.

* Feature columns (role ``feature``): integers, floats and booleans become one number each; a
  string column with ``levels`` becomes one indicator per level, in the declared order.  A string
  without levels or a date cannot be a feature (a site would have to invent the encoding).
* The label column: a boolean (two classes), an integer ``0..K-1`` is not allowed without knowing
  K, so use a string with ``levels`` (class index = position) or a boolean.
* Image sources add their pixels; an image schema's features are the pixels alone.
* Missing feature values are refused by default (naming the column and rows); ``Impute.MEAN`` fills
  them with the site's own training mean, ``Impute.ZERO`` with zero.  A missing label is refused.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import numpy as np
import pandas as pd
import torch

from insitu.data.dataset import FederatedData, SiteData
from insitu.data.sources import ColumnSpec, ColumnType, RecordSchema, Records, Role
from insitu.errors import ConfigError, DataError


class Impute(StrEnum):
    REFUSE = "refuse"
    MEAN = "mean"
    ZERO = "zero"


@dataclass(frozen=True)
class Encoding:
    """What the schema says a model sees: feature names, input shape and number of classes."""

    features: tuple[str, ...]
    input_shape: tuple[int, ...]
    num_classes: int
    label: ColumnSpec


def encoding(schema: RecordSchema) -> Encoding:
    """The model-facing layout a schema implies; the same at every site that holds this schema."""
    labels = schema.with_role(Role.LABEL)
    if not labels:
        raise ConfigError("the schema declares no label column (role = \"label\"); a model needs one")
    label = labels[0]
    if label.type is ColumnType.BOOLEAN:
        classes = 2
    elif label.type is ColumnType.STRING and label.levels:
        classes = len(label.levels)
    else:
        raise ConfigError(f"label column {label.name!r} must be a boolean or a string with levels "
                          "(the classes, in order), so every site numbers the classes alike")
    if schema.pixels is not None:
        return Encoding(("image",), schema.pixels.shape, classes, label)
    names: list[str] = []
    for c in schema.with_role(Role.FEATURE):
        if c.type in (ColumnType.INTEGER, ColumnType.FLOAT, ColumnType.BOOLEAN):
            names.append(c.feature)
        elif c.type is ColumnType.STRING and c.levels:
            names.extend(f"{c.feature}={lvl}" for lvl in c.levels)
        else:
            raise ConfigError(f"feature column {c.name!r} is a {c.type.value}"
                              + (" without levels" if c.type is ColumnType.STRING else "")
                              + "; a feature must be a number, a boolean or a string with declared levels")
    if not names:
        raise ConfigError("the schema declares no feature column (role = \"feature\")")
    return Encoding(tuple(names), (len(names),), classes, label)


def _matrix(frame: pd.DataFrame, schema: RecordSchema) -> np.ndarray:
    cols = []
    for c in schema.with_role(Role.FEATURE):
        s = frame[c.name]
        if c.type is ColumnType.STRING:
            for lvl in c.levels or ():
                cols.append(np.where(s.isna(), np.nan, (s == lvl).fillna(False).astype(float)))
        else:
            cols.append(pd.to_numeric(s.astype("Float64"), errors="coerce").to_numpy(float, na_value=np.nan))
    return np.column_stack(cols).astype(np.float64)


def site_data(records: Records, schema: RecordSchema, name: str, *, test_fraction: float = 0.3, seed: int = 0,
              impute: Impute = Impute.REFUSE, standardize: bool = True) -> SiteData:
    """One site's records (as ``read_dataset`` returns them) as train and test tensors.

    The split is stratified by label and seeded; ``standardize`` z-scores tabular features with the
    site's own training statistics (FLamby's convention; images are already scaled to [-1, 1]).
    """
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"test_fraction must be between 0 and 1, got {test_fraction}")
    enc = encoding(schema)
    frame = records.frame
    lab = frame[enc.label.name]
    if lab.isna().any():
        rows = np.flatnonzero(lab.isna().to_numpy()) + 1
        raise DataError(f"{name}: label column {enc.label.name!r} is empty in {len(rows)} row(s), "
                        f"first at data row(s) {', '.join(map(str, rows[:5]))}")
    if enc.label.type is ColumnType.BOOLEAN:
        y = lab.astype(bool).to_numpy().astype(np.int64)
    else:
        index = {lvl: i for i, lvl in enumerate(enc.label.levels or ())}
        y = lab.map(index).to_numpy().astype(np.int64)
    if schema.pixels is not None:
        if records.pixels is None:
            raise DataError(f"{name}: the schema declares [pixels] but the source gave no images")
        X = np.asarray(records.pixels, dtype=np.float32)
    else:
        X = _matrix(frame, schema)
    rng = np.random.default_rng(seed)
    test = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        test[idx[: int(round(len(idx) * test_fraction))]] = True
    if test.all() or not test.any():
        raise DataError(f"{name}: {len(y)} record(s) are too few to split into train and test")
    Xtr, Xte = X[~test], X[test]
    if schema.pixels is None:
        missing = np.isnan(Xtr).any(axis=0) | np.isnan(Xte).any(axis=0)
        if missing.any():
            if impute is Impute.REFUSE:
                raise DataError(f"{name}: feature(s) {[enc.features[i] for i in np.flatnonzero(missing)]} have "
                                f"empty values; fill them at the source or pass impute=Impute.MEAN or Impute.ZERO")
            fill = np.nan_to_num(np.nanmean(np.where(np.isnan(Xtr), np.nan, Xtr), axis=0)) \
                if impute is Impute.MEAN else np.zeros(Xtr.shape[1])
            Xtr = np.where(np.isnan(Xtr), fill, Xtr)
            Xte = np.where(np.isnan(Xte), fill, Xte)
        if standardize:
            mu, sd = Xtr.mean(axis=0), Xtr.std(axis=0)
            sd = np.where(sd > 0, sd, 1.0)
            Xtr, Xte = (Xtr - mu) / sd, (Xte - mu) / sd
    return SiteData(name, torch.tensor(Xtr, dtype=torch.float32), torch.tensor(y[~test], dtype=torch.float32),
                    torch.tensor(Xte, dtype=torch.float32), torch.tensor(y[test], dtype=torch.float32))


def federated_data(sites: list[SiteData], schema: RecordSchema, name: str = "records") -> FederatedData:
    """Sites that hold the same schema, as one ``FederatedData`` for the round engine."""
    enc = encoding(schema)
    for s in sites:
        if tuple(s.X_train.shape[1:]) != enc.input_shape:
            raise DataError(f"site {s.name} has inputs of shape {tuple(s.X_train.shape[1:])}; the schema implies "
                            f"{enc.input_shape}")
    return FederatedData(name, tuple(sites), enc.input_shape, enc.num_classes, enc.features)


__all__ = ["Encoding", "Impute", "encoding", "federated_data", "site_data"]
