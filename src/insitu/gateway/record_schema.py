"""The gateway's record, nursing view and import format, made from the consortium's record schema.

``[records] schema = "schema.toml"`` in ``gateway.toml`` names the same schema file the sites read
their records through (:class:`insitu.data.sources.RecordSchema`).  The gateway then stores and
serves records of exactly those columns, plus its own ``ward`` (which ward-scoped rules need):

* ``PUT /records/{pseudonym}`` takes every column: a non-nullable column is required, a nullable
  one may be left out or ``null``.  Types are the schema's, strictly: ``string`` (at most 200
  characters; with ``levels``, one of them), ``integer``, ``float`` (finite), ``date``
  (``YYYY-MM-DD``), ``boolean``.  ``PATCH`` takes any non-empty subset (``null`` is no value there).
* ``GET /nursing/{pseudonym}`` derives the view from the columns' roles, on every read: features
  and labels are shown; quasi-identifiers are generalised (a number to its ten-wide band such as
  ``"60-69"``, a category with declared ``levels`` and a boolean kept, free text and dates left
  out); direct identifiers and sensitive columns are never shown.
* ``insitu gateway import-records`` reads a ``pseudonym`` and a ``ward`` column plus the schema's.

Without ``[records] schema`` the gateway keeps its built-in demonstration record (the heart
fields of :mod:`.records`).
"""
from __future__ import annotations

import datetime as dt
import enum
import keyword
import re
from dataclasses import dataclass
from typing import Annotated, Any, Callable, Optional

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints, WithJsonSchema, create_model

from insitu.data.sources import ColumnSpec, ColumnType, RecordSchema, Role
from insitu.errors import ConfigError
from insitu.gateway.records import (
    DATE_PATTERN, Int, NursingView, Pseudonym, Record, RecordBody, RecordPatch, ShortText, Ward, _birth_date, nursing_view,
)

#: names the gateway gives its own meaning in a record
RESERVED = frozenset({"ward", "pseudonym", "version", "updated_at"})


@dataclass(frozen=True)
class RecordModels:
    """The pydantic models of one record format and the function that derives its nursing view."""

    body: type[BaseModel]
    patch: type[BaseModel]
    record: type[BaseModel]
    nursing: type[BaseModel]
    view: Callable[[Any, dt.date], BaseModel]
    list_fields: tuple[str, ...] = ()  # columns an import splits on ";"
    origin: str = "built-in heart demonstration record"


#: the built-in record (no [records] schema): the heart demonstration fields of insitu.gateway.records
HEART_RECORDS = RecordModels(RecordBody, RecordPatch, Record, NursingView, nursing_view, ("medications", "allergies"))

Date = Annotated[
    dt.date, BeforeValidator(_birth_date), Field(ge=dt.date(1900, 1, 1), le=dt.date(2099, 12, 31)),
    WithJsonSchema({"type": "string", "pattern": DATE_PATTERN, "description": "YYYY-MM-DD, 1900-01-01 to 2099-12-31"}),
]


def _type(col: ColumnSpec) -> Any:
    if col.type is ColumnType.STRING:
        if col.levels:
            return enum.Enum(f"{col.name}_levels", {f"v{i}": v for i, v in enumerate(col.levels)}, type=str)  # type: ignore[misc]
        return ShortText
    if col.type is ColumnType.INTEGER:
        return Int
    if col.type is ColumnType.FLOAT:
        return Annotated[float, Field(allow_inf_nan=False)]
    if col.type is ColumnType.DATE:
        return Date
    return bool


class _PatchBase(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"minProperties": 1})

    def changes(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.model_fields_set if getattr(self, k) is not None}


def _band(value: float) -> str:
    lo = int(value // 10) * 10
    return f"{lo}-{lo + 9}"


def _shown(col: ColumnSpec) -> str | None:
    """How the nursing view shows a column: "as is", "band", or None (left out)."""
    if col.role in (Role.FEATURE, Role.LABEL):
        return "as is"
    if col.role is Role.QUASI_IDENTIFIER:
        if col.type in (ColumnType.INTEGER, ColumnType.FLOAT):
            return "band"
        if col.type is ColumnType.BOOLEAN or (col.type is ColumnType.STRING and col.levels):
            return "as is"
    return None


def records_from_schema(schema: RecordSchema, origin: str = "schema") -> RecordModels:
    """The record format of ``schema`` (see the module docstring); a column name that cannot be a
    record field is refused naming it."""
    if schema.pixels is not None:
        raise ConfigError(f"{origin}: an image schema has no record fields for the gateway to store")
    for c in schema.columns:
        if not re.fullmatch(r"[a-z][a-z0-9_]{0,62}", c.name) or keyword.iskeyword(c.name) or c.name.startswith("model_"):
            raise ConfigError(f"{origin}: column {c.name!r} cannot be a gateway record field: use lower-case letters, "
                              "digits and _ (not starting with model_)")
        if c.name in RESERVED:
            raise ConfigError(f"{origin}: column {c.name!r} clashes with the gateway's own field of that name ({sorted(RESERVED)})")
    strict = ConfigDict(extra="forbid")
    fields: dict[str, Any] = {"ward": (Ward, ...)}
    for c in schema.columns:
        t = _type(c)
        fields[c.name] = (Optional[t], None) if c.nullable else (t, ...)
    body = create_model("RecordBody", __config__=strict, **fields)
    patch = create_model("RecordPatch", __base__=_PatchBase, ward=(Ward, None),
                         **{c.name: (_type(c), None) for c in schema.columns})
    record = create_model("Record", __base__=body, pseudonym=(Pseudonym, ...), version=(int, ...), updated_at=(dt.datetime, ...))
    shown = {c.name: how for c in schema.columns if (how := _shown(c)) is not None}
    nursing_fields: dict[str, Any] = {"pseudonym": (str, ...), "ward": (str, ...)}
    for c in schema.columns:
        if c.name in shown:
            nursing_fields[c.name] = (Optional[str] if shown[c.name] == "band" else Optional[_type(c)], None)
    nursing = create_model("NursingView", **nursing_fields)

    def view(rec: Any, _today: dt.date) -> BaseModel:
        out: dict[str, Any] = {"pseudonym": rec.pseudonym, "ward": rec.ward}
        for name, how in shown.items():
            v = getattr(rec, name)
            out[name] = _band(v) if how == "band" and v is not None else v
        return nursing(**out)

    return RecordModels(body, patch, record, nursing, view, (), origin)


__all__ = ["HEART_RECORDS", "RecordModels", "records_from_schema"]
