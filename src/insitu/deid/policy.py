"""The de-identification policy a site applies before any record reaches training (TOML).

    [deid]
    k = 5                        # every quasi-identifier combination shared by >= 5 patients
    l = 2                        # and >= 2 distinct values of each diversity-checked sensitive column
    max_suppression = 0.05       # at most 5% of records may be removed; more is an error
    patient_id = "mrn"           # keys the pseudonym, the date shift and the encryption binding
    date_shift_days = 365        # every date of a patient moves by the same keyed offset (0 = off)
    date_coarsening = "week"     # then round dates down: week | month | quarter | year ("none": exact intervals)

    [identifiers]                # direct identifiers: "pseudonymize" or "drop" (unlisted: dropped)
    mrn = "pseudonymize"
    name = "drop"

    [generalize.age]             # every quasi-identifier needs a hierarchy
    hierarchy = "age_band"       # age_band | numeric_band | zip_prefix | date | category
    levels = [5, 10, 20, "*"]    # finest first; "*" lets it be generalized away entirely
    top_code = 90                # ages >= 90 become "90+" (HIPAA Safe Harbor)

    [sensitive.diagnosis]        # unlisted sensitive columns: encrypt = true, diversity = true
    encrypt = true
    diversity = true
    max_bytes = 16               # every token is padded to this (UTF-8 bytes); longer values are refused

Secure defaults: unlisted direct identifiers are dropped, unlisted sensitive columns are encrypted
and count for l-diversity, dates are shifted.  A policy naming columns the schema does not have, or
acting on a column in a way its role does not allow, is refused before any record is read.
Released rows are always in a keyed random order (``insitu.deid.release``), and every encrypted
column's tokens have one length (default ``max_bytes`` 64).
"""
from __future__ import annotations

import dataclasses
import hashlib
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from insitu.data.sources import ColumnType, RecordSchema, Role
from insitu.deid.fieldcrypt import DEFAULT_MAX_BYTES, check_max_bytes
from insitu.deid.hierarchy import Hierarchy, HierarchyKind, build_hierarchy
from insitu.deid.release import DateCoarsening
from insitu.errors import ConfigError, parse_choice


class IdentifierAction(StrEnum):
    PSEUDONYMIZE = "pseudonymize"
    DROP = "drop"


@dataclass(frozen=True)
class QuasiRule:
    column: str
    hierarchy: Hierarchy


@dataclass(frozen=True)
class SensitiveRule:
    column: str
    encrypt: bool = True
    diversity: bool = True
    max_bytes: int = DEFAULT_MAX_BYTES  # tokens of this column are padded to it


