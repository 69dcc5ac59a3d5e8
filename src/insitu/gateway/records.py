"""Patient records behind the gateway: the full record, the nursing view, and their SQL store.

The full record carries direct identifiers (name, birth date) and the doctor's
clinical notes.  The nursing view is derived from it on every read and keeps
only what ward care needs, with identifiers dropped and age generalised to a
ten-year band; it is never stored, so it cannot drift from the record.

Storage is SQLAlchemy (SQLite by default, any SQLAlchemy URL works): one
``gateway_records`` table keyed by pseudonym, with an optimistic version
counter so two concurrent updates cannot silently overwrite each other.
"""
from __future__ import annotations

import datetime as dt
import enum
import json
import re
import threading
from typing import Annotated, Any

import sqlalchemy as sa
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints, WithJsonSchema

from insitu.data.sources import redact_url
from insitu.errors import ConfigError, DataError

PSEUDONYM_PATTERN = r"^[A-Za-z0-9_-]{4,64}$"
Pseudonym = Annotated[str, StringConstraints(pattern=PSEUDONYM_PATTERN)]
Ward = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,31}$")]
ShortText = Annotated[str, StringConstraints(max_length=200)]
LongText = Annotated[str, StringConstraints(max_length=4000)]
Items = Annotated[list[ShortText], Field(max_length=50)]

#: a calendar date from 1900-01-01 to 2099-12-31, leap days included, as the OpenAPI spec states it
DATE_PATTERN = (
    r"^(?:(?:19|20)\d\d-(?:(?:0[13578]|1[02])-(?:0[1-9]|[12]\d|3[01])|(?:0[469]|11)-(?:0[1-9]|[12]\d|30)"
    r"|02-(?:0[1-9]|1\d|2[0-8]))|(?:19(?:0[48]|[2468][048]|[13579][26])|20(?:[02468][048]|[13579][26]))-02-29)$"
)
_DATE_RE = re.compile(DATE_PATTERN)


def _birth_date(value: Any) -> Any:
    if not isinstance(value, (str, dt.date)) or isinstance(value, str) and not _DATE_RE.match(value):
        raise ValueError(f"a date YYYY-MM-DD from 1900-01-01 to 2099-12-31 is required, got {str(value)[:40]!r}")
    return dt.date.fromisoformat(value) if isinstance(value, str) else value


def _integral(value: Any) -> Any:
    # JSON Schema counts 138.0 as an integer; strict mode would not. true/false stay refused.
    return int(value) if isinstance(value, float) and value.is_integer() else value


BirthDate = Annotated[
    dt.date, BeforeValidator(_birth_date), Field(ge=dt.date(1900, 1, 1), le=dt.date(2099, 12, 31)),
    WithJsonSchema({"type": "string", "pattern": DATE_PATTERN, "description": "YYYY-MM-DD, 1900-01-01 to 2099-12-31"}),
]
Int = Annotated[int, BeforeValidator(_integral)]


class Sex(str, enum.Enum):
    FEMALE = "female"
    MALE = "male"


class ChestPain(str, enum.Enum):
    TYPICAL = "typical angina"
    ATYPICAL = "atypical angina"
    NON_ANGINAL = "non-anginal"
    ASYMPTOMATIC = "asymptomatic"


class RestEcg(str, enum.Enum):
    NORMAL = "normal"
    ST_T = "st-t abnormality"
    LVH = "lv hypertrophy"


class Mobility(str, enum.Enum):
    INDEPENDENT = "independent"
    ASSISTED = "assisted"
    BEDBOUND = "bedbound"


class RecordBody(BaseModel):
    """What a doctor writes with PUT: every field of the record except its key and bookkeeping."""

    model_config = ConfigDict(extra="forbid")

    ward: Ward
    name: Annotated[str, StringConstraints(min_length=1, max_length=200)]
    birth_date: BirthDate
    sex: Sex
    diagnosis: ShortText = ""
    physician_notes: LongText = ""
    medications: Items = []
    allergies: Items = []
    care_notes: LongText = ""
    mobility: Mobility = Mobility.INDEPENDENT
    resting_bp: Int = Field(ge=40, le=300, description="resting systolic blood pressure, mmHg")
    cholesterol: Int = Field(ge=0, le=1000, description="serum cholesterol, mg/dl")
    max_heart_rate: Int = Field(ge=30, le=250, description="maximum heart rate achieved, bpm")
    fasting_blood_sugar_high: bool = False
    exercise_angina: bool = False
    st_depression: float = Field(ge=-5.0, le=10.0, allow_inf_nan=False)
    chest_pain: ChestPain
    rest_ecg: RestEcg = RestEcg.NORMAL


