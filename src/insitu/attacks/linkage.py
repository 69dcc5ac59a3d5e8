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

A release also leaks around its cells; three attacks measure that, each scored against truth only
the evaluator holds: :func:`token_length_attack` (a sensitive value guessed from its encrypted
token's length), :func:`row_position_attack` (a hidden date read off the row position of a release
that kept a date-sorted source's order, and the date shift with it) and
:func:`interval_linkage_attack` (a patient found by the intervals between their visits, which a
per-patient date shift keeps).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Hashable, Mapping, Sequence

import numpy as np
import pandas as pd

from insitu.errors import DataError, parse_choice

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


# ---------------------------------------------------------------------------------------------
# What a release gives away beyond its cells: token lengths, row order, date intervals.
# Each attack succeeds on a release without the matching defence of ``insitu.deid`` (unpadded
# tokens, source order, exact intervals) and is scored against the truth only the evaluator holds.
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenLengthResult:
    """Accuracy of guessing a sensitive value from its token's length alone, beside the best guess
    that ignores the token (always the commonest value): ``majority_rate``."""

    n_test: int
    distinct_lengths: int
    accuracy: float
    majority_rate: float

    @property
    def advantage(self) -> float:
        return self.accuracy - self.majority_rate


def token_length_attack(tokens: Sequence[str], values: Sequence[Hashable], *, train_share: float = 0.5,
                        seed: int = 0) -> TokenLengthResult:
    """Learn on a labelled share of the rows (e.g. patients whose diagnosis the attacker knows) the
    commonest value per token length; predict the rest; unseen lengths get the overall commonest."""
    tokens, values = list(tokens), list(values)
    if len(tokens) != len(values) or len(tokens) < 2:
        raise DataError(f"{len(tokens)} tokens for {len(values)} values; give one value per token (two or more)")
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(tokens))
    n_train = min(max(1, int(round(train_share * len(tokens)))), len(tokens) - 1)
    train, test = idx[:n_train], idx[n_train:]
    frame = pd.DataFrame({"length": [len(t) for t in tokens], "value": pd.Series(values, dtype=object).astype(str)})
    tr = frame.iloc[train]
    overall = tr["value"].value_counts().idxmax()
    per_length = tr.groupby("length")["value"].agg(lambda s: s.value_counts().idxmax())
    te = frame.iloc[test]
    guess = te["length"].map(per_length).fillna(overall)
    return TokenLengthResult(len(te), int(frame["length"].nunique()), float((guess == te["value"]).mean()),
                             float(te["value"].value_counts(normalize=True).iloc[0]))


@dataclass(frozen=True)
class RowOrderResult:
    """How well row position predicts a date the release does not show (``spearman`` between
    position and the true date; ``median_error_days`` of the estimate), and, given a shifted date of
    the same rows, how well it gives the date shift back.  The baselines are what a guess without the
    order gets: the middle of the span for the date, no shift (0) for the shift."""

    n_rows: int
    spearman: float
    median_error_days: float
    shift_median_error_days: float | None
    baseline_error_days: float
    shift_baseline_error_days: float | None


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = pd.Series(a).rank().to_numpy(), pd.Series(b).rank().to_numpy()
    if ra.std() == 0 or rb.std() == 0:
        return 0.0
    return float(np.corrcoef(ra, rb)[0, 1])