@dataclass(frozen=True)
class DeidPolicy:
    k: int
    l: int
    max_suppression: float
    patient_id: str | None
    date_shift_days: int
    identifiers: Mapping[str, IdentifierAction]
    quasi: tuple[QuasiRule, ...]
    sensitive: tuple[SensitiveRule, ...]
    sha256: str = ""
    date_coarsening: DateCoarsening = DateCoarsening.NONE

    @classmethod
    def from_toml(cls, path: str | Path) -> "DeidPolicy":
        path = Path(path)
        try:
            text = path.read_text()
            raw = tomllib.loads(text)
        except FileNotFoundError:
            raise ConfigError(f"policy file {path} not found") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"policy {path} is not valid TOML: {exc}") from None
        return cls.from_dict(raw, sha256=hashlib.sha256(text.encode()).hexdigest(), origin=str(path))

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], *, sha256: str = "", origin: str = "policy") -> "DeidPolicy":
        extra = set(raw) - {"deid", "identifiers", "generalize", "sensitive"}
        if extra:
            raise ConfigError(f"{origin}: unknown section(s) {sorted(extra)}; allowed: deid, identifiers, generalize, sensitive")
        d = dict(raw.get("deid", {}))
        extra = set(d) - {"k", "l", "max_suppression", "patient_id", "date_shift_days", "date_coarsening"}
        if extra:
            raise ConfigError(f"{origin}: unknown key(s) in [deid]: {sorted(extra)}")
        k, l_ = d.get("k", 5), d.get("l", 1)
        if not isinstance(k, int) or k < 1:
            raise ConfigError(f"{origin}: k must be an integer >= 1, got {k!r}")
        if not isinstance(l_, int) or l_ < 1:
            raise ConfigError(f"{origin}: l must be an integer >= 1, got {l_!r}")
        ms = d.get("max_suppression", 0.05)
        if not isinstance(ms, (int, float)) or not 0 <= ms <= 1:
            raise ConfigError(f"{origin}: max_suppression must be a share in [0, 1], got {ms!r}")
        shift = d.get("date_shift_days", 365)
        if not isinstance(shift, int) or shift < 0:
            raise ConfigError(f"{origin}: date_shift_days must be an integer >= 0, got {shift!r}")
        coarsening = parse_choice(DateCoarsening, d.get("date_coarsening", DateCoarsening.NONE.value), f"{origin}: date_coarsening")
        pid = d.get("patient_id")
        if pid is not None and not isinstance(pid, str):
            raise ConfigError(f"{origin}: patient_id must be a column name")
        idents = {}
        for col, action in dict(raw.get("identifiers", {})).items():
            idents[col] = parse_choice(IdentifierAction, action, f"{origin}: [identifiers] {col}")
        quasi = []
        for col, spec in dict(raw.get("generalize", {})).items():
            if not isinstance(spec, Mapping) or "hierarchy" not in spec:
                raise ConfigError(f"{origin}: [generalize.{col}] needs hierarchy = one of "
                                  f"{[h.value for h in HierarchyKind]}")
            kind = parse_choice(HierarchyKind, spec["hierarchy"], f"{origin}: [generalize.{col}] hierarchy")
            options = {key: v for key, v in spec.items() if key not in ("hierarchy", "levels")}
            quasi.append(QuasiRule(col, build_hierarchy(kind, spec.get("levels"), options, column=col)))
        sens = []
        for col, spec in dict(raw.get("sensitive", {})).items():
            spec = dict(spec) if isinstance(spec, Mapping) else {}
            extra = set(spec) - {"encrypt", "diversity", "max_bytes"}
            if extra:
                raise ConfigError(f"{origin}: [sensitive.{col}] unknown key(s) {sorted(extra)}; "
                                  "allowed: encrypt, diversity, max_bytes")
            sens.append(SensitiveRule(col, bool(spec.get("encrypt", True)), bool(spec.get("diversity", True)),
                                      check_max_bytes(spec.get("max_bytes", DEFAULT_MAX_BYTES), col)))
        return cls(k, l_, float(ms), pid, shift, idents, tuple(quasi), tuple(sens), sha256, coarsening)

    def resolve(self, schema: RecordSchema) -> "DeidPolicy":
        """Check the policy against a schema and fill the secure defaults; raises naming every problem."""
        declared = {c.name: c for c in schema.columns}
        problems = []
        named = list(self.identifiers) + [q.column for q in self.quasi] + [s.column for s in self.sensitive]
        if self.patient_id:
            named.append(self.patient_id)
        unknown = sorted({c for c in named if c not in declared})
        if unknown:
            problems.append(f"column(s) {unknown} are not in the schema (declared: {sorted(declared)})")

        def role_check(cols: list[str], role: Role, section: str) -> None:
            wrong = [c for c in cols if c in declared and declared[c].role is not role]
            if wrong:
                problems.append(f"[{section}] lists {wrong}, whose schema role is not {role.value}")

        role_check(list(self.identifiers), Role.DIRECT_IDENTIFIER, "identifiers")
        role_check([q.column for q in self.quasi], Role.QUASI_IDENTIFIER, "generalize")
        role_check([s.column for s in self.sensitive], Role.SENSITIVE, "sensitive")
        qi_cols = {q.column for q in self.quasi}
        no_rule = [c.name for c in schema.with_role(Role.QUASI_IDENTIFIER) if c.name not in qi_cols]
        if no_rule:
            problems.append(f"quasi-identifier(s) {no_rule} have no [generalize.<column>] hierarchy")
        for q in self.quasi:
            if q.column in declared:
                ctype = declared[q.column].type
                is_date = q.hierarchy.kind is HierarchyKind.DATE
                if is_date != (ctype is ColumnType.DATE):
                    problems.append(f"[generalize.{q.column}] hierarchy {q.hierarchy.kind.value} does not fit "
                                    f"its declared type {ctype.value}")
                if q.hierarchy.kind in (HierarchyKind.AGE_BAND, HierarchyKind.NUMERIC_BAND) and \
                        ctype not in (ColumnType.INTEGER, ColumnType.FLOAT):
                    problems.append(f"[generalize.{q.column}] numeric bands need an integer or float column, "
                                    f"not {ctype.value}")
        idents = {c.name: self.identifiers.get(c.name, IdentifierAction.DROP)
                  for c in schema.with_role(Role.DIRECT_IDENTIFIER)}
        by_col = {s.column: s for s in self.sensitive}
        sens = tuple(by_col.get(c.name, SensitiveRule(c.name)) for c in schema.with_role(Role.SENSITIVE))
        has_dates = any(c.type is ColumnType.DATE and c.role is not Role.DIRECT_IDENTIFIER for c in schema.columns)
        needs_pid = any(s.encrypt for s in sens) or (has_dates and self.date_shift_days > 0)
        if self.patient_id is None and needs_pid:
            problems.append("patient_id is not set, but encrypting sensitive columns and shifting dates are keyed "
                            "per patient: set [deid] patient_id to the pseudonymized direct identifier")
        if self.patient_id in declared and idents.get(self.patient_id) is not IdentifierAction.PSEUDONYMIZE:
            problems.append(f"patient_id {self.patient_id!r} must be a direct identifier with action \"pseudonymize\"")
        if problems:
            raise ConfigError("policy does not fit the schema: " + "; ".join(problems))
        order = {c.name: i for i, c in enumerate(schema.columns)}
        quasi = tuple(sorted(self.quasi, key=lambda q: order[q.column]))
        return dataclasses.replace(self, identifiers=idents, quasi=quasi, sensitive=sens)


__all__ = ["DeidPolicy", "IdentifierAction", "QuasiRule", "SensitiveRule"]
