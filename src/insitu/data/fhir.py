"""FHIR R4 record sources: a Bulk Data export (NDJSON files) or a FHIR server's search API.

One row per Patient.  Each schema column says where its value comes from with a ``fhir`` key, and
resources are matched by the code systems the schema declares (LOINC, SNOMED CT, ICD-10), never by
display text::

    [columns.patient_id]                # Patient elements: id, gender, birthDate, deceased
    role = "direct_identifier"
    type = "string"
    fhir = "Patient.id"

    [columns.age]                       # age in whole years on a fixed date (deterministic)
    role = "quasi_identifier"
    type = "integer"
    fhir = { resource = "Patient", field = "age", on = "2024-01-01" }

    [columns.cholesterol]               # an Observation's value; matched on code or component code
    role = "feature"
    type = "float"
    fhir = { resource = "Observation", system = "loinc", code = "2093-3", pick = "latest", unit = "mg/dL" }

    [columns.diabetes]                  # a Condition is present (ICD-10 codes may end in * for a prefix)
    role = "feature"
    type = "boolean"
    fhir = { resource = "Condition", system = "icd10", code = ["E10*", "E11*"] }

    [columns.admissions]                # Encounters, optionally of one class or type
    role = "feature"
    type = "integer"
    fhir = { resource = "Encounter", class = "IMP", pick = "count" }

``pick`` chooses among a patient's matching resources: ``latest``/``earliest`` (by effective or onset
time; a Condition's or Encounter's date), ``mean``/``min``/``max`` (numbers), ``count``, ``any``
(present or not).  Observations that are ``entered-in-error`` or ``cancelled`` and Conditions whose
verification is ``refuted`` or ``entered-in-error`` never count.  Partial dates (``2020-05``) are
taken at their first day.

Resources are parsed with ``fhir.resources`` (its R4B models: R4B changed none of the elements read
here, so R4 exports parse unchanged).  A resource that does not validate is refused naming the file
and line (or page and entry) and the element path, never the value; a resource that points to a
patient the export does not hold is refused the same way.
"""
from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from enum import StrEnum
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlencode, urljoin, urlsplit

import pandas as pd

from insitu.data.sources import ColumnType, RecordSchema, Records, Role, SourceKind
from insitu.errors import ConfigError, DataError, parse_choice


class FhirResource(StrEnum):
    PATIENT = "Patient"
    OBSERVATION = "Observation"
    CONDITION = "Condition"
    ENCOUNTER = "Encounter"


class CodeSystem(StrEnum):
    """Code systems a schema may name by a short name; the value is the FHIR system URI."""

    LOINC = "http://loinc.org"
    SNOMED = "http://snomed.info/sct"
    ICD10 = "http://hl7.org/fhir/sid/icd-10"
    ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"


_SYSTEM_NAMES = {"loinc": CodeSystem.LOINC, "snomed": CodeSystem.SNOMED, "icd10": CodeSystem.ICD10,
                 "icd10cm": CodeSystem.ICD10CM}


class PatientField(StrEnum):
    ID = "id"
    GENDER = "gender"
    BIRTH_DATE = "birthDate"
    DECEASED = "deceased"
    AGE = "age"


class Pick(StrEnum):
    LATEST = "latest"
    EARLIEST = "earliest"
    MEAN = "mean"
    MIN = "min"
    MAX = "max"
    COUNT = "count"
    ANY = "any"


_PATIENT_TYPES = {PatientField.ID: {ColumnType.STRING}, PatientField.GENDER: {ColumnType.STRING},
                  PatientField.BIRTH_DATE: {ColumnType.DATE}, PatientField.DECEASED: {ColumnType.BOOLEAN},
                  PatientField.AGE: {ColumnType.INTEGER, ColumnType.FLOAT}}
_NUMBER = {ColumnType.INTEGER, ColumnType.FLOAT}


