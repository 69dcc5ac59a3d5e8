"""Site record sources — a CSV export, a SQLite file or a PostgreSQL table — read through a schema.

A hospital keeps its records where they are; insitu reads only the columns a declared schema names
(data minimization: undeclared columns are never loaded) and checks every value against its
declared type before anything else happens.  The schema also declares each column's *role*, which
the de-identification policy acts on:

    direct_identifier   names the patient (MRN, name, phone): dropped or replaced by a keyed pseudonym
    quasi_identifier    identifies in combination (age, ZIP, dates, sex): generalized to k-anonymity
    sensitive           what must not be linked to a person (diagnosis): l-diversity, encrypted at rest
    feature             model input, passed through
    label               model target, passed through

Schema file (TOML)::

    table = "visits"                    # optional default table for SQL sources
    [columns.patient_id]
    role = "direct_identifier"
    type = "string"
    [columns.age]
    role = "quasi_identifier"
    type = "integer"
    feature = "age_years"               # optional: name of the feature in the output

Error messages name columns and row numbers, never values: a value in a medical record may itself
be the secret.
"""
from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:  # SQLAlchemy (~0.6 s to import) loads only for SQLite / PostgreSQL sources
    import sqlalchemy as sa

from insitu.errors import ConfigError, DataError


class Role(StrEnum):
    DIRECT_IDENTIFIER = "direct_identifier"
    QUASI_IDENTIFIER = "quasi_identifier"
    SENSITIVE = "sensitive"
    FEATURE = "feature"
    LABEL = "label"


class ColumnType(StrEnum):
    STRING = "string"
    INTEGER = "integer"
    FLOAT = "float"
    DATE = "date"
    BOOLEAN = "boolean"


@dataclass(frozen=True)
class ColumnSpec:
    name: str
    role: Role
    type: ColumnType
    feature: str
    nullable: bool = True


@dataclass(frozen=True)
class RecordSchema:
    """The declared columns of one record table, in declaration order."""

    columns: tuple[ColumnSpec, ...]
    table: str | None = None

    @classmethod
    def from_toml(cls, path: str | Path) -> "RecordSchema":
        path = Path(path)
        try:
            raw = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"schema file {path} not found") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"schema {path} is not valid TOML: {exc}") from None
        return cls.from_dict(raw, origin=str(path))

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], *, origin: str = "schema") -> "RecordSchema":
        unknown = set(raw) - {"table", "columns"}
        if unknown:
            raise ConfigError(f"{origin}: unknown top-level key(s) {sorted(unknown)}; allowed: table, columns")
        cols_raw = raw.get("columns")
        if not isinstance(cols_raw, Mapping) or not cols_raw:
            raise ConfigError(f"{origin}: declare at least one [columns.<name>] table")
        cols = []
        for name, spec in cols_raw.items():
            if not isinstance(spec, Mapping):
                raise ConfigError(f"{origin}: [columns.{name}] must be a table with role and type")
            bad = set(spec) - {"role", "type", "feature", "nullable"}
            if bad:
                raise ConfigError(f"{origin}: column {name!r} has unknown key(s) {sorted(bad)}; "
                                  "allowed: role, type, feature, nullable")
            role = _enum(Role, spec.get("role"), f"{origin}: column {name!r} role")
            ctype = _enum(ColumnType, spec.get("type"), f"{origin}: column {name!r} type")
            feature = spec.get("feature", name)
            if not isinstance(feature, str) or not feature:
                raise ConfigError(f"{origin}: column {name!r} feature must be a non-empty string")
            cols.append(ColumnSpec(name, role, ctype, feature, bool(spec.get("nullable", True))))
        features = [c.feature for c in cols]
        dupes = sorted({f for f in features if features.count(f) > 1})
        if dupes:
            raise ConfigError(f"{origin}: feature name(s) {dupes} used by more than one column")
        if sum(c.role is Role.LABEL for c in cols) > 1:
            raise ConfigError(f"{origin}: more than one label column "
                              f"({[c.name for c in cols if c.role is Role.LABEL]}); declare one")
        table = raw.get("table")
        if table is not None and not isinstance(table, str):
            raise ConfigError(f"{origin}: table must be a string")
        return cls(tuple(cols), table)

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.columns]

    def column(self, name: str) -> ColumnSpec:
        for c in self.columns:
            if c.name == name:
                return c
        raise ConfigError(f"column {name!r} is not in the schema; declared: {self.names}")

    def with_role(self, role: Role) -> list[ColumnSpec]:
        return [c for c in self.columns if c.role is role]


