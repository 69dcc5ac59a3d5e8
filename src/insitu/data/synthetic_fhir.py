"""Synthetic FHIR R4 patients, written as a Bulk Data export, for tutorials and tests.

No real person is in here: every patient is drawn from a seeded generator.  Each patient has a
gender and birth date, total-cholesterol Observations (LOINC 2093-3, mg/dL, two visits), a blood
pressure panel (LOINC 85354-9 with systolic 8480-6 as a component), possibly type 2 diabetes
(SNOMED CT 44054006) and inpatient Encounters, and the outcome: coronary heart disease coded in
ICD-10 (I25.x), more likely with age, cholesterol, blood pressure and diabetes.  ``shift`` moves a
hospital's patient mix (older, sicker) so that sites differ as real ones do.
"""
from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import numpy as np

from insitu.data.fhir import CodeSystem, write_ndjson

SCHEMA_TOML = """\
# Rows are patients; every column says where in the patient's FHIR resources it comes from.
[columns.patient_id]
role = "direct_identifier"
type = "string"
nullable = false
fhir = "Patient.id"

[columns.sex]
role = "quasi_identifier"
type = "string"
levels = ["female", "male"]
fhir = "Patient.gender"

[columns.age]
role = "feature"
type = "integer"
fhir = { resource = "Patient", field = "age", on = "2024-01-01" }

[columns.cholesterol]
role = "feature"
type = "float"
fhir = { resource = "Observation", system = "loinc", code = "2093-3", pick = "latest", unit = "mg/dL" }

[columns.systolic_bp]
role = "feature"
type = "float"
fhir = { resource = "Observation", system = "loinc", code = "8480-6", pick = "mean", unit = "mm[Hg]" }

[columns.diabetes]
role = "feature"
type = "boolean"
fhir = { resource = "Condition", system = "snomed", code = "44054006" }

[columns.admissions]
role = "feature"
type = "integer"
fhir = { resource = "Encounter", class = "IMP", pick = "count" }

[columns.coronary_disease]
role = "label"
type = "boolean"
fhir = { resource = "Condition", system = "icd10", code = "I25*" }
"""


def _code(system: CodeSystem, code: str, display: str) -> dict[str, Any]:
    return {"coding": [{"system": system.value, "code": code, "display": display}]}


def synthetic_patients(n: int, *, seed: int = 0, shift: float = 0.0, prefix: str = "p") -> list[Any]:
    """``n`` synthetic patients and their resources as ``fhir.resources`` R4B models."""
    from fhir.resources.R4B.condition import Condition
    from fhir.resources.R4B.encounter import Encounter
    from fhir.resources.R4B.observation import Observation
    from fhir.resources.R4B.patient import Patient

    rng = np.random.default_rng(seed)
    out: list[Any] = []
    for i in range(n):
        pid = f"{prefix}{i:04d}"
        ref = {"reference": f"Patient/{pid}"}
        age = int(np.clip(rng.normal(55 + 8 * shift, 11), 25, 90))
        born = dt.date(2024 - age - 1, int(rng.integers(1, 13)), int(rng.integers(1, 29)))
        male = bool(rng.random() < 0.5)
        chol = float(np.clip(rng.normal(200 + 15 * shift, 35), 110, 380))
        sbp = float(np.clip(rng.normal(130 + 6 * shift + 0.3 * (age - 55), 16), 90, 210))
        diabetic = bool(rng.random() < 0.12 + 0.06 * shift + 0.004 * (age - 55))
        admissions = int(rng.poisson(0.4 + 0.3 * shift + 0.6 * diabetic))
        z = (-0.3 + 0.07 * (age - 55) + 0.025 * (chol - 200) + 0.04 * (sbp - 130) + 1.1 * diabetic
             + 0.5 * male + 0.3 * admissions)
        sick = bool(rng.random() < 1 / (1 + np.exp(-z)))
        out.append(Patient(id=pid, gender="male" if male else "female", birthDate=born))
        for k, when in enumerate(("2022-03-01", "2023-09-15")):
            value = round(chol + (rng.normal(0, 8) if k == 0 else 0.0), 1)
            out.append(Observation(
                id=f"{pid}-chol{k}", status="final", subject=ref, effectiveDateTime=f"{when}T09:00:00Z",
                code=_code(CodeSystem.LOINC, "2093-3", "Cholesterol [Mass/volume] in Serum or Plasma"),
                valueQuantity={"value": value, "unit": "mg/dL", "system": "http://unitsofmeasure.org", "code": "mg/dL"}))
            out.append(Observation(
                id=f"{pid}-bp{k}", status="final", subject=ref, effectiveDateTime=f"{when}T09:05:00Z",
                code=_code(CodeSystem.LOINC, "85354-9", "Blood pressure panel"),
                component=[
                    {"code": _code(CodeSystem.LOINC, "8480-6", "Systolic blood pressure"),
                     "valueQuantity": {"value": round(sbp + rng.normal(0, 5), 0), "unit": "mm[Hg]",
                                       "system": "http://unitsofmeasure.org", "code": "mm[Hg]"}},
                    {"code": _code(CodeSystem.LOINC, "8462-4", "Diastolic blood pressure"),
                     "valueQuantity": {"value": round(sbp * 0.62 + rng.normal(0, 4), 0), "unit": "mm[Hg]",
                                       "system": "http://unitsofmeasure.org", "code": "mm[Hg]"}}]))
        clinical = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}]}
        if diabetic:
            out.append(Condition(id=f"{pid}-dm", subject=ref, clinicalStatus=clinical, onsetDateTime="2019-06-01",
                                 code=_code(CodeSystem.SNOMED, "44054006", "Diabetes mellitus type 2")))
        if sick:
            out.append(Condition(id=f"{pid}-chd", subject=ref, clinicalStatus=clinical, onsetDateTime="2023-11-02",
                                 code=_code(CodeSystem.ICD10, "I25.10", "Atherosclerotic heart disease")))
        for k in range(admissions):
            out.append(Encounter(
                id=f"{pid}-enc{k}", status="finished", subject=ref, period={"start": f"202{k % 4}-02-0{k % 9 + 1}"},
                class_fhir={"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "IMP"}))
        out.append(Encounter(
            id=f"{pid}-amb", status="finished", subject=ref, period={"start": "2023-09-15"},
            class_fhir={"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"}))
    return out


def write_synthetic_export(folder: str | Path, n: int, *, seed: int = 0, shift: float = 0.0,
                           prefix: str = "p") -> list[Path]:
    """Write ``n`` synthetic patients as a FHIR Bulk Data export (``Patient.ndjson``, ...)."""
    return write_ndjson(synthetic_patients(n, seed=seed, shift=shift, prefix=prefix), folder)


__all__ = ["SCHEMA_TOML", "synthetic_patients", "write_synthetic_export"]