@dataclass(frozen=True)
class FhirBinding:
    """Where one column's value comes from in a patient's FHIR resources (parsed from ``fhir = ...``)."""

    resource: FhirResource
    field: PatientField | None = None  # Patient columns
    on: dt.date | None = None  # the date an age is computed at
    system: str | None = None  # code system URI
    codes: tuple[str, ...] = ()  # codes; a trailing * matches a prefix (ICD-10 chapters)
    pick: Pick | None = None
    unit: str | None = None  # Observation: the UCUM unit every value must carry
    encounter_class: str | None = None  # Encounter: v3 ActCode class (IMP, AMB, EMER, ...)

    def matches(self, codings: Iterable[Any]) -> bool:
        for c in codings or ():
            if c.system != self.system or not c.code:
                continue
            for want in self.codes:
                if c.code == want or (want.endswith("*") and c.code.startswith(want[:-1])):
                    return True
        return False

    @property
    def prefix(self) -> bool:
        return any(c.endswith("*") for c in self.codes)


def parse_binding(key: str, value: Any, *, column: str, role: Role, ctype: ColumnType, origin: str) -> FhirBinding:
    """Parse and check one column's ``fhir`` declaration against the column's type."""
    what = f"{origin}: column {column!r} fhir"
    if isinstance(value, str):
        resource, _, fld = value.partition(".")
        if resource != FhirResource.PATIENT or not fld:
            raise ConfigError(f"{what} = {value!r}: the short form is Patient.<field> "
                              f"({', '.join(f.value for f in PatientField if f is not PatientField.AGE)}); "
                              "other resources need a table: { resource = ..., system = ..., code = ... }")
        value = {"resource": "Patient", "field": fld}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{what} must be a string (Patient.<field>) or a table")
    resource = parse_choice(FhirResource, value.get("resource"), f"{what} resource")
    allowed = {FhirResource.PATIENT: {"resource", "field", "on"},
               FhirResource.OBSERVATION: {"resource", "system", "code", "pick", "unit"},
               FhirResource.CONDITION: {"resource", "system", "code", "pick"},
               FhirResource.ENCOUNTER: {"resource", "system", "code", "class", "pick"}}[resource]
    bad = set(value) - allowed
    if bad:
        raise ConfigError(f"{what}: {resource.value} takes {sorted(allowed)}, not {sorted(bad)}")
    if resource is FhirResource.PATIENT:
        return _patient_binding(value, ctype, what)
    system, codes = None, ()
    if "system" in value or "code" in value or resource is not FhirResource.ENCOUNTER:
        system = _system(value.get("system"), what)
        raw = value.get("code")
        codes = tuple(raw) if isinstance(raw, list) else (raw,)
        if not codes or not all(isinstance(c, str) and c and c != "*" for c in codes):
            raise ConfigError(f"{what}: code must be a code or a list of codes (from {system})")
        if resource is FhirResource.OBSERVATION and any(c.endswith("*") for c in codes):
            raise ConfigError(f"{what}: a prefix (code ending in *) is for Condition and Encounter codes, "
                              "not Observations; list the LOINC codes")
    default = {FhirResource.OBSERVATION: Pick.LATEST, FhirResource.CONDITION: Pick.ANY,
               FhirResource.ENCOUNTER: Pick.COUNT}[resource]
    pick = parse_choice(Pick, value.get("pick", default), f"{what} pick")
    if pick is Pick.COUNT:
        fits = _NUMBER
    elif pick is Pick.ANY:
        fits = {ColumnType.BOOLEAN}
    elif resource is FhirResource.OBSERVATION:
        fits = _NUMBER if pick in (Pick.MEAN, Pick.MIN, Pick.MAX) else set(ColumnType) - {ColumnType.DATE}
    elif pick in (Pick.LATEST, Pick.EARLIEST):
        fits = {ColumnType.DATE}
    else:
        raise ConfigError(f"{what}: pick = {pick.value!r} needs values; a {resource.value} has none "
                          "(use any, count, earliest or latest)")
    if ctype not in fits:
        raise ConfigError(f"{what}: pick = {pick.value!r} on {resource.value} gives "
                          f"{' or '.join(sorted(t.value for t in fits))}, but the column is declared {ctype.value}")
    unit = value.get("unit")
    if unit is not None and (not isinstance(unit, str) or not unit):
        raise ConfigError(f"{what}: unit must be a UCUM unit string such as 'mg/dL'")
    klass = value.get("class")
    if klass is not None and (not isinstance(klass, str) or not klass):
        raise ConfigError(f"{what}: class must be an encounter class code such as 'IMP'")
    return FhirBinding(resource, system=system, codes=codes, pick=pick, unit=unit, encounter_class=klass)


