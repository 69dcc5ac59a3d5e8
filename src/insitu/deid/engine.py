"""Apply a de-identification policy to a table of records, in a fixed order.

    check token lengths -> shift dates per patient -> coarsen dates (policy) -> measure risk before ->
    generalize + enforce k/l (suppress) -> pseudonymize / drop direct identifiers -> measure risk
    after -> measure interval singling-out -> encrypt sensitive columns (fixed-length tokens) ->
    put rows in a keyed random order

Everything is computed in memory and checked before anything is written, so a policy that
cannot be met leaves no partial output behind.  The quasi-identifier work runs on integer codes:
each column is factorized once, hierarchies label its distinct values, and rows are mapped with
numpy indexing — no per-row Python on the hot path.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import os

import numpy as np
import pandas as pd

from insitu.data.sources import ColumnType, RecordSchema, Role
from insitu.deid.fieldcrypt import FieldKeyring, check_lengths, encrypt_frame, token_chars
from insitu.deid.hierarchy import TOP
from insitu.deid.kanon import RiskReport, enforce, risk
from insitu.deid.policy import DeidPolicy, IdentifierAction
from insitu.deid.pseudonym import Pseudonymizer
from insitu.deid.release import ORDER_NONCE_BYTES, DateCoarsening, as_datetime, coarsen, release_order, singling_out
from insitu.errors import ConfigError, DataError, PolicyViolation


@dataclass(frozen=True)
class DeidReport:
    """What a de-identification run did; JSON-ready (goes into the audit log)."""

    rows_in: int
    rows_out: int
    suppressed: int
    k: int
    l: int
    max_suppression: float
    levels: dict[str, str]
    before: dict[str, Any]
    after: dict[str, Any]
    pseudonymized: list[str]
    dropped: list[str]
    encrypted: list[str]
    key_id: str | None
    date_shift_days: int
    policy_sha256: str
    secret_fingerprint: str
    steps: list[str] = field(default_factory=list)
    #: per encrypted column: the max_bytes its tokens are padded to and the one token length
    tokens: dict[str, dict[str, int]] = field(default_factory=dict)
    #: rows are in a keyed random order; the site recomputes it from its secret and this nonce
    row_order: str = "keyed-random (AES-256-CTR sort keys, key = HKDF(site secret, nonce))"
    row_order_nonce: str = ""
    date_coarsening: str = DateCoarsening.NONE.value
    #: share of multi-visit patients singled out by their interval sequence, per coarsening unit
    intervals: dict[str, Any] = field(default_factory=dict)

    @property
    def suppressed_share(self) -> float:
        return self.suppressed / self.rows_in if self.rows_in else 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class DeidResult:
    """The release (``frame``, rows in keyed random order) and its report.

    ``source_rows[i]`` is the input row that released row ``i`` came from: the site's own
    evaluation aid, kept in memory and never written (it would undo the random order).
    """

    frame: pd.DataFrame
    report: DeidReport
    source_rows: np.ndarray


def _codes(values: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    codes, uniques = pd.factorize(values, use_na_sentinel=False)
    return codes.astype(np.int64), np.asarray(uniques, dtype=object)


def _check_frame(frame: pd.DataFrame, schema: RecordSchema) -> None:
    missing = [c for c in schema.names if c not in frame.columns]
    if missing:
        raise DataError(f"records lack column(s) {missing} declared in the schema")


def _date_columns(schema: RecordSchema) -> list[str]:
    return [c.name for c in schema.columns if c.type is ColumnType.DATE and c.role is not Role.DIRECT_IDENTIFIER]


def _shift_dates(frame: pd.DataFrame, schema: RecordSchema, policy: DeidPolicy,
                 offsets: np.ndarray | None) -> pd.DataFrame:
    dates = _date_columns(schema)
    if not dates or offsets is None:
        return frame
    delta = pd.to_timedelta(offsets, unit="D")
    out = frame.copy()
    for c in dates:
        out[c] = pd.to_datetime(frame[c]) + delta
    return out


def _coarsen_dates(frame: pd.DataFrame, schema: RecordSchema, unit: DateCoarsening) -> pd.DataFrame:
    dates = _date_columns(schema)
    if not dates or unit is DateCoarsening.NONE:
        return frame
    out = frame.copy()
    for c in dates:
        out[c] = coarsen(as_datetime(frame[c]), unit)
    return out


_LEVEL_UNIT = {"day": DateCoarsening.NONE, "month": DateCoarsening.MONTH, "year": DateCoarsening.YEAR}


def _interval_report(shifted: pd.DataFrame, keep: np.ndarray, people: np.ndarray | None, policy: DeidPolicy,
                     schema: RecordSchema, levels: dict[str, str]) -> dict[str, Any]:
    """Singling-out by interval sequence over the release's dates, as released had each coarsening been
    applied (quasi-identifier dates also at their generalization level; "*" carries no date)."""
    cols = _date_columns(schema)
    if people is None or not cols:
        return {}
    kept = shifted.loc[keep, cols].reset_index(drop=True)
    rates, multi = {}, 0
    for unit in DateCoarsening:
        series = []
        for c in cols:
            level = levels.get(c)
            if level == TOP:
                continue
            v = coarsen(as_datetime(kept[c]), unit)
            if level is not None:
                v = coarsen(v, _LEVEL_UNIT[level])
            series.append(v)
        so = singling_out(people[keep], series)
        rates[unit.value] = so.rate
        multi = so.multi_visit_patients
    return {"date_columns": cols, "multi_visit_patients": multi, "singling_out": rates,
            "applied": policy.date_coarsening.value}


def assess(frame: pd.DataFrame, schema: RecordSchema, policy: DeidPolicy) -> RiskReport:
    """Risk of the records as they are (raw quasi-identifier values)."""
    policy = policy.resolve(schema)
    _check_frame(frame, schema)
    qi = [_codes(frame[q.column])[0] for q in policy.quasi]
    sens = [_codes(frame[s.column])[0] for s in policy.sensitive if s.diversity]
    return risk(qi or [np.zeros(len(frame), dtype=np.int64)], sens, k=policy.k, people=_people(frame, policy))


def _people(frame: pd.DataFrame, policy: DeidPolicy) -> np.ndarray | None:
    """A code per record naming its patient, so k counts patients rather than visits."""
    return _codes(frame[policy.patient_id])[0] if policy.patient_id else None


def deidentify(frame: pd.DataFrame, schema: RecordSchema, policy: DeidPolicy, secret: bytes, *,
               keyring: FieldKeyring | None = None, encrypt: bool = True,
               release_nonce: bytes | None = None) -> DeidResult:
    """De-identify ``frame`` (typed records, as ``read_records`` returns them).

    ``encrypt=False`` skips field encryption (used by ``insitu deid check``); a policy that asks
    for encryption with ``encrypt=True`` needs a ``keyring``.  The release's row order is keyed by
    the site secret and ``release_nonce`` (fresh random bytes unless given; recorded in the report).
    """
    policy = policy.resolve(schema)
    _check_frame(frame, schema)
    to_encrypt = [s.column for s in policy.sensitive if s.encrypt] if encrypt else []
    if to_encrypt and keyring is None:
        raise ConfigError(f"policy encrypts {to_encrypt}; pass a field keyring (--keyring)")
    nonce = os.urandom(ORDER_NONCE_BYTES) if release_nonce is None else release_nonce
    if not isinstance(nonce, bytes) or len(nonce) < ORDER_NONCE_BYTES:
        raise ConfigError(f"release_nonce must be at least {ORDER_NONCE_BYTES} bytes")
    max_bytes = {s.column: s.max_bytes for s in policy.sensitive if s.column in to_encrypt}
    for c, m in max_bytes.items():  # a value too long for its column's tokens stops the run before any work
        check_lengths(frame[c].tolist(), c, m)
    pz = Pseudonymizer(secret)
    n = len(frame)
    if policy.patient_id and frame[policy.patient_id].isna().any():
        rows = np.flatnonzero(frame[policy.patient_id].isna().to_numpy())[:5] + 1
        raise DataError(f"patient_id column {policy.patient_id!r} is empty at data row(s) {rows.tolist()}; "
                        "every record needs it for pseudonyms, date shifts and encryption")

    before = assess(frame, schema, policy)
    patient_pseudonyms, offsets = None, None
    if policy.patient_id:  # one factorization and one HMAC per patient for both
        patient_pseudonyms, offsets = pz.pseudonyms_and_offsets(frame[policy.patient_id], policy.date_shift_days)
    exact = _shift_dates(frame, schema, policy, offsets if policy.date_shift_days > 0 else None)
    shifted = _coarsen_dates(exact, schema, policy.date_coarsening)

    # quasi-identifiers: codes per level, labels per level
    names = [q.column for q in policy.quasi]
    level_codes: list[list[np.ndarray]] = []
    level_labels: list[list[np.ndarray]] = []
    for q in policy.quasi:
        base_codes, uniques = _codes(shifted[q.column])
        per_codes, per_labels = [], []
        for lv in range(q.hierarchy.n_levels):
            lab_codes, lab_uniques = pd.factorize(q.hierarchy.generalize(uniques, lv))
            per_codes.append(lab_codes.astype(np.int64)[base_codes])
            per_labels.append(np.asarray(lab_uniques, dtype=object))
        level_codes.append(per_codes)
        level_labels.append(per_labels)
    diverse = [s.column for s in policy.sensitive if s.diversity]
    sens_codes = [_codes(frame[c])[0] for c in diverse]
    l_eff = policy.l if diverse else 1
    people = _people(frame, policy)
    result = enforce(level_codes, names, sens_codes, k=policy.k, l=l_eff, max_suppression=policy.max_suppression,
                     people=people)
    keep = result.keep

    out: dict[str, Any] = {}
    pseudonymized, dropped = [], []
    final_codes = []
    for spec in schema.columns:
        col = spec.name
        if spec.role is Role.DIRECT_IDENTIFIER:
            if policy.identifiers[col] is IdentifierAction.PSEUDONYMIZE:
                ids = patient_pseudonyms if col == policy.patient_id else pz.pseudonyms(frame[col])
                out[spec.feature] = ids[keep].reset_index(drop=True)
                pseudonymized.append(col)
            else:
                dropped.append(col)
        elif spec.role is Role.QUASI_IDENTIFIER:
            j = names.index(col)
            codes = level_codes[j][result.levels[j]][keep]
            final_codes.append(codes)
            out[spec.feature] = pd.Series(level_labels[j][result.levels[j]][codes], dtype="string")
        else:
            out[spec.feature] = shifted[col][keep].reset_index(drop=True)
    table = pd.DataFrame(out)

    after = risk(final_codes or [np.zeros(int(keep.sum()), dtype=np.int64)],
                 [c[keep] for c in sens_codes], k=policy.k, people=None if people is None else people[keep])
    if after.records and (after.k < policy.k or (l_eff > 1 and (after.l or 0) < l_eff)):
        raise PolicyViolation(f"internal check failed: output has k={after.k}, l={after.l}; nothing was written")

    levels = {c: policy.quasi[j].hierarchy.level_name(result.levels[j]) for j, c in enumerate(names)}
    date_levels = {c: lv for c, lv in levels.items() if schema.column(c).type is ColumnType.DATE}
    intervals = _interval_report(exact, keep, people, policy, schema, date_levels)

    encrypted, tokens = [], {}
    if to_encrypt:
        id_feature = schema.column(policy.patient_id).feature  # type: ignore[arg-type]
        feats = {schema.column(c).feature: max_bytes[c] for c in to_encrypt}
        table = encrypt_frame(table, list(feats), id_feature, keyring, feats)  # type: ignore[arg-type]
        encrypted = to_encrypt
        tokens = {c: {"max_bytes": max_bytes[c], "token_chars": token_chars(max_bytes[c], keyring.active)}  # type: ignore[union-attr]
                  for c in to_encrypt}

    order = release_order(secret, nonce, len(table))
    table = table.iloc[order].reset_index(drop=True)
    source_rows = np.flatnonzero(keep)[order]

    report = DeidReport(
        rows_in=n, rows_out=int(keep.sum()), suppressed=result.suppressed, k=policy.k, l=l_eff,
        max_suppression=policy.max_suppression,
        levels=levels,
        before=before.as_dict(), after=after.as_dict(), pseudonymized=pseudonymized, dropped=dropped,
        encrypted=encrypted, key_id=keyring.active if (keyring and encrypted) else None,
        date_shift_days=policy.date_shift_days, policy_sha256=policy.sha256,
        secret_fingerprint=pz.fingerprint(),
        steps=list(result.steps),
        tokens=tokens, row_order_nonce=nonce.hex(), date_coarsening=policy.date_coarsening.value,
        intervals=intervals,
    )
    return DeidResult(table, report, source_rows)


__all__ = ["DeidReport", "DeidResult", "assess", "deidentify"]
