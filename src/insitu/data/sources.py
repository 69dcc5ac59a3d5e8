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

Where records are not a table, a column says where its value comes from: ``fhir = {...}`` for a FHIR
export or server (``insitu.data.fhir``), ``dicom = "Keyword"`` or ``file = "folder"`` for DICOM studies
and image folders (``insitu.data.imaging``, which also reads a top-level ``[pixels]`` table).  A string
column may declare its ``levels`` (allowed values, in order: a label's classes, a category's one-hot
order); any other value is refused.

Every source, whatever its kind, answers one call, ``fetch(schema) -> Records``: the declared columns,
untyped or typed, plus pixel arrays for image sources.  ``read_records`` and ``read_dataset`` then check
every value against the schema the same way for all of them.

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
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
import pandas as pd

if TYPE_CHECKING:  # SQLAlchemy (~0.6 s to import) loads only for SQLite / PostgreSQL sources
    import sqlalchemy as sa

from insitu.errors import ConfigError, DataError, parse_choice


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
    """One declared column: its name, role and type, and where a non-table source finds it.

    ``levels`` lists the allowed values of a string column, in order; ``binding`` is the parsed
    ``fhir``/``dicom``/``file`` declaration of a source that is not a table (None for tables).
    """

    name: str
    role: Role
    type: ColumnType
    feature: str
    nullable: bool = True
    levels: tuple[str, ...] | None = None
    binding: Any = None


@dataclass(frozen=True)
class PixelSpec:
    """The images an image source must hold: every one ``channels × height × width`` after reading.

    ``channels`` is 1 (grayscale) or 3 (RGB); an image of another size is refused, never resized
    silently (a resize changes what the model sees at one site and not at another).
    """

    height: int
    width: int
    channels: int = 1

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.height, self.width)

    @classmethod
    def from_dict(cls, raw: Any, *, origin: str) -> "PixelSpec":
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{origin}: [pixels] must be a table with height, width and channels")
        bad = set(raw) - {"height", "width", "channels"}
        if bad:
            raise ConfigError(f"{origin}: [pixels] has unknown key(s) {sorted(bad)}; allowed: height, width, channels")
        vals = {}
        for key, lo, hi in (("height", 1, 4096), ("width", 1, 4096), ("channels", 1, 3)):
            v = raw.get(key, 1 if key == "channels" else None)
            if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
                raise ConfigError(f"{origin}: [pixels] {key} must be an integer from {lo} to {hi}, got {v!r}")
            vals[key] = v
        if vals["channels"] == 2:
            raise ConfigError(f"{origin}: [pixels] channels must be 1 (grayscale) or 3 (RGB), got 2")
        return cls(**vals)


# Per-column keys that say where a non-table source finds the value; each names the module that
# parses it (a fixed table: nothing read from a file picks code).
_BINDING_KEYS = {"fhir": "insitu.data.fhir", "dicom": "insitu.data.imaging", "file": "insitu.data.imaging"}


def _parse_binding(key: str, value: Any, column: str, role: Role, ctype: ColumnType, origin: str) -> Any:
    import importlib

    module = importlib.import_module(_BINDING_KEYS[key])
    return module.parse_binding(key, value, column=column, role=role, ctype=ctype, origin=origin)


@dataclass(frozen=True)
class RecordSchema:
    """The declared columns of one record table, in declaration order (plus pixels for images)."""

    columns: tuple[ColumnSpec, ...]
    table: str | None = None
    pixels: PixelSpec | None = None

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
        unknown = set(raw) - {"table", "columns", "pixels"}
        if unknown:
            raise ConfigError(f"{origin}: unknown top-level key(s) {sorted(unknown)}; allowed: table, columns, pixels")
        cols_raw = raw.get("columns")
        if not isinstance(cols_raw, Mapping) or not cols_raw:
            raise ConfigError(f"{origin}: declare at least one [columns.<name>] table")
        cols = []
        for name, spec in cols_raw.items():
            if not isinstance(spec, Mapping):
                raise ConfigError(f"{origin}: [columns.{name}] must be a table with role and type")
            bad = set(spec) - {"role", "type", "feature", "nullable", "levels", *_BINDING_KEYS}
            if bad:
                raise ConfigError(f"{origin}: column {name!r} has unknown key(s) {sorted(bad)}; "
                                  f"allowed: role, type, feature, nullable, levels, {', '.join(_BINDING_KEYS)}")
            role = parse_choice(Role, spec.get("role"), f"{origin}: column {name!r} role")
            ctype = parse_choice(ColumnType, spec.get("type"), f"{origin}: column {name!r} type")
            feature = spec.get("feature", name)
            if not isinstance(feature, str) or not feature:
                raise ConfigError(f"{origin}: column {name!r} feature must be a non-empty string")
            levels = spec.get("levels")
            if levels is not None:
                if ctype is not ColumnType.STRING:
                    raise ConfigError(f"{origin}: column {name!r} declares levels, which only a string column may")
                if (not isinstance(levels, list) or len(levels) < 2 or len(set(levels)) != len(levels)
                        or not all(isinstance(v, str) and v for v in levels)):
                    raise ConfigError(f"{origin}: column {name!r} levels must be a list of at least two "
                                      "distinct non-empty strings")
                levels = tuple(levels)
            keys = [k for k in _BINDING_KEYS if k in spec]
            if len(keys) > 1:
                raise ConfigError(f"{origin}: column {name!r} declares {keys}; a column comes from one place")
            binding = _parse_binding(keys[0], spec[keys[0]], name, role, ctype, origin) if keys else None
            cols.append(ColumnSpec(name, role, ctype, feature, bool(spec.get("nullable", True)), levels, binding))
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
        pixels = PixelSpec.from_dict(raw["pixels"], origin=origin) if "pixels" in raw else None
        return cls(tuple(cols), table, pixels)

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