class RecordPatch(BaseModel):
    """PATCH body: any non-empty subset of the record's fields (``null`` is not a value here)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"minProperties": 1})

    ward: Ward = None  # type: ignore[assignment]
    name: Annotated[str, StringConstraints(min_length=1, max_length=200)] = None  # type: ignore[assignment]
    birth_date: BirthDate = None  # type: ignore[assignment]
    sex: Sex = None  # type: ignore[assignment]
    diagnosis: ShortText = None  # type: ignore[assignment]
    physician_notes: LongText = None  # type: ignore[assignment]
    medications: Items = None  # type: ignore[assignment]
    allergies: Items = None  # type: ignore[assignment]
    care_notes: LongText = None  # type: ignore[assignment]
    mobility: Mobility = None  # type: ignore[assignment]
    resting_bp: Int = Field(None, ge=40, le=300)  # type: ignore[assignment]
    cholesterol: Int = Field(None, ge=0, le=1000)  # type: ignore[assignment]
    max_heart_rate: Int = Field(None, ge=30, le=250)  # type: ignore[assignment]
    fasting_blood_sugar_high: bool = None  # type: ignore[assignment]
    exercise_angina: bool = None  # type: ignore[assignment]
    st_depression: float = Field(None, ge=-5.0, le=10.0, allow_inf_nan=False)  # type: ignore[assignment]
    chest_pain: ChestPain = None  # type: ignore[assignment]
    rest_ecg: RestEcg = None  # type: ignore[assignment]

    def changes(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.model_fields_set if getattr(self, k) is not None}


class Record(RecordBody):
    pseudonym: Pseudonym
    version: int
    updated_at: dt.datetime


#: what ward care needs; everything else stays with the doctor.
NURSING_FIELDS = ("ward", "sex", "allergies", "medications", "care_notes", "mobility", "resting_bp", "max_heart_rate")


class NursingView(BaseModel):
    """The de-identified nursing subset: no name, no birth date, no diagnosis or physician notes."""

    pseudonym: str
    ward: str
    age_band: str
    sex: Sex
    allergies: list[str]
    medications: list[str]
    care_notes: str
    mobility: Mobility
    resting_bp: int
    max_heart_rate: int


def age_on(birth: dt.date, day: dt.date) -> int:
    return day.year - birth.year - ((day.month, day.day) < (birth.month, birth.day))


def nursing_view(rec: Record, today: dt.date) -> NursingView:
    age = max(0, age_on(rec.birth_date, today))
    lo = (age // 10) * 10
    band = "90+" if lo >= 90 else f"{lo}-{lo + 9}"
    return NursingView(pseudonym=rec.pseudonym, age_band=band, **{f: getattr(rec, f) for f in NURSING_FIELDS})


def _table(name: str) -> sa.Table:
    return sa.Table(
        name,
        sa.MetaData(),
        sa.Column("pseudonym", sa.String(64), primary_key=True),
        sa.Column("ward", sa.String(32), nullable=False, index=True),
        sa.Column("body", sa.Text, nullable=False),  # JSON of RecordBody
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("updated_at", sa.String(40), nullable=False),
    )


def store_url(target: str) -> str:
    """A path becomes ``sqlite:///path``; ``postgresql://`` gets the psycopg 3 driver (as site sources do)."""
    if target.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + target.split("://", 1)[1]
    if "://" in target:
        return target
    return f"sqlite:///{target}"