def _enum(kind: type[StrEnum], value: Any, what: str) -> Any:
    try:
        return kind(value)
    except ValueError:
        raise ConfigError(f"{what} is {value!r}; use one of {[m.value for m in kind]}") from None


# -- sources ------------------------------------------------------------------------------------
class SourceKind(StrEnum):
    CSV = "csv"
    SQLITE = "sqlite"
    POSTGRESQL = "postgresql"


def redact_url(url: str) -> str:
    """Hide the password of a database URL (sources are named in logs and audit entries)."""
    return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)


@dataclass(frozen=True)
class RecordSource:
    """Where records live.  ``location`` is a path or a database URL (use ``display`` to show it)."""

    kind: SourceKind
    location: str
    table: str | None = None

    @property
    def display(self) -> str:
        where = redact_url(self.location)
        return f"{where} (table {self.table})" if self.table else where

    def columns(self) -> list[str]:
        return _READERS[self.kind].columns(self)

    def read(self, columns: Sequence[str]) -> pd.DataFrame:
        return _READERS[self.kind].read(self, list(columns))


def open_source(spec: str | os.PathLike[str], table: str | None = None) -> RecordSource:
    """Recognize a source: ``postgresql://`` URL, ``sqlite:///`` URL or SQLite file, or a CSV file."""
    text = os.fspath(spec)
    if text.startswith(("postgresql://", "postgres://", "postgresql+")):
        if not table:
            raise ConfigError(f"source {redact_url(text)} is a database: name the table (--table)")
        url = "postgresql+psycopg://" + text.split("://", 1)[1]
        return RecordSource(SourceKind.POSTGRESQL, url, table)
    if text.startswith("sqlite:///"):
        text = text[len("sqlite:///"):]
        if not Path(text).is_file():
            raise DataError(f"SQLite source {text} does not exist")
        if not table:
            raise ConfigError(f"source {text} is a SQLite database: name the table (--table)")
        return RecordSource(SourceKind.SQLITE, str(Path(text).resolve()), table)
    if "://" in text:
        raise ConfigError(f"source {redact_url(text)!r}: use a CSV path, a SQLite file or a postgresql:// URL")
    path = Path(text)
    if not path.is_file():
        raise DataError(f"source {path} does not exist")
    with path.open("rb") as fh:
        magic = fh.read(16)
    if magic == b"SQLite format 3\x00":
        if not table:
            raise ConfigError(f"source {path} is a SQLite database: name the table (--table)")
        return RecordSource(SourceKind.SQLITE, str(path.resolve()), table)
    return RecordSource(SourceKind.CSV, str(path.resolve()), None)


class _CsvReader:
    @staticmethod
    def columns(src: RecordSource) -> list[str]:
        try:
            return list(pd.read_csv(src.location, nrows=0).columns)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
            raise DataError(f"{src.display} is not a readable CSV: {exc}") from None

    @staticmethod
    def read(src: RecordSource, columns: list[str]) -> pd.DataFrame:
        try:
            return pd.read_csv(src.location, usecols=columns, dtype=str, keep_default_na=True)[columns]
        except (pd.errors.ParserError, UnicodeDecodeError) as exc:
            raise DataError(f"{src.display} is not a readable CSV: {exc}") from None