def _patient_binding(value: Mapping[str, Any], ctype: ColumnType, what: str) -> FhirBinding:
    fld = parse_choice(PatientField, value.get("field"), f"{what} Patient field")
    if ctype not in _PATIENT_TYPES[fld]:
        raise ConfigError(f"{what}: Patient.{fld.value} gives "
                          f"{' or '.join(sorted(t.value for t in _PATIENT_TYPES[fld]))}, "
                          f"but the column is declared {ctype.value}")
    on = value.get("on")
    if fld is PatientField.AGE:
        if isinstance(on, str):
            try:
                on = dt.date.fromisoformat(on)
            except ValueError:
                on = None
        if not isinstance(on, dt.date) or isinstance(on, dt.datetime):
            raise ConfigError(f"{what}: an age needs on = \"YYYY-MM-DD\", the date it is computed at "
                              "(a fixed date keeps every site's features the same)")
    elif on is not None:
        raise ConfigError(f"{what}: on is only for field = \"age\"")
    return FhirBinding(FhirResource.PATIENT, field=fld, on=on)


def _system(raw: Any, what: str) -> str:
    if isinstance(raw, str) and raw in _SYSTEM_NAMES:
        return _SYSTEM_NAMES[raw].value
    if isinstance(raw, str) and raw.startswith(("http://", "https://", "urn:")):
        return raw
    raise ConfigError(f"{what}: system is {raw!r}; use one of {sorted(_SYSTEM_NAMES)} or a code system URI")


def fhir_columns(schema: RecordSchema) -> list[tuple[str, FhirBinding]]:
    """The schema's columns with their FHIR bindings; every column must have one."""
    out, missing = [], []
    for c in schema.columns:
        if isinstance(c.binding, FhirBinding):
            out.append((c.name, c.binding))
        else:
            missing.append(c.name)
    if missing:
        raise ConfigError(f"a FHIR source needs a fhir = ... declaration on every column; "
                          f"{missing} have none")
    if not any(b.resource is FhirResource.PATIENT for _, b in out):
        raise ConfigError("a FHIR schema needs at least one Patient column (e.g. fhir = \"Patient.id\"): "
                          "rows are patients")
    return out


# -- reading resources ------------------------------------------------------------------------------
def _model(resource_type: FhirResource) -> Any:
    from fhir.resources.R4B import get_fhir_model_class

    return get_fhir_model_class(resource_type.value)


def _validation_problem(exc: Any) -> str:
    """A pydantic error reduced to element paths and error kinds: its messages may quote the value."""
    parts = []
    for e in exc.errors(include_url=False, include_input=False, include_context=False)[:3]:
        loc = ".".join(str(p) for p in e.get("loc", ()) if p != "__root__") or "(resource)"
        parts.append(f"{loc} ({e.get('type', 'invalid')})")
    return "; ".join(parts)


def _start(value: Any) -> dt.datetime | None:
    """A FHIR date/dateTime (object or partial string) as a naive datetime at its first instant."""
    if value is None:
        return None
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.timezone.utc).replace(tzinfo=None) if value.tzinfo else value
    if isinstance(value, dt.date):
        return dt.datetime(value.year, value.month, value.day)
    text = str(value)
    try:
        if len(text) == 4:
            return dt.datetime(int(text), 1, 1)
        if len(text) == 7:
            return dt.datetime(int(text[:4]), int(text[5:7]), 1)
        return dt.datetime.fromisoformat(text)
    except ValueError:
        return None


