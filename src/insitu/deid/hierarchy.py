"""Generalization hierarchies for quasi-identifiers.

A hierarchy turns a value into ever coarser labels: age 47 -> "45-49" -> "40-49" -> "40-59" -> "*".
The policy lists the levels a site allows, finest first; "*" as the last level lets the attribute
be generalized away entirely.  Each hierarchy works on the *distinct* values of a column (a few
thousand at most) and the caller broadcasts the labels back to rows with integer codes, which is
what keeps generalization of a million rows vectorized.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np
import pandas as pd

from insitu.errors import ConfigError

TOP = "*"
MISSING = "missing"

# HIPAA Safe Harbor: 3-digit ZIP prefixes whose area held fewer than 20,000 people (2000 Census)
# must be reported as "000".
HIPAA_RESTRICTED_ZIP3 = ("036", "059", "063", "102", "203", "556", "692", "790", "821", "823", "830",
                         "831", "878", "879", "884", "890", "893")


class HierarchyKind(StrEnum):
    AGE_BAND = "age_band"
    NUMERIC_BAND = "numeric_band"
    ZIP_PREFIX = "zip_prefix"
    DATE = "date"
    CATEGORY = "category"


class Hierarchy:
    """Levels are indexed 0..n_levels-1, finest first."""

    kind: HierarchyKind
    levels: tuple[Any, ...]

    @property
    def n_levels(self) -> int:
        return len(self.levels)

    def level_name(self, level: int) -> str:
        return str(self.levels[level])

    def generalize(self, uniques: np.ndarray, level: int) -> np.ndarray:
        """Labels (object array of str) for the distinct values ``uniques`` at ``level``."""
        if self.levels[level] == TOP:
            return np.full(len(uniques), TOP, dtype=object)
        return self._generalize(uniques, self.levels[level])

    def _generalize(self, uniques: np.ndarray, level: Any) -> np.ndarray:
        raise NotImplementedError


def _missing(uniques: np.ndarray) -> np.ndarray:
    return pd.isna(pd.Series(uniques, dtype=object)).to_numpy()


@dataclass(frozen=True)
class NumericBand(Hierarchy):
    """Bands of the given widths, aligned at 0; values >= ``top_code`` fold into one "N+" band."""

    levels: tuple[Any, ...]
    top_code: float | None = None
    kind: HierarchyKind = HierarchyKind.NUMERIC_BAND

    def _generalize(self, uniques: np.ndarray, width: Any) -> np.ndarray:
        miss = _missing(uniques)
        x = pd.to_numeric(pd.Series(uniques, dtype=object), errors="coerce").to_numpy(float)
        lo = np.floor(np.where(miss, 0, x) / width) * width
        hi = lo + width - (1 if float(width).is_integer() else 0)
        fmt = (lambda v: str(int(v))) if float(width).is_integer() else (lambda v: f"{v:g}")
        out = np.array([f"{fmt(a)}-{fmt(b)}" for a, b in zip(lo, hi)], dtype=object)
        if self.top_code is not None:
            out[(x >= self.top_code) & ~miss] = f"{fmt(self.top_code)}+"
        out[miss] = MISSING
        return out


@dataclass(frozen=True)
class ZipPrefix(Hierarchy):
    """Keep the first N digits; HIPAA's sparsely populated 3-digit areas become "000"."""

    levels: tuple[Any, ...]
    restricted: tuple[str, ...] = HIPAA_RESTRICTED_ZIP3
    kind: HierarchyKind = HierarchyKind.ZIP_PREFIX

    def _generalize(self, uniques: np.ndarray, digits: Any) -> np.ndarray:
        miss = _missing(uniques)
        text = pd.Series(uniques, dtype=object).astype(str).str.strip().str.zfill(5)
        zip3 = text.str[:3].to_numpy(object)
        prefix = text.str[:digits].to_numpy(object)
        prefix[np.isin(zip3, list(self.restricted))] = "000"[:digits]
        out = np.array([p + TOP * (5 - digits) for p in prefix], dtype=object)
        out[miss] = MISSING
        return out


_DATE_FORMATS = {"day": "%Y-%m-%d", "month": "%Y-%m", "year": "%Y"}