def row_position_attack(true_dates: Sequence[Any], *, span: tuple[Any, Any] | None = None,
                        shifted: Sequence[Any] | None = None, true_shift_days: Sequence[int] | None = None
                        ) -> RowOrderResult:
    """Assume the release kept the order of a date-sorted source: row ``i`` of ``n`` happened at
    ``lo + (hi - lo) · i/(n-1)``, with ``span = (lo, hi)`` the period the release covers (public; default
    the truth's range).  ``true_dates`` are the hidden dates of the released rows, in release order
    (the evaluator's truth).  With ``shifted`` (a date of the same rows the release shows, shifted per
    patient) and ``true_shift_days``, the shift is estimated as ``shifted - estimate``."""
    truth = pd.to_datetime(pd.Series(list(true_dates)))
    n = len(truth)
    if n < 2:
        raise DataError("a row-position attack needs at least two rows")
    lo, hi = (truth.min(), truth.max()) if span is None else (pd.Timestamp(span[0]), pd.Timestamp(span[1]))
    estimate = lo + (hi - lo) * (np.arange(n) / (n - 1))
    err = (truth - pd.Series(estimate)).dt.days.abs()
    shift_err = shift_base = None
    if shifted is not None:
        if true_shift_days is None:
            raise DataError("scoring the recovered date shift needs true_shift_days")
        est_shift = (pd.to_datetime(pd.Series(list(shifted))) - pd.Series(estimate)).dt.days
        shift_err = float((est_shift - np.asarray(true_shift_days)).abs().median())
        shift_base = float(np.median(np.abs(np.asarray(true_shift_days))))
    base = float((truth - (lo + (hi - lo) / 2)).dt.days.abs().median())
    return RowOrderResult(n, _spearman(np.arange(n), truth.to_numpy().astype("datetime64[ns]").astype(np.int64)),
                          float(err.median()), shift_err, base, shift_base)


@dataclass(frozen=True)
class IntervalLinkageResult:
    """Targets (multi-visit patients whose true dates the attacker holds) pinned to exactly one
    released patient, and to the right one."""

    targets: int
    unique: int
    correct: int

    @property
    def rate(self) -> float:
        return self.correct / self.targets if self.targets else 0.0


def interval_linkage_attack(release_patients: Sequence[Hashable], release_dates: Sequence[Sequence[Any]],
                            aux_patients: Sequence[Hashable], aux_dates: Sequence[Sequence[Any]], *,
                            truth: Mapping[Hashable, Hashable], coarsening: Any = "none",
                            max_shift_days: int = 0) -> IntervalLinkageResult:
    """Find each target in a date-shifted release by the intervals between its visits.

    The attacker holds the true dates of some patients (``aux_patients``/``aux_dates``: one row per
    visit, the same date columns as ``release_dates``), knows the policy (``coarsening``, the shift
    bound ``max_shift_days``) but not the keyed shifts.  Exact intervals survive any per-patient
    shift, so one signature per target suffices; after coarsening the attacker tries every shift in
    ``±max_shift_days``, rounds as the site would, and collects every released patient matching any of
    them.  ``truth`` maps a target to its released pseudonym, for scoring only.
    """
    from insitu.deid.release import DateCoarsening, coarsen_days, signature_keys as keys, to_days

    unit = parse_choice(DateCoarsening, coarsening, "coarsening")
    if len(release_dates) != len(aux_dates) or not release_dates:
        raise DataError("give the same date columns (one or more) for the release and the auxiliary table")

    r_codes, r_ids = pd.factorize(pd.Series(list(release_patients), dtype=object))
    r_pairs = [to_days(pd.Series(list(d))) for d in release_dates]
    r_counts, r_keys = keys(r_codes, [p[0] for p in r_pairs], [p[1] for p in r_pairs])
    by_key: dict[int, list[Hashable]] = {}
    for pid, cnt, key in zip(r_ids, r_counts, r_keys.tolist()):
        if cnt >= 2:
            by_key.setdefault(key, []).append(pid)

    a_codes, a_ids = pd.factorize(pd.Series(list(aux_patients), dtype=object))
    a_pairs = [to_days(pd.Series(list(d))) for d in aux_dates]
    a_counts = np.bincount(a_codes, minlength=len(a_ids))
    candidates: list[set] = [set() for _ in a_ids]
    shifts = [0] if unit is DateCoarsening.NONE else range(-max_shift_days, max_shift_days + 1)
    for o in shifts:
        _, k = keys(a_codes, [coarsen_days(d + o, unit) for d, _ in a_pairs], [m for _, m in a_pairs])
        for t, key in enumerate(k.tolist()):
            candidates[t].update(by_key.get(key, ()))
    targets = [t for t in range(len(a_ids)) if a_counts[t] >= 2]
    unique = [t for t in targets if len(candidates[t]) == 1]
    correct = sum(1 for t in unique if truth.get(a_ids[t]) in candidates[t])
    return IntervalLinkageResult(len(targets), len(unique), correct)