def _patient_key(reference: Any) -> str | None:
    """``Patient/123``, ``http://host/fhir/Patient/123`` or ``Patient/123/_history/2`` → ``123``."""
    ref = getattr(reference, "reference", None)
    if not ref:
        return None
    parts = ref.split("/")
    if "_history" in parts:
        parts = parts[: parts.index("_history")]
    if len(parts) >= 2 and parts[-2] == "Patient":
        return parts[-1]
    return None


def _number(value: Any) -> Any:
    return float(value) if isinstance(value, Decimal) else value


@dataclass
class _Collector:
    """Patients in reading order and, per column, each patient's matching (time, value) pairs."""

    columns: list[tuple[str, FhirBinding]]
    patients: dict[str, dict[str, Any]] = field(default_factory=dict)
    hits: dict[str, dict[str, list[tuple[dt.datetime | None, Any]]]] = field(default_factory=dict)
    pending: list[tuple[str, str, str]] = field(default_factory=list)  # (patient, column, where) to check

    @property
    def wanted(self) -> set[FhirResource]:
        return {b.resource for _, b in self.columns} | {FhirResource.PATIENT}

    def add(self, raw: Any, where: str) -> None:
        if not isinstance(raw, Mapping) or not isinstance(raw.get("resourceType"), str):
            raise DataError(f"{where}: not a FHIR resource (no resourceType)")
        try:
            kind = FhirResource(raw["resourceType"])
        except ValueError:
            return  # a resource type no column reads
        if kind not in self.wanted or not self._may_match(kind, raw):
            return  # data minimization: a resource no column reads is not parsed further
        from pydantic import ValidationError

        try:
            res = _model(kind).model_validate(raw)
        except ValidationError as exc:
            raise DataError(f"{where}: {kind.value} does not validate as FHIR R4: {_validation_problem(exc)}") from None
        if kind is FhirResource.PATIENT:
            self._patient(res, where)
        else:
            self._clinical(kind, res, where)

    def _may_match(self, kind: FhirResource, raw: Mapping[str, Any]) -> bool:
        """Whether some column could read this resource, judged from its raw codes alone.  Anything
        malformed counts as a possible match, so that validation reports it."""
        if kind is FhirResource.PATIENT:
            return True
        try:
            if kind is FhirResource.ENCOUNTER:
                klass = (raw.get("class") or {}).get("code")
                codings = [c for t in raw.get("type") or () for c in t.get("coding") or ()]
            else:
                klass = None
                codings = list((raw.get("code") or {}).get("coding") or ())
                codings += [c for comp in raw.get("component") or () for c in (comp.get("code") or {}).get("coding") or ()]
            pairs = [(c.get("system"), c.get("code")) for c in codings]
        except (AttributeError, TypeError):
            return True
        for _, b in self.columns:
            if b.resource is not kind:
                continue
            if b.encounter_class and klass != b.encounter_class:
                continue
            if not b.codes:
                return True
            for system, code in pairs:
                if system == b.system and isinstance(code, str) and any(
                        code == want or (want.endswith("*") and code.startswith(want[:-1])) for want in b.codes):
                    return True
        return False

    def _patient(self, res: Any, where: str) -> None:
        if not res.id:
            raise DataError(f"{where}: Patient has no id")
        if res.id in self.patients:
            raise DataError(f"{where}: Patient id repeats an earlier Patient's")
        row: dict[str, Any] = {}
        for name, b in self.columns:
            if b.resource is not FhirResource.PATIENT:
                continue
            if b.field is PatientField.ID:
                row[name] = res.id
            elif b.field is PatientField.GENDER:
                row[name] = res.gender
            elif b.field is PatientField.BIRTH_DATE:
                born = _start(res.birthDate)
                row[name] = born.date().isoformat() if born else None
            elif b.field is PatientField.DECEASED:
                row[name] = True if res.deceasedDateTime is not None else res.deceasedBoolean
            elif b.field is PatientField.AGE:
                born = _start(res.birthDate)
                if born is None:
                    row[name] = None
                else:
                    on = b.on
                    row[name] = on.year - born.year - ((on.month, on.day) < (born.month, born.day))
                    if row[name] < 0:
                        raise DataError(f"{where}: Patient.birthDate is after the age date declared for "
                                        f"column {name!r}")
        self.patients[res.id] = row

    def _clinical(self, kind: FhirResource, res: Any, where: str) -> None:
        patient = _patient_key(res.subject)
        if patient is None:
            raise DataError(f"{where}: {kind.value}.subject does not reference a Patient")
        if kind is FhirResource.OBSERVATION and res.status in ("entered-in-error", "cancelled"):
            return
        if kind is FhirResource.CONDITION and res.verificationStatus is not None and any(
                c.code in ("refuted", "entered-in-error") for c in res.verificationStatus.coding or ()):
            return
        for name, b in self.columns:
            if b.resource is not kind:
                continue
            found = self._match(kind, b, res, name, where)
            if found:
                self.hits.setdefault(name, {}).setdefault(patient, []).extend(found)
                self.pending.append((patient, name, where))

    @staticmethod
    def _match(kind: FhirResource, b: FhirBinding, res: Any, name: str, where: str) -> list[tuple[Any, Any]]:
        if kind is FhirResource.OBSERVATION:
            when = _start(res.effectiveDateTime) or _start(getattr(res.effectivePeriod, "start", None)) \
                or _start(res.effectiveInstant) or _start(res.issued)
            carriers = [res] if b.matches(res.code.coding) else []
            carriers += [c for c in res.component or () if b.matches(c.code.coding)]
            return [(when, _observation_value(c, b, name, where)) for c in carriers]
        if kind is FhirResource.CONDITION:
            if not b.matches(res.code.coding if res.code else ()):
                return []
            return [(_start(res.onsetDateTime) or _start(getattr(res.onsetPeriod, "start", None))
                     or _start(res.recordedDate), True)]
        # Encounter
        if b.encounter_class and getattr(res.class_fhir, "code", None) != b.encounter_class:
            return []
        if b.codes and not any(b.matches(t.coding) for t in res.type or ()):
            return []
        return [(_start(getattr(res.period, "start", None)), True)]

    def frame(self, origin: str) -> pd.DataFrame:
        for patient, name, where in self.pending:
            if patient not in self.patients:
                raise DataError(f"{where}: the resource read for column {name!r} references a Patient "
                                f"that {origin} does not hold")
        rows = []
        for n, (pid, base) in enumerate(self.patients.items(), start=1):
            row = dict(base)
            for name, b in self.columns:
                if b.resource is not FhirResource.PATIENT:
                    try:
                        row[name] = _pick(b, self.hits.get(name, {}).get(pid, []))
                    except _NotNumber:
                        raise DataError(f"{origin}: column {name!r} takes the {b.pick.value} of Observation "
                                        f"values, but patient row {n} has one that is not a number") from None
            rows.append(row)
        return pd.DataFrame(rows, columns=[n for n, _ in self.columns], dtype=object)