class RecordStore:
    """Records by pseudonym through SQLAlchemy (SQLite or PostgreSQL); every write is one transaction."""

    def __init__(self, url: str, table: str = "gateway_records", models: Any = None):
        from insitu.gateway.record_schema import HEART_RECORDS

        #: the record format (insitu.gateway.record_schema.RecordModels): the consortium schema's, or the built-in one
        self.models = models if models is not None else HEART_RECORDS
        if not re.match(r"^[a-z_][a-z0-9_]{0,62}$", table):
            raise ConfigError(f"record table name {table!r} must be lower-case letters, digits and _")
        url = store_url(url)
        self.table = records_table = _table(table)
        try:
            kw: dict[str, Any] = {}
            if url.startswith("sqlite"):
                kw["connect_args"] = {"check_same_thread": False}
            self.engine = sa.create_engine(url, **kw)
            try:
                records_table.metadata.create_all(self.engine)
            except sa.exc.SQLAlchemyError:
                # another process (a second gateway worker) created it between our check and CREATE
                if not sa.inspect(self.engine).has_table(table):
                    raise
        except sa.exc.SQLAlchemyError as exc:
            raise ConfigError(f"cannot open record store {redact_url(url)!r}: {getattr(exc, 'orig', exc)}") from None
        self._lock = threading.Lock()  # SQLite allows one writer; serialise ours rather than retry

    def _row_to_record(self, row: Any) -> Record:
        body = json.loads(row.body)
        return self.models.record(pseudonym=row.pseudonym, version=row.version, updated_at=dt.datetime.fromisoformat(row.updated_at), **body)

    def get(self, pseudonym: str) -> Record | None:
        with self.engine.connect() as c:
            row = c.execute(sa.select(self.table).where(self.table.c.pseudonym == pseudonym)).first()
        return self._row_to_record(row) if row else None

    def ward_of(self, pseudonym: str) -> str | None:
        with self.engine.connect() as c:
            return c.execute(sa.select(self.table.c.ward).where(self.table.c.pseudonym == pseudonym)).scalar()

    def put(self, pseudonym: str, body: RecordBody, now: dt.datetime) -> Record:
        """Create or replace; returns the stored record with its new version."""
        data = body.model_dump(mode="json")
        with self._lock, self.engine.begin() as c:
            old = c.execute(sa.select(self.table.c.version).where(self.table.c.pseudonym == pseudonym)).scalar()
            version = 1 if old is None else old + 1
            values = dict(ward=body.ward, body=json.dumps(data), version=version, updated_at=now.isoformat())
            if old is None:
                c.execute(self.table.insert().values(pseudonym=pseudonym, **values))
            else:
                c.execute(self.table.update().where(self.table.c.pseudonym == pseudonym).values(**values))
        return self.models.record(pseudonym=pseudonym, version=version, updated_at=now, **body.model_dump())

    def patch(self, pseudonym: str, patch: RecordPatch, now: dt.datetime) -> Record | None:
        """Apply the fields present in ``patch``; None if there is no such record."""
        with self._lock:
            current = self.get(pseudonym)
            if current is None:
                return None
            merged = {**current.model_dump(include=set(self.models.body.model_fields)), **patch.changes()}
            try:
                body = self.models.body(**merged)
            except ValueError as exc:
                raise DataError(f"record {pseudonym} would be invalid after this change: {exc}") from None
            data = body.model_dump(mode="json")
            with self.engine.begin() as c:
                res = c.execute(
                    self.table.update()
                    .where(self.table.c.pseudonym == pseudonym, self.table.c.version == current.version)
                    .values(ward=body.ward, body=json.dumps(data), version=current.version + 1, updated_at=now.isoformat())
                )
                if res.rowcount != 1:
                    raise DataError(f"record {pseudonym} changed concurrently; retry the update")
        return self.models.record(pseudonym=pseudonym, version=current.version + 1, updated_at=now, **body.model_dump())

    def count(self) -> int:
        with self.engine.connect() as c:
            return int(c.execute(sa.select(sa.func.count()).select_from(self.table)).scalar() or 0)


def bodies_from_source(source: str, table: str | None = None, models: Any = None) -> list[tuple[str, RecordBody]]:
    """Read records from a site source (CSV, SQLite or PostgreSQL, as ``insitu.data.sources`` opens
    them): a ``pseudonym`` column plus the record's fields (``models``: the record format,
    :mod:`insitu.gateway.record_schema`; default the built-in one); list fields are ``;``-separated.

    Every row is validated before anything is written; errors name rows and fields, never values.
    """
    import pandas as pd

    from insitu.data.sources import RecordSource, open_source

    src = open_source(source, table)
    if not isinstance(src, RecordSource):
        raise DataError(f"{src.display} is a {src.kind.value} source; gateway imports read a table "
                        "(CSV, SQLite or PostgreSQL)")
    from insitu.gateway.record_schema import HEART_RECORDS

    models = models if models is not None else HEART_RECORDS
    available = src.columns()
    wanted = ["pseudonym", *models.body.model_fields]
    required = ["pseudonym", *(n for n, f in models.body.model_fields.items() if f.is_required())]
    missing = [c for c in required if c not in available]
    if missing:
        raise DataError(f"{src.display} lacks required column(s) {missing}; it has {available}")
    frame = src.read([c for c in wanted if c in available])
    out: list[tuple[str, RecordBody]] = []
    problems: list[str] = []
    seen: set[str] = set()
    for i, row in enumerate(frame.to_dict("records"), start=1):
        values = {k: v for k, v in row.items() if v is not None and not (isinstance(v, float) and pd.isna(v))}
        for k in models.list_fields:
            if isinstance(values.get(k), str):
                values[k] = [x.strip() for x in values[k].split(";") if x.strip()]
        pseudonym = str(values.pop("pseudonym", ""))
        if not re.match(PSEUDONYM_PATTERN, pseudonym) or pseudonym in seen:
            problems.append(f"row {i}: pseudonym missing, malformed or repeated")
            continue
        seen.add(pseudonym)
        try:
            out.append((pseudonym, models.body(**values)))
        except ValueError as exc:
            fields = sorted({str(e["loc"][0]) for e in getattr(exc, "errors", lambda: [])() if e.get("loc")})
            problems.append(f"row {i}: invalid field(s) {fields}")
    if problems:
        more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
        raise DataError(f"{src.display}: " + "; ".join(problems[:10]) + more + "; nothing was imported")
    return out


__all__ = ["bodies_from_source", "Record", "RecordBody", "RecordPatch", "NursingView", "nursing_view", "RecordStore", "store_url", "NURSING_FIELDS", "PSEUDONYM_PATTERN"]
