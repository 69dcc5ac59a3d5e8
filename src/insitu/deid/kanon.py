"""k-anonymity, l-diversity and re-identification risk, on integer codes with numpy.

Definitions used (El Emam & Dankar 2008, "Protecting privacy using k-anonymity"):

* equivalence class: the records sharing one combination of quasi-identifier values;
* k: the size of the smallest class — counted in distinct *patients* when the table says who the
  patient is (several visits of one person must not make a class look larger than it is);  l (distinct l-diversity): the fewest distinct values of a
  sensitive attribute in any class;
* uniqueness: the share of records alone in their class;
* prosecutor risk: an attacker who knows the target is in the table re-identifies a record of a
  class of size f with probability 1/f; we report the maximum (1/k) and the average over records
  (number of classes / number of records).

Enforcement is greedy bottom-up generalization in the spirit of Datafly, but choosing at each step
the quasi-identifier whose one-level climb leaves the fewest records in failing classes; when the
records still failing are within the policy's suppression allowance they are suppressed (removed).
If every attribute is at its coarsest allowed level and more than the allowance still fails, it
refuses: nothing is written.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from insitu.errors import PolicyViolation

_MAX_KEY = np.int64(2**62)


def class_ids(codes: Sequence[np.ndarray]) -> tuple[np.ndarray, int]:
    """Dense class id per record (0..n_classes-1) for the combination of code arrays."""
    n = len(codes[0]) if codes else 0
    if not codes:
        return np.zeros(n, dtype=np.int64), 1 if n else 0
    key = np.asarray(codes[0], dtype=np.int64)
    card = int(key.max()) + 1 if n else 1
    for c in codes[1:]:
        c = np.asarray(c, dtype=np.int64)
        cc = int(c.max()) + 1 if n else 1
        if card * cc >= _MAX_KEY:
            key = pd.factorize(key)[0].astype(np.int64)
            card = int(key.max()) + 1
        key = key * cc + c
        card *= cc
    dense = pd.factorize(key)[0].astype(np.int64)  # hash-based, O(n); class order is irrelevant
    return dense, int(dense.max()) + 1 if n else 0


def class_sizes(ids: np.ndarray, n_classes: int) -> np.ndarray:
    return np.bincount(ids, minlength=n_classes)


def distinct_per_class(ids: np.ndarray, n_classes: int, sensitive: np.ndarray) -> np.ndarray:
    """Number of distinct sensitive codes in each class."""
    s = np.asarray(sensitive, dtype=np.int64)
    card = int(s.max()) + 1 if len(s) else 1
    pairs = _distinct(ids * card + s)
    return np.bincount(pairs // card, minlength=n_classes)


def _distinct(x: np.ndarray) -> np.ndarray:
    """Sorted distinct values by sort + diff (numpy's hash-based ``unique`` is far slower on wide int64 keys)."""
    s = np.sort(x)
    if len(s) == 0:
        return s
    keep = np.empty(len(s), dtype=bool)
    keep[0] = True
    np.not_equal(s[1:], s[:-1], out=keep[1:])
    return s[keep]


@dataclass(frozen=True)
class RiskReport:
    records: int
    classes: int
    k: int
    l: int | None
    uniqueness: float
    prosecutor_max: float
    prosecutor_avg: float
    share_below_k: float

    def as_dict(self) -> dict[str, float | int | None]:
        return {f: getattr(self, f) for f in self.__dataclass_fields__}


def _sizes(ids: np.ndarray, m: int, people: np.ndarray | None) -> np.ndarray:
    """Class sizes in records, or in distinct people when ``people`` codes are given."""
    return class_sizes(ids, m) if people is None else distinct_per_class(ids, m, people)


def risk(codes: Sequence[np.ndarray], sensitive: Sequence[np.ndarray] = (), *, k: int = 1,
         people: np.ndarray | None = None) -> RiskReport:
    """Risk measures of one table, given its quasi-identifier codes (and sensitive codes for l).

    With ``people`` (a code per record identifying the patient), class sizes count distinct
    patients: five visits of one patient in a class are one person, not k=5.
    """
    n = len(codes[0]) if codes else 0
    if n == 0:
        return RiskReport(0, 0, 0, None, 0.0, 0.0, 0.0, 0.0)
    ids, m = class_ids(codes)
    sizes = _sizes(ids, m, people)
    per_record = sizes[ids]
    l_value = None
    if sensitive:
        l_value = int(min(distinct_per_class(ids, m, s).min() for s in sensitive))
    return RiskReport(
        records=n,
        classes=m,
        k=int(sizes.min()),
        l=l_value,
        uniqueness=float(np.mean(per_record == 1)),
        prosecutor_max=float(1.0 / sizes.min()),
        prosecutor_avg=float(m / n),
        share_below_k=float(np.mean(per_record < k)),
    )


@dataclass(frozen=True)
class Enforcement:
    levels: tuple[int, ...]          # chosen level per quasi-identifier
    keep: np.ndarray                 # bool mask of records kept
    suppressed: int
    steps: tuple[str, ...]           # human-readable trace of the climb


def failing(codes: Sequence[np.ndarray], sensitive: Sequence[np.ndarray], k: int, l: int,
            people: np.ndarray | None = None) -> np.ndarray:
    """Bool mask of records in classes smaller than k (records, or patients) or with fewer than l sensitive values."""
    ids, m = class_ids(codes)
    bad_class = _sizes(ids, m, people) < k
    if l > 1:
        for s in sensitive:
            bad_class |= distinct_per_class(ids, m, s) < l
    return bad_class[ids]


def enforce(level_codes: Sequence[Sequence[np.ndarray]], names: Sequence[str], sensitive: Sequence[np.ndarray],
            *, k: int, l: int, max_suppression: float, people: np.ndarray | None = None) -> Enforcement:
    """Climb the hierarchies until at most ``max_suppression`` of records fail, then suppress them.

    ``level_codes[j][v]`` is the code array of quasi-identifier j at level v (finest first).
    """
    n = len(level_codes[0][0]) if level_codes else len(sensitive[0]) if sensitive else 0
    allowed = int(np.floor(max_suppression * n + 1e-9))
    levels = [0] * len(level_codes)
    steps: list[str] = []

    def bad_count(lv: Sequence[int]) -> tuple[int, np.ndarray]:
        codes = [level_codes[j][v] for j, v in enumerate(lv)] or [np.zeros(n, dtype=np.int64)]
        mask = failing(codes, sensitive, k, l, people)
        return int(mask.sum()), mask

    count, mask = bad_count(levels)
    while count > allowed:
        best: tuple[int, int, int] | None = None  # (count, -cardinality, j)
        for j in range(len(levels)):
            if levels[j] + 1 >= len(level_codes[j]):
                continue
            trial = list(levels)
            trial[j] += 1
            c, _ = bad_count(trial)
            card = int(level_codes[j][levels[j]].max()) + 1
            cand = (c, -card, j)
            if best is None or cand < best:
                best = cand
        if best is None:
            capped = [nm for j, nm in enumerate(names) if int(level_codes[j][levels[j]].max()) > 0]
            advice = (f"allow coarser levels (e.g. '*') for {', '.join(capped)}, raise max_suppression, or lower k/l"
                      if capped else "every quasi-identifier is already generalized away: the table holds too few "
                      "patients (or sensitive values) for this k/l; lower k/l or add records")
            raise PolicyViolation(
                f"k={k}" + (f", l={l}" if l > 1 else "") + f" cannot be reached: at the coarsest levels the "
                f"policy allows, {count} of {n} records ({count / max(n, 1):.1%}) would have to be suppressed, "
                f"more than max_suppression={max_suppression:.1%}. To fix: {advice}. Nothing was written."
            )
        j = best[2]
        levels[j] += 1
        count, mask = bad_count(levels)
        steps.append(f"{names[j]} -> level {levels[j]}: {count} records failing")
    return Enforcement(tuple(levels), ~mask, count, tuple(steps))


__all__ = ["Enforcement", "RiskReport", "class_ids", "distinct_per_class", "enforce", "failing", "risk"]