def _observation_value(carrier: Any, b: FhirBinding, name: str, where: str) -> Any:
    if b.pick in (Pick.COUNT, Pick.ANY):
        return True
    q = carrier.valueQuantity
    if q is not None:
        if b.unit is not None and b.unit not in (q.code, q.unit):
            raise DataError(f"{where}: the Observation read for column {name!r} is not in the declared "
                            f"unit {b.unit!r}")
        return _number(q.value)
    for attr in ("valueInteger", "valueBoolean", "valueString"):
        v = getattr(carrier, attr, None)
        if v is not None:
            return v
    cc = carrier.valueCodeableConcept
    if cc is not None and cc.coding:
        return cc.coding[0].code
    return None


class _NotNumber(Exception):
    pass


def _pick(b: FhirBinding, hits: list[tuple[dt.datetime | None, Any]]) -> Any:
    """One patient's value for a column from its matching resources' (time, value) pairs."""
    if b.pick is Pick.COUNT:
        return len(hits)
    if b.pick is Pick.ANY:
        return bool(hits)
    if b.pick in (Pick.LATEST, Pick.EARLIEST):
        if b.resource is not FhirResource.OBSERVATION:  # the date of the first or last match
            times = sorted(t for t, _ in hits if t is not None)
            return (times[-1] if b.pick is Pick.LATEST else times[0]).date().isoformat() if times else None
        known = sorted(((t, v) for t, v in hits if t is not None and v is not None), key=lambda tv: tv[0])
        values = [v for _, v in known] or [v for _, v in hits if v is not None]  # untimed: reading order
        return (values[-1] if b.pick is Pick.LATEST else values[0]) if values else None
    values = [v for _, v in hits if v is not None]
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in values):
        raise _NotNumber
    values = [float(v) for v in values if math.isfinite(float(v))]
    if not values:
        return None
    return {Pick.MEAN: sum(values) / len(values), Pick.MIN: min(values), Pick.MAX: max(values)}[b.pick]