class _SqlReader:
    @staticmethod
    def _engine(src: RecordSource) -> sa.Engine:
        import sqlalchemy as sa

        url = src.location if src.kind is SourceKind.POSTGRESQL else f"sqlite:///{src.location}"
        return sa.create_engine(url)

    @staticmethod
    def _split(table: str) -> tuple[str | None, str]:
        schema, _, name = table.rpartition(".")
        return (schema or None), name

    @classmethod
    def columns(cls, src: RecordSource) -> list[str]:
        import sqlalchemy as sa

        engine = cls._engine(src)
        schema, name = cls._split(src.table or "")
        try:
            insp = sa.inspect(engine)
            if not insp.has_table(name, schema=schema):
                raise DataError(f"{redact_url(src.location)} has no table {src.table!r}; "
                                f"tables: {insp.get_table_names(schema=schema)}")
            return [c["name"] for c in insp.get_columns(name, schema=schema)]
        except sa.exc.OperationalError as exc:
            raise DataError(f"cannot reach {src.display}: {exc.orig}") from None
        finally:
            engine.dispose()

    @classmethod
    def read(cls, src: RecordSource, columns: list[str]) -> pd.DataFrame:
        import sqlalchemy as sa

        engine = cls._engine(src)
        schema, name = cls._split(src.table or "")
        table = sa.Table(name, sa.MetaData(), *[sa.Column(c) for c in columns], schema=schema)
        try:
            with engine.connect() as conn:
                return pd.read_sql(sa.select(*[table.c[c] for c in columns]), conn)
        except sa.exc.SQLAlchemyError as exc:
            raise DataError(f"cannot read {src.display}: {getattr(exc, 'orig', exc)}") from None
        finally:
            engine.dispose()


_READERS: dict[SourceKind, Any] = {SourceKind.CSV: _CsvReader, SourceKind.SQLITE: _SqlReader,
                                   SourceKind.POSTGRESQL: _SqlReader}


# -- typed reading ------------------------------------------------------------------------------
def _bad_rows(mask: np.ndarray) -> str:
    rows = np.flatnonzero(mask)
    shown = ", ".join(str(int(r) + 1) for r in rows[:5])
    return f"{len(rows)} value(s), first at data row(s) {shown}"


def _to_integer(s: pd.Series) -> pd.Series:
    num = pd.to_numeric(s, errors="coerce")
    bad = (num.isna() & s.notna()).to_numpy() | (num.notna() & (num % 1 != 0)).to_numpy()
    if bad.any():
        raise _TypeMismatch(bad)
    return num.astype("Int64")


def _to_float(s: pd.Series) -> pd.Series:
    num = pd.to_numeric(s, errors="coerce")
    bad = (num.isna() & s.notna()).to_numpy()
    if bad.any():
        raise _TypeMismatch(bad)
    return num.astype("float64")


def _to_date(s: pd.Series) -> pd.Series:
    if pd.api.types.is_datetime64_any_dtype(s):
        out = s
    else:
        text = s.astype("string")
        out = pd.to_datetime(text, errors="coerce", format="ISO8601")
        bad = (out.isna() & s.notna()).to_numpy()
        if bad.any():
            raise _TypeMismatch(bad)
    if getattr(out.dt, "tz", None) is not None:
        out = out.dt.tz_convert(None)
    return out.astype("datetime64[ns]").dt.normalize()


_TRUE = {"true", "t", "yes", "y", "1"}
_FALSE = {"false", "f", "no", "n", "0"}


def _to_boolean(s: pd.Series) -> pd.Series:
    if pd.api.types.is_bool_dtype(s):
        return s.astype("boolean")
    text = s.astype("string").str.strip().str.lower()
    out = pd.Series(pd.NA, index=s.index, dtype="boolean")
    out[text.isin(_TRUE).fillna(False).to_numpy(bool)] = True
    out[text.isin(_FALSE).fillna(False).to_numpy(bool)] = False
    bad = (out.isna() & s.notna()).to_numpy()
    if bad.any():
        raise _TypeMismatch(bad)
    return out


def _to_string(s: pd.Series) -> pd.Series:
    return s.astype("string")


class _TypeMismatch(Exception):
    def __init__(self, mask: np.ndarray) -> None:
        self.mask = mask


