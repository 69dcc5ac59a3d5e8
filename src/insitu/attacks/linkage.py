"""Re-identification by linkage: join a de-identified release to a table with names.

Sweeney's attack: a release without names still holds quasi-identifiers (age, sex, hospital,
admission values ...).  An attacker with an auxiliary table holding the same quasi-identifiers
*and* identities (a registry, a voter list, another hospital's export) matches each released row
to the auxiliary rows it is consistent with.  A row is re-identified when exactly one auxiliary
row is consistent with it and that row is the right person.

Released values may be generalised or suppressed by a de-identification policy, so "consistent"
means: the auxiliary value falls in the released interval (``pd.Interval``, ``"40-49"``,
``"[40, 50)"``), matches a masked prefix (``"021**"``), or the released value is suppressed
(``None``, NaN, ``"*"``); otherwise the values must be equal.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Hashable, Sequence

import numpy as np
import pandas as pd

from insitu.errors import DataError

_RANGE = re.compile(r"^\s*([\[(]?)\s*(-?\d+(?:\.\d+)?)\s*(?:-|–|,|\.\.)\s*(-?\d+(?:\.\d+)?)\s*([\])]?)\s*$")
_TOP_CODED = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*\+\s*$")
_SUPPRESSED = {"", "*", "**", "suppressed", "nan", "none", "<na>", "?"}


@dataclass(frozen=True)
class LinkageResult:
    """``rate``: share of released rows pinned to exactly the right person."""

    n_released: int
    n_unique: int  # rows consistent with exactly one auxiliary row
    n_correct: int  # ... and that row is the right person
    expected_rate: float  # mean over rows of 1/|consistent rows| when the right person is among them
    quasi_identifiers: tuple[str, ...]

    @property
    def rate(self) -> float:
        return self.n_correct / self.n_released if self.n_released else 0.0


def _is_suppressed(v: Any) -> bool:
    if v is None:
        return True
    if isinstance(v, float) and np.isnan(v):
        return True
    return isinstance(v, str) and v.strip().lower() in _SUPPRESSED


def _consistent(aux: pd.Series, released: Any) -> np.ndarray:
    """Which auxiliary values a released (possibly generalised) value is consistent with."""
    if _is_suppressed(released):
        return np.ones(len(aux), dtype=bool)
    if isinstance(released, pd.Interval):
        num = pd.to_numeric(aux, errors="coerce")
        return np.asarray(num.map(lambda v: pd.notna(v) and v in released), dtype=bool)
    if isinstance(released, str):
        m = _RANGE.match(released)
        if m:
            lo, hi = float(m.group(2)), float(m.group(3))
            num = pd.to_numeric(aux, errors="coerce").to_numpy(dtype=float)
            lo_ok = num > lo if m.group(1) == "(" else num >= lo
            hi_ok = num < hi if m.group(4) == ")" else num <= hi
            return np.asarray(lo_ok & hi_ok, dtype=bool)
        m = _TOP_CODED.match(released)
        if m:  # "90+": top-coded
            return np.asarray(pd.to_numeric(aux, errors="coerce").to_numpy(dtype=float) >= float(m.group(1)), dtype=bool)
        if released.endswith("*"):
            prefix = released.rstrip("*")
            return np.asarray(aux.astype(str).str.startswith(prefix), dtype=bool)
        try:
            released = float(released)  # a number that travelled as text ("1" for sex = 1)
        except ValueError:
            return np.asarray(aux.astype(str) == released, dtype=bool)
    if isinstance(released, (int, float, np.integer, np.floating)) and not isinstance(released, bool):
        num = pd.to_numeric(aux, errors="coerce").to_numpy(dtype=float)
        return np.isclose(num, float(released), rtol=0, atol=1e-9)
    return np.asarray(aux.astype(str) == str(released), dtype=bool)


def linkage_attack(
    release: pd.DataFrame,
    auxiliary: pd.DataFrame,
    quasi_identifiers: Sequence[str],
    *,
    identity: str,
    truth: Sequence[Hashable],
) -> LinkageResult:
    """Link every released row to the auxiliary rows consistent with it on the quasi-identifiers.

    ``identity`` names the auxiliary table's identity column; ``truth`` gives, for scoring only,
    the true identity of each released row (the attacker never sees it).
    """
    qi = tuple(quasi_identifiers)
    if not qi:
        raise DataError("a linkage attack needs at least one quasi-identifier column")
    for name, frame in (("release", release), ("auxiliary table", auxiliary)):
        missing = [c for c in qi if c not in frame.columns]
        if missing:
            raise DataError(f"the {name} lacks quasi-identifier column(s) {missing}; it has {list(frame.columns)}")
    if identity not in auxiliary.columns:
        raise DataError(f"the auxiliary table has no identity column {identity!r}")
    truth = list(truth)
    if len(truth) != len(release):
        raise DataError(f"{len(truth)} true identities for {len(release)} released rows; give one per row")
    ids = auxiliary[identity].to_numpy()
    cache: dict[tuple, np.ndarray] = {}
    n_unique = n_correct = 0
    expected = 0.0
    rel = release[list(qi)].reset_index(drop=True)
    for i, row in enumerate(rel.itertuples(index=False, name=None)):
        key = tuple(("∅",) if _is_suppressed(v) else (type(v).__name__, str(v)) for v in row)
        mask = cache.get(key)
        if mask is None:
            mask = np.ones(len(auxiliary), dtype=bool)
            for col, v in zip(qi, row):
                mask &= _consistent(auxiliary[col], v)
            cache[key] = mask
        cands = ids[mask]
        hit = truth[i] in set(cands.tolist())
        if hit:
            expected += 1.0 / len(cands)
        if len(cands) == 1:
            n_unique += 1
            n_correct += int(hit)
    n = len(release)
    return LinkageResult(n, n_unique, n_correct, expected / n if n else 0.0, qi)


@dataclass(frozen=True)
class ReidentificationRisk:
    """The same linkage attack against the raw records and against the policy's output."""

    before: LinkageResult
    after: LinkageResult
    suppressed: int  # records the policy removed (they cannot be linked, and are not released)
    policy_k: int