# -- the two sources ------------------------------------------------------------------------------
@dataclass(frozen=True)
class FhirNdjsonSource:
    """A FHIR Bulk Data export: a folder of ``*.ndjson`` files, one resource per line.

    Files are read in name order; lines of resource types no column reads are skipped unparsed
    beyond their ``resourceType``.  Errors name the file and line, never a value.
    """

    location: str
    kind: ClassVar[SourceKind] = SourceKind.FHIR_NDJSON

    @property
    def display(self) -> str:
        return self.location

    def fetch(self, schema: RecordSchema) -> Records:
        cols = fhir_columns(schema)
        folder = Path(self.location)
        files = sorted(folder.glob("*.ndjson"))
        if not files:
            raise DataError(f"{folder} holds no *.ndjson files (a FHIR Bulk Data export writes one per resource type)")
        coll = _Collector(cols)
        for path in files:
            with path.open(encoding="utf-8") as fh:
                for n, line in enumerate(fh, start=1):
                    if not line.strip():
                        continue
                    where = f"{path.name} line {n}"
                    try:
                        raw = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise DataError(f"{where}: not JSON ({exc.msg} at column {exc.colno})") from None
                    coll.add(raw, where)
        return Records(coll.frame(str(folder)))


@dataclass(frozen=True)
class FhirServerSource:
    """A FHIR server's search API: ``GET [base]/Patient``, then Observations, Conditions and
    Encounters restricted to the declared codes where the search can say so, following every
    Bundle's ``next`` link.

    A ``next`` link to another origin is refused (it would carry the token elsewhere), so is a link
    seen before (a loop) and more than ``max_pages`` pages per search.  ``token`` is sent as a Bearer
    token; TLS certificates are verified (``verify`` may name a CA bundle).
    """

    location: str
    token: str | None = None
    page_size: int = 100
    max_pages: int = 10_000
    timeout: float = 30.0
    verify: bool | str = True
    kind: ClassVar[SourceKind] = SourceKind.FHIR_SERVER

    @property
    def display(self) -> str:
        from insitu.data.sources import redact_url

        return redact_url(self.location)

    def queries(self, cols: list[tuple[str, FhirBinding]]) -> list[tuple[FhirResource, dict[str, str]]]:
        """The searches to run: only resource types some column reads, only declared codes where a
        token search can express them (a prefix, e.g. ICD-10 ``I2*``, fetches that type whole)."""
        out: list[tuple[FhirResource, dict[str, str]]] = [(FhirResource.PATIENT, {})]
        for kind in (FhirResource.OBSERVATION, FhirResource.CONDITION, FhirResource.ENCOUNTER):
            binds = [b for _, b in cols if b.resource is kind]
            if not binds:
                continue
            params: dict[str, str] = {}
            if kind is not FhirResource.ENCOUNTER and not any(b.prefix for b in binds):
                tokens = sorted({f"{b.system}|{c}" for b in binds for c in b.codes})
                params["combo-code" if kind is FhirResource.OBSERVATION else "code"] = ",".join(tokens)
            out.append((kind, params))
        return out

    def fetch(self, schema: RecordSchema) -> Records:
        import httpx

        cols = fhir_columns(schema)
        coll = _Collector(cols)
        base = self.location.rstrip("/") + "/"
        headers = {"Accept": "application/fhir+json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        with httpx.Client(timeout=self.timeout, verify=self.verify, headers=headers, follow_redirects=False) as client:
            for kind, params in self.queries(cols):
                url = urljoin(base, kind.value) + "?" + urlencode({**params, "_count": str(self.page_size)})
                for page, entries in enumerate(self._pages(client, url, kind), start=1):
                    for i, raw in entries:
                        coll.add(raw, f"{kind.value} search page {page} entry {i}")
        return Records(coll.frame(self.display))

    def _pages(self, client: Any, url: str, kind: FhirResource) -> Iterator[list[tuple[int, Any]]]:
        import httpx

        origin = urlsplit(self.location)[:2]
        seen: set[str] = set()
        page = 0
        while url:
            page += 1
            if page > self.max_pages:
                raise DataError(f"{self.display}: the {kind.value} search has more than {self.max_pages} pages; "
                                "raise max_pages if that is expected")
            if url in seen:
                raise DataError(f"{self.display}: the {kind.value} search's next link on page {page - 1} "
                                "points back to an earlier page")
            seen.add(url)
            try:
                resp = client.get(url)
            except httpx.HTTPError as exc:
                raise DataError(f"cannot reach FHIR server {self.display}: {type(exc).__name__}") from None
            if resp.status_code != 200:
                raise DataError(f"FHIR server {self.display} answered HTTP {resp.status_code} to the "
                                f"{kind.value} search (page {page})")
            try:
                bundle = resp.json()
            except ValueError:
                raise DataError(f"FHIR server {self.display}: {kind.value} search page {page} is not JSON") from None
            if not isinstance(bundle, Mapping) or bundle.get("resourceType") != "Bundle":
                raise DataError(f"FHIR server {self.display}: {kind.value} search page {page} is not a Bundle")
            entries = bundle.get("entry") or []
            links = bundle.get("link") or []
            if not isinstance(entries, list) or not isinstance(links, list):
                raise DataError(f"FHIR server {self.display}: {kind.value} search page {page}: "
                                "Bundle.entry and Bundle.link must be lists")
            yield [(i, e.get("resource") if isinstance(e, Mapping) else None)
                   for i, e in enumerate(entries, start=1)
                   if not (isinstance(e, Mapping) and (e.get("search") or {}).get("mode") == "outcome")]
            nxt = next((lk.get("url") for lk in links if isinstance(lk, Mapping) and lk.get("relation") == "next"), None)
            if nxt is not None:
                nxt = urljoin(url, str(nxt))
                if urlsplit(nxt)[:2] != origin:
                    raise DataError(f"FHIR server {self.display}: the {kind.value} search's next link on page "
                                    f"{page} leaves the server's origin; refused")
            url = nxt


def write_ndjson(resources: Iterable[Any], folder: str | Path) -> list[Path]:
    """Write resources (``fhir.resources`` models or dicts) as a Bulk Data export, one
    ``<Type>.ndjson`` per resource type; returns the files written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    by_type: dict[str, list[str]] = {}
    for r in resources:
        text = r.model_dump_json() if hasattr(r, "model_dump_json") else json.dumps(r)
        kind = json.loads(text)["resourceType"]
        by_type.setdefault(kind, []).append(text)
    out = []
    for kind, lines in sorted(by_type.items()):
        path = folder / f"{kind}.ndjson"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        out.append(path)
    return out


__all__ = ["CodeSystem", "FhirBinding", "FhirNdjsonSource", "FhirResource", "FhirServerSource", "PatientField",
           "Pick", "fhir_columns", "parse_binding", "write_ndjson"]