# -- sources ------------------------------------------------------------------------------------
class SourceKind(StrEnum):
    CSV = "csv"
    SQLITE = "sqlite"
    POSTGRESQL = "postgresql"
    FHIR_NDJSON = "fhir-ndjson"  # a FHIR Bulk Data export: a folder of NDJSON files (insitu.data.fhir)
    FHIR_SERVER = "fhir-server"  # a FHIR server's search API, page by page (insitu.data.fhir)
    IMAGE_FOLDER = "image-folder"  # one folder per class of PNG/JPEG images (insitu.data.imaging)
    DICOM = "dicom"  # a folder tree of DICOM files (insitu.data.imaging)


@dataclass(frozen=True)
class Records:
    """What a source yields for a schema: one row per record, and for image sources one pixel array
    per row (``pixels[i]`` belongs to ``frame.iloc[i]``, shape ``(N, channels, height, width)``)."""

    frame: pd.DataFrame
    pixels: np.ndarray | None = None


@runtime_checkable
class Source(Protocol):
    """Anything records are read from.  ``fetch`` returns the schema's columns (raw or typed: the
    caller type-checks them) and raises ``DataError`` naming what is missing, never a value."""

    kind: SourceKind

    @property
    def display(self) -> str: ...

    def fetch(self, schema: RecordSchema) -> Records: ...


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

    def fetch(self, schema: RecordSchema) -> Records:
        available = self.columns()
        missing = [c for c in schema.names if c not in available]
        if missing:
            raise DataError(f"{self.display} lacks column(s) {missing} declared in the schema; it has: {available}")
        return Records(self.read(schema.names))


def open_source(spec: str | os.PathLike[str], table: str | None = None) -> Source:
    """Recognize a source: ``postgresql://`` URL, ``sqlite:///`` URL or SQLite file, a CSV file, an
    ``http(s)://`` FHIR server base URL, or a folder (a FHIR NDJSON export, DICOM files, or one
    sub-folder of images per class)."""
    text = os.fspath(spec)
    if text.startswith(("http://", "https://")):
        from insitu.data.fhir import FhirServerSource

        return FhirServerSource(text)
    if "://" not in text and Path(text).is_dir():
        return _open_folder(Path(text))
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
        raise ConfigError(f"source {redact_url(text)!r}: use a CSV path, a SQLite file, a postgresql:// URL, "
                          "an http(s):// FHIR server or a folder")
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


def _open_folder(path: Path) -> Source:
    """A FHIR export (``*.ndjson``), DICOM files (``*.dcm`` or the DICM preamble) or class folders."""
    from insitu.data import imaging
    from insitu.data.fhir import FhirNdjsonSource

    if any(path.glob("*.ndjson")):
        return FhirNdjsonSource(str(path.resolve()))
    if imaging.looks_like_dicom(path):
        return imaging.DicomSource(str(path.resolve()))
    if any(p.is_dir() for p in path.iterdir()):
        return imaging.ImageFolderSource(str(path.resolve()))
    raise DataError(f"folder {path} holds no *.ndjson FHIR export, no DICOM files and no class sub-folders")


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
    """Check that ``frame`` holds every declared column with values of the declared type (and, for
    a column with ``levels``, one of them).

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
        if spec.levels is not None:
            col = out[spec.name]
            outside = (col.notna() & ~col.isin(spec.levels)).to_numpy(bool)
            if outside.any():
                problems.append(f"column {spec.name!r} has {_bad_rows(outside)} outside its declared levels "
                                f"{list(spec.levels)}")
    if problems:
        raise DataError(f"{origin} does not match its schema: " + "; ".join(problems))
    return pd.DataFrame(out, index=pd.RangeIndex(len(frame)))


def read_dataset(source: Source | str | os.PathLike[str], schema: RecordSchema, *,
                 table: str | None = None, audit: Any = None) -> Records:
    """Read the schema's columns (and pixels, for image sources) from ``source`` and type-check them;
    ``audit`` (an AuditLog) records the access."""
    src = source if isinstance(source, Source) else open_source(source, table or schema.table)
    fetched = src.fetch(schema)
    frame = conform(fetched.frame, schema, origin=src.display)
    if fetched.pixels is not None and len(fetched.pixels) != len(frame):
        raise DataError(f"{src.display}: {len(fetched.pixels)} images for {len(frame)} records")
    if audit is not None:
        from insitu.audit import AuditAction

        audit.append(AuditAction.DATA_ACCESS, src.display,
                     {"kind": src.kind.value, "columns": schema.names, "rows": len(frame)})
    return Records(frame, fetched.pixels)


def read_records(source: Source | str | os.PathLike[str], schema: RecordSchema, *,
                 table: str | None = None, audit: Any = None) -> pd.DataFrame:
    """Read the schema's columns from ``source`` and type-check them; ``audit`` (an AuditLog) records the access."""
    return read_dataset(source, schema, table=table, audit=audit).frame


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
    "PixelSpec",
    "RecordSchema",
    "RecordSource",
    "Records",
    "Role",
    "Source",
    "SourceKind",
    "conform",
    "open_source",
    "read_dataset",
    "read_records",
    "redact_url",
    "write_table",
]