def reidentification_before_after(
    frame: pd.DataFrame,
    auxiliary: pd.DataFrame,
    quasi_identifiers: Sequence[str],
    *,
    identity: str,
    schema: Any,
    policy: Any,
    secret: bytes,
) -> ReidentificationRisk:
    """Run :func:`linkage_attack` on ``frame`` as is and after ``insitu.deid.deidentify``.

    ``identity`` must be the schema's pseudonymised patient id: the evaluator (who holds the
    site secret) maps pseudonyms back to true identities for scoring; the attacker never does.
    """
    from insitu.deid import Pseudonymizer, deidentify

    before = linkage_attack(frame.drop(columns=[identity]), auxiliary, quasi_identifiers, identity=identity, truth=frame[identity])
    res = deidentify(frame, schema, policy, secret, encrypt=False)
    feature = {c.name: c.feature for c in schema.columns}
    released = res.frame.rename(columns={feature[q]: q for q in quasi_identifiers if feature[q] in res.frame.columns})
    pid = feature[identity]
    if pid not in released.columns:
        raise DataError(f"the policy drops {identity!r}; pseudonymise it so that the evaluator can score the attack")
    back = dict(zip(Pseudonymizer(secret).pseudonyms(frame[identity].astype(str) if schema.column(identity).type == "string" else frame[identity]), frame[identity]))
    truth = [back.get(p) for p in released[pid]]
    after = linkage_attack(released.drop(columns=[pid]), auxiliary, quasi_identifiers, identity=identity, truth=truth)
    # suppressed records are not released: count them as not re-identified over the original rows
    after = LinkageResult(before.n_released, after.n_unique, after.n_correct, after.expected_rate * after.n_released / max(1, before.n_released), after.quasi_identifiers)
    return ReidentificationRisk(before, after, res.report.suppressed, res.report.k)