@dataclass(frozen=True)
class DateLevels(Hierarchy):
    """Dates (already shifted per patient) kept to the day, month or year."""

    levels: tuple[Any, ...]
    kind: HierarchyKind = HierarchyKind.DATE

    def _generalize(self, uniques: np.ndarray, unit: Any) -> np.ndarray:
        s = pd.to_datetime(pd.Series(uniques, dtype=object), errors="coerce")
        out = s.dt.strftime(_DATE_FORMATS[unit]).to_numpy(object)
        out[s.isna().to_numpy()] = MISSING
        return out


@dataclass(frozen=True)
class Category(Hierarchy):
    """A categorical value kept as is, then (with "*") removed."""

    levels: tuple[Any, ...] = ("value", TOP)
    kind: HierarchyKind = HierarchyKind.CATEGORY

    def _generalize(self, uniques: np.ndarray, _level: Any) -> np.ndarray:
        miss = _missing(uniques)
        out = pd.Series(uniques, dtype=object).astype(str).to_numpy(object)
        out[miss] = MISSING
        return out


_DEFAULT_LEVELS: dict[HierarchyKind, tuple[Any, ...]] = {
    HierarchyKind.AGE_BAND: (5, 10, 20, TOP),
    HierarchyKind.NUMERIC_BAND: (10, 100, TOP),
    HierarchyKind.ZIP_PREFIX: (3, 2, 1, TOP),
    HierarchyKind.DATE: ("day", "month", "year", TOP),
    HierarchyKind.CATEGORY: ("value", TOP),
}


def build_hierarchy(kind: HierarchyKind, levels: Sequence[Any] | None, options: dict[str, Any],
                    *, column: str) -> Hierarchy:
    """Validate a policy's levels for ``kind`` and build the hierarchy (explicit registry, no lookups by name)."""
    lv = tuple(levels) if levels is not None else _DEFAULT_LEVELS[kind]
    where = f"policy [generalize.{column}]"
    if not lv:
        raise ConfigError(f"{where}: levels is empty")
    if TOP in lv[:-1]:
        raise ConfigError(f"{where}: '*' may only be the last level")
    body = lv[:-1] if lv[-1] == TOP else lv
    allowed = {"top_code"} if kind in (HierarchyKind.AGE_BAND, HierarchyKind.NUMERIC_BAND) else (
        {"restricted_zip3"} if kind is HierarchyKind.ZIP_PREFIX else set())
    extra = set(options) - allowed
    if extra:
        raise ConfigError(f"{where}: option(s) {sorted(extra)} do not apply to hierarchy {kind.value}")
    if kind in (HierarchyKind.AGE_BAND, HierarchyKind.NUMERIC_BAND):
        if not all(isinstance(w, (int, float)) and w > 0 for w in body) or list(body) != sorted(body):
            raise ConfigError(f"{where}: levels must be increasing positive band widths (then optional '*'), got {list(lv)}")
        top = options.get("top_code", 90 if kind is HierarchyKind.AGE_BAND else None)
        return NumericBand(lv, top_code=top, kind=kind)
    if kind is HierarchyKind.ZIP_PREFIX:
        if not all(isinstance(d, int) and 0 <= d <= 3 for d in body) or list(body) != sorted(body, reverse=True):
            raise ConfigError(f"{where}: levels must be decreasing digit counts of at most 3 "
                              f"(HIPAA Safe Harbor keeps 3), then optional '*'; got {list(lv)}")
        restricted = tuple(options.get("restricted_zip3", HIPAA_RESTRICTED_ZIP3))
        return ZipPrefix(lv, restricted=restricted)
    if kind is HierarchyKind.DATE:
        order = list(_DATE_FORMATS)
        if not all(u in _DATE_FORMATS for u in body) or [order.index(u) for u in body] != sorted(order.index(u) for u in body):
            raise ConfigError(f"{where}: levels must come from {order} in that order, then optional '*'; got {list(lv)}")
        return DateLevels(lv)
    if kind is HierarchyKind.CATEGORY:
        if list(body) != ["value"]:
            raise ConfigError(f"{where}: category levels are [\"value\"] or [\"value\", \"*\"], got {list(lv)}")
        return Category(lv)
    raise ConfigError(f"{where}: no hierarchy {kind!r}")  # pragma: no cover - enum is exhaustive


__all__ = ["Category", "DateLevels", "Hierarchy", "HierarchyKind", "NumericBand", "ZipPrefix",
           "HIPAA_RESTRICTED_ZIP3", "TOP", "MISSING", "build_hierarchy"]