_COERCE: dict[ColumnType, Callable[[pd.Series], pd.Series]] = {
    ColumnType.STRING: _to_string,
    ColumnType.INTEGER: _to_integer,
    ColumnType.FLOAT: _to_float,
    ColumnType.DATE: _to_date,
    ColumnType.BOOLEAN: _to_boolean,
}


def conform(frame: pd.DataFrame, schema: RecordSchema, *, origin: str = "records") -> pd.DataFrame:
    """Check that ``frame`` holds every declared column with values of the declared type.

    Every problem is collected first and reported together, naming columns and row numbers.
    """
    missing = [c for c in schema.names if c not in frame.columns]
    if missing:
        raise DataError(f"{origin} lacks column(s) {missing} declared in the schema; "
                        f"it has: {list(frame.columns)}")
    out: dict[str, pd.Series] = {}
    problems = []
    for spec in schema.columns:
        s = frame[spec.name]
        try:
            out[spec.name] = _COERCE[spec.type](s)
        except _TypeMismatch as exc:
            problems.append(f"column {spec.name!r} is declared {spec.type.value} but {_bad_rows(exc.mask)} "
                            "do not parse as that")
            continue
        if not spec.nullable and out[spec.name].isna().any():
            problems.append(f"column {spec.name!r} is declared nullable = false but has "
                            f"{_bad_rows(out[spec.name].isna().to_numpy())} empty")
    if problems:
        raise DataError(f"{origin} does not match its schema: " + "; ".join(problems))
    return pd.DataFrame(out, index=pd.RangeIndex(len(frame)))


def read_records(source: RecordSource | str | os.PathLike[str], schema: RecordSchema, *,
                 table: str | None = None, audit: Any = None) -> pd.DataFrame:
    """Read the schema's columns from ``source`` and type-check them; ``audit`` (an AuditLog) records the access."""
    src = source if isinstance(source, RecordSource) else open_source(source, table or schema.table)
    available = src.columns()
    missing = [c for c in schema.names if c not in available]
    if missing:
        raise DataError(f"{src.display} lacks column(s) {missing} declared in the schema; it has: {available}")
    frame = conform(src.read(schema.names), schema, origin=src.display)
    if audit is not None:
        from insitu.audit import AuditAction

        audit.append(AuditAction.DATA_ACCESS, src.display,
                     {"kind": src.kind.value, "columns": schema.names, "rows": len(frame)})
    return frame


# -- writing ------------------------------------------------------------------------------------
def write_table(frame: pd.DataFrame, target: str | os.PathLike[str], *, table: str = "records",
                overwrite: bool = False) -> str:
    """Write a frame to a CSV file, a SQLite file (``.db``/``.sqlite``) or a PostgreSQL table.

    Files are written to a temporary name and renamed, so a failure leaves nothing behind.
    """
    import sqlalchemy as sa

    text = os.fspath(target)
    if text.startswith(("postgresql://", "postgres://", "postgresql+")):
        url = "postgresql+psycopg://" + text.split("://", 1)[1]
        engine = sa.create_engine(url)
        try:
            with engine.begin() as conn:
                frame.to_sql(table, conn, if_exists="replace" if overwrite else "fail", index=False)
        except ValueError as exc:
            raise DataError(f"{redact_url(url)} table {table!r}: {exc}; pass --overwrite to replace it") from None
        finally:
            engine.dispose()
        return f"{redact_url(url)} (table {table})"
    path = Path(text)
    if path.exists() and not overwrite:
        raise DataError(f"{path} already exists; pass --overwrite to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        if path.suffix.lower() in (".db", ".sqlite", ".sqlite3"):
            engine = sa.create_engine(f"sqlite:///{tmp}")
            try:
                with engine.begin() as conn:
                    frame.to_sql(table, conn, index=False)
            finally:
                engine.dispose()
        else:
            frame.to_csv(tmp, index=False)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return str(path)


__all__ = [
    "ColumnSpec",
    "ColumnType",
    "RecordSchema",
    "RecordSource",
    "Role",
    "SourceKind",
    "conform",
    "open_source",
    "read_records",
    "redact_url",
    "write_table",
]
