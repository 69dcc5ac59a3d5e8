"""Apply a de-identification policy to a table of records, in a fixed order.

    shift dates per patient -> measure risk before -> generalize + enforce k/l (suppress) ->
    pseudonymize / drop direct identifiers -> encrypt sensitive columns -> measure risk after

Everything is computed in memory and checked before anything is written, so a policy that
cannot be met leaves no partial output behind.  The quasi-identifier work runs on integer codes:
each column is factorized once, hierarchies label its distinct values, and rows are mapped with
numpy indexing — no per-row Python on the hot path.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from insitu.data.sources import ColumnType, RecordSchema, Role
from insitu.deid.fieldcrypt import FieldKeyring, encrypt_frame
from insitu.deid.kanon import RiskReport, enforce, risk
from insitu.deid.policy import DeidPolicy, IdentifierAction
from insitu.deid.pseudonym import Pseudonymizer
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

    @property
    def suppressed_share(self) -> float:
        return self.suppressed / self.rows_in if self.rows_in else 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class DeidResult:
    frame: pd.DataFrame
    report: DeidReport


def _codes(values: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    codes, uniques = pd.factorize(values, use_na_sentinel=False)
    return codes.astype(np.int64), np.asarray(uniques, dtype=object)


def _check_frame(frame: pd.DataFrame, schema: RecordSchema) -> None:
    missing = [c for c in schema.names if c not in frame.columns]
    if missing:
        raise DataError(f"records lack column(s) {missing} declared in the schema")


def _shift_dates(frame: pd.DataFrame, schema: RecordSchema, policy: DeidPolicy,
                 offsets: np.ndarray | None) -> pd.DataFrame:
    dates = [c.name for c in schema.columns if c.type is ColumnType.DATE and c.role is not Role.DIRECT_IDENTIFIER]
    if not dates or offsets is None:
        return frame
    delta = pd.to_timedelta(offsets, unit="D")
    out = frame.copy()
    for c in dates:
        out[c] = pd.to_datetime(frame[c]) + delta
    return out


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
               keyring: FieldKeyring | None = None, encrypt: bool = True) -> DeidResult:
    """De-identify ``frame`` (typed records, as ``read_records`` returns them).

    ``encrypt=False`` skips field encryption (used by ``insitu deid check``); a policy that asks
    for encryption with ``encrypt=True`` needs a ``keyring``.
    """
    policy = policy.resolve(schema)
    _check_frame(frame, schema)
    to_encrypt = [s.column for s in policy.sensitive if s.encrypt] if encrypt else []
    if to_encrypt and keyring is None:
        raise ConfigError(f"policy encrypts {to_encrypt}; pass a field keyring (--keyring)")
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
    shifted = _shift_dates(frame, schema, policy, offsets if policy.date_shift_days > 0 else None)

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

    encrypted = []
    if to_encrypt:
        id_feature = schema.column(policy.patient_id).feature  # type: ignore[arg-type]
        feats = [schema.column(c).feature for c in to_encrypt]
        table = encrypt_frame(table, feats, id_feature, keyring)  # type: ignore[arg-type]
        encrypted = to_encrypt

    report = DeidReport(
        rows_in=n, rows_out=int(keep.sum()), suppressed=result.suppressed, k=policy.k, l=l_eff,
        max_suppression=policy.max_suppression,
        levels={c: policy.quasi[j].hierarchy.level_name(result.levels[j]) for j, c in enumerate(names)},
        before=before.as_dict(), after=after.as_dict(), pseudonymized=pseudonymized, dropped=dropped,
        encrypted=encrypted, key_id=keyring.active if (keyring and encrypted) else None,
        date_shift_days=policy.date_shift_days, policy_sha256=policy.sha256,
        secret_fingerprint=pz.fingerprint(),
        steps=list(result.steps),
    )
    return DeidResult(table, report)


__all__ = ["DeidReport", "DeidResult", "assess", "deidentify"]
