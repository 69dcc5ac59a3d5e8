"""FHIR R4 sources: a Bulk Data NDJSON export and a real HTTP FHIR search API, both written from
synthetic patients made with ``fhir.resources``, mapped to schema columns by LOINC / SNOMED CT / ICD-10."""
from __future__ import annotations

import json
import threading
import tomllib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pandas as pd
import pytest

from insitu.data.fhir import FhirNdjsonSource, FhirServerSource, write_ndjson
from insitu.data.sources import RecordSchema, SourceKind, open_source, read_dataset, read_records
from insitu.data.synthetic_fhir import SCHEMA_TOML, synthetic_patients
from insitu.errors import ConfigError, DataError

SCHEMA = RecordSchema.from_dict(tomllib.loads(SCHEMA_TOML))
N = 12


@pytest.fixture(scope="module")
def cohort():
    return synthetic_patients(N, seed=5, shift=0.5)


@pytest.fixture
def export(tmp_path, cohort):
    write_ndjson(cohort, tmp_path / "export")
    return tmp_path / "export"


def _expected(cohort) -> pd.DataFrame:
    """The columns worked out from the models directly, not through the source."""
    rows = {}
    for r in cohort:
        d = json.loads(r.model_dump_json())
        kind = d["resourceType"]
        if kind == "Patient":
            born = pd.Timestamp(d["birthDate"])
            rows[d["id"]] = {"patient_id": d["id"], "sex": d["gender"],
                             "age": 2023 - born.year + ((born.month, born.day) <= (1, 1)),
                             "chol": {}, "sbp": [], "diabetes": False, "admissions": 0, "chd": False}
            continue
        row = rows[d["subject"]["reference"].split("/")[1]]
        if kind == "Observation" and d["code"]["coding"][0]["code"] == "2093-3":
            row["chol"][d["effectiveDateTime"]] = d["valueQuantity"]["value"]
        elif kind == "Observation":
            row["sbp"] += [c["valueQuantity"]["value"] for c in d["component"] if c["code"]["coding"][0]["code"] == "8480-6"]
        elif kind == "Condition":
            code = d["code"]["coding"][0]["code"]
            row["diabetes"] |= code == "44054006"
            row["chd"] |= code.startswith("I25")
        elif kind == "Encounter":
            row["admissions"] += d["class"]["code"] == "IMP"
    return pd.DataFrame([{**r, "chol": r["chol"][max(r["chol"])], "sbp": float(np.mean(r["sbp"]))} for r in rows.values()])


def _check(frame: pd.DataFrame, cohort) -> None:
    exp = _expected(cohort)
    assert list(frame.columns) == SCHEMA.names and len(frame) == N
    assert frame["patient_id"].tolist() == exp["patient_id"].tolist()
    assert frame["sex"].tolist() == exp["sex"].tolist()
    assert frame["age"].tolist() == exp["age"].tolist()
    np.testing.assert_allclose(frame["cholesterol"].to_numpy(float), exp["chol"].to_numpy(float))
    np.testing.assert_allclose(frame["systolic_bp"].to_numpy(float), exp["sbp"].to_numpy(float))
    assert frame["diabetes"].tolist() == exp["diabetes"].tolist()
    assert frame["admissions"].tolist() == exp["admissions"].tolist()
    assert frame["coronary_disease"].tolist() == exp["chd"].tolist()
    assert 0 < exp["chd"].sum() < N and exp["admissions"].sum() > 0  # the cohort exercises every branch


def test_bulk_ndjson_export_maps_codes_to_columns(export, cohort):
    src = open_source(export)
    assert isinstance(src, FhirNdjsonSource) and src.kind is SourceKind.FHIR_NDJSON
    frame = read_records(src, SCHEMA)
    _check(frame, cohort)
    assert str(frame["age"].dtype) == "Int64" and str(frame["diabetes"].dtype) == "boolean"


def test_ndjson_files_and_blank_lines_and_other_types(tmp_path, cohort):
    """Several files per type, blank lines and resource types no column reads are all fine."""
    folder = tmp_path / "x"
    folder.mkdir()
    lines = [r.model_dump_json() for r in cohort]
    (folder / "1.Mixed.ndjson").write_text("\n".join(lines[: len(lines) // 2]) + "\n\n")
    (folder / "2.Mixed.ndjson").write_text("\n".join(lines[len(lines) // 2:]) + "\n")
    (folder / "3.Other.ndjson").write_text(json.dumps({"resourceType": "Medication", "id": "m"}) + "\n")
    # a Patient appearing after its Observations in another file is fine too
    _check(read_records(folder, SCHEMA), cohort)


def _rewrite(export, kind, line, fn):
    path = export / f"{kind}.ndjson"
    rows = path.read_text().splitlines()
    d = json.loads(rows[line - 1])
    fn(d)
    rows[line - 1] = json.dumps(d)
    path.write_text("\n".join(rows) + "\n")


def test_invalid_resource_names_file_line_and_element_never_the_value(export):
    _rewrite(export, "Patient", 3, lambda d: d.update(birthDate="1961-13-45"))
    with pytest.raises(DataError) as exc:
        read_records(export, SCHEMA)
    msg = str(exc.value)
    assert "Patient.ndjson line 3" in msg and "birthDate" in msg
    assert "1961" not in msg and "13-45" not in msg


def test_bad_value_type_names_element_not_value(export):
    _rewrite(export, "Observation", 3, lambda d: d["valueQuantity"].update(value="two hundred and six"))
    with pytest.raises(DataError) as exc:
        read_records(export, SCHEMA)
    msg = str(exc.value)
    assert "Observation.ndjson line 3" in msg and "valueQuantity.value" in msg and "hundred" not in msg


def test_dangling_patient_reference_and_wrong_unit_refused(export):
    _rewrite(export, "Condition", 1, lambda d: d["subject"].update(reference="Patient/zz-secret-id"))
    with pytest.raises(DataError) as exc:
        read_records(export, SCHEMA)
    assert "Condition.ndjson line 1" in str(exc.value) and "zz-secret" not in str(exc.value)
    _rewrite(export, "Condition", 1, lambda d: d["subject"].update(reference="Patient/p0000"))
    _rewrite(export, "Observation", 1, lambda d: d["valueQuantity"].update(unit="mmol/L", code="mmol/L"))
    with pytest.raises(DataError, match=r"Observation.ndjson line 1: .*'cholesterol' is not in the declared unit 'mg/dL'"):
        read_records(export, SCHEMA)


def test_resources_no_column_reads_are_not_parsed(export, cohort):
    """An unrelated lab (even a malformed one) and an ambulatory visit are never validated or read."""
    noise = [{"resourceType": "Observation", "status": "final", "subject": {"reference": "Patient/p0000"},
              "code": {"coding": [{"system": "http://loinc.org", "code": "718-7"}]},
              "valueQuantity": {"value": "not-a-number"}},
             {"resourceType": "Observation", "status": "final", "subject": {"reference": "Patient/nobody"},
              "code": {"coding": [{"system": "http://snomed.info/sct", "code": "2093-3"}]}}]  # right code, wrong system
    with (export / "Observation.ndjson").open("a") as fh:
        fh.write("\n".join(json.dumps(n) for n in noise) + "\n")
    _check(read_records(export, SCHEMA), cohort)
    # ... but a malformed resource that a column might read is still refused
    with (export / "Observation.ndjson").open("a") as fh:
        fh.write(json.dumps({**noise[0], "code": {"coding": [{"system": "http://loinc.org", "code": "2093-3"}]}}) + "\n")
    with pytest.raises(DataError, match="valueQuantity.value"):
        read_records(export, SCHEMA)


def test_not_json_and_not_a_resource(export):
    (export / "Broken.ndjson").write_text('{"resourceType": "Patient", "id": \n')
    with pytest.raises(DataError, match=r"Broken.ndjson line 1: not JSON"):
        read_records(export, SCHEMA)
    (export / "Broken.ndjson").write_text('[1, 2]\n')
    with pytest.raises(DataError, match=r"Broken.ndjson line 1: not a FHIR resource"):
        read_records(export, SCHEMA)


def test_refuted_conditions_and_entered_in_error_observations_do_not_count(export, cohort):
    frame = read_records(export, SCHEMA)
    sick = frame.index[frame["coronary_disease"]][0]
    pid = frame["patient_id"][sick]
    rows = (export / "Condition.ndjson").read_text().splitlines()
    i = next(k for k, r in enumerate(rows, 1) if f"Patient/{pid}" in r and "I25" in r)
    _rewrite(export, "Condition", i, lambda d: d.update(verificationStatus={"coding": [
        {"system": "http://terminology.hl7.org/CodeSystem/condition-ver-status", "code": "refuted"}]}))
    rows = (export / "Observation.ndjson").read_text().splitlines()
    j = next(k for k, r in enumerate(rows, 1) if f"Patient/{pid}" in r and "2023-09-15" in r and "2093-3" in r)
    _rewrite(export, "Observation", j, lambda d: d.update(status="entered-in-error"))
    earlier = next(json.loads(r) for r in rows if f"Patient/{pid}" in r and "2022-03-01" in r and "2093-3" in r)
    again = read_records(export, SCHEMA)
    assert not again["coronary_disease"][sick]
    assert again["cholesterol"][sick] == earlier["valueQuantity"]["value"]  # falls back to the earlier visit
    assert again["cholesterol"][sick] != frame["cholesterol"][sick]


@pytest.mark.parametrize("column, problem", [
    ({"type": "string", "fhir": {"resource": "Observation", "system": "loinc", "code": "2093-3", "pick": "mean"}},
     "pick = 'mean' on Observation gives float or integer, but the column is declared string"),
    ({"type": "float", "fhir": {"resource": "Observation", "system": "lonic", "code": "2093-3"}},
     "system is 'lonic'; use one of ['icd10', 'icd10cm', 'loinc', 'snomed']"),
    ({"type": "float", "fhir": {"resource": "Observation", "system": "loinc", "code": "2093*"}},
     "a prefix (code ending in *) is for Condition and Encounter codes"),
    ({"type": "boolean", "fhir": {"resource": "Procedure", "system": "snomed", "code": "1"}},
     "fhir resource: unknown value 'Procedure'"),
    ({"type": "date", "fhir": {"resource": "Condition", "system": "icd10", "code": "I10", "pick": "mean"}},
     "pick = 'mean' needs values; a Condition has none"),
    ({"type": "integer", "fhir": {"resource": "Patient", "field": "age"}}, "an age needs on = \"YYYY-MM-DD\""),
    ({"type": "string", "fhir": "Observation.value"}, "the short form is Patient.<field>"),
    ({"type": "boolean", "fhir": {"resource": "Condition", "system": "icd10", "code": "I10", "unit": "x"}},
     "Condition takes ['code', 'pick', 'resource', 'system'], not ['unit']"),
])
def test_bad_fhir_declarations_are_refused_naming_the_column(column, problem):
    raw = {"columns": {"pid": {"role": "direct_identifier", "type": "string", "fhir": "Patient.id"},
                       "x": {"role": "feature", **column}}}
    with pytest.raises(ConfigError) as exc:
        RecordSchema.from_dict(raw)
    assert "column 'x' fhir" in str(exc.value) and problem in str(exc.value)


def test_every_column_needs_a_fhir_binding_and_rows_are_patients(export):
    with pytest.raises(ConfigError, match=r"\['dx'\] have none"):
        read_records(export, RecordSchema.from_dict({"columns": {
            "pid": {"role": "direct_identifier", "type": "string", "fhir": "Patient.id"},
            "dx": {"role": "sensitive", "type": "string"}}}))
    with pytest.raises(ConfigError, match="at least one Patient column"):
        read_records(export, RecordSchema.from_dict({"columns": {
            "dm": {"role": "feature", "type": "boolean",
                   "fhir": {"resource": "Condition", "system": "snomed", "code": "44054006"}}}}))


def test_levels_are_enforced_by_row_not_value(export):
    _rewrite(export, "Patient", 2, lambda d: d.update(gender="unknown"))
    with pytest.raises(DataError) as exc:
        read_records(export, SCHEMA)
    assert "column 'sex' has 1 value(s), first at data row(s) 2 outside its declared levels" in str(exc.value)


# -- a real FHIR server over HTTP on 127.0.0.1 -------------------------------------------------------
class _FhirServer:
    """A tiny FHIR search API: ``GET /fhir/<Type>?code=...&_count=N`` answered with paged searchset
    Bundles whose ``next`` link carries an offset; records every request it gets."""

    def __init__(self, resources, *, mutate_next=None, fail_on=None):
        self.resources = [json.loads(r.model_dump_json()) for r in resources]
        self.requests: list[tuple[str, dict, str | None]] = []
        self.mutate_next = mutate_next
        self.fail_on = fail_on
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                url = urlsplit(self.path)
                q = {k: v[0] for k, v in parse_qs(url.query).items()}
                outer.requests.append((url.path, q, self.headers.get("Authorization")))
                kind = url.path.rsplit("/", 1)[-1]
                if outer.fail_on == kind:
                    self.send_response(500)
                    self.end_headers()
                    return
                body = json.dumps(outer.bundle(kind, q)).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/fhir+json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}/fhir"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def _matches(self, r, tokens):
        if not tokens:
            return True
        codings = list(r.get("code", {}).get("coding", []))
        for comp in r.get("component", []):
            codings += comp["code"]["coding"]
        return any(f"{c['system']}|{c['code']}" in tokens for c in codings)

    def bundle(self, kind, q):
        tokens = set((q.get("code") or q.get("combo-code") or "").split(",")) - {""}
        hits = [r for r in self.resources if r["resourceType"] == kind and self._matches(r, tokens)]
        count, offset = int(q.get("_count", 10)), int(q.get("_offset", 0))
        page = hits[offset: offset + count]
        links = [{"relation": "self", "url": f"{self.base}/{kind}"}]
        if offset + count < len(hits):
            nxt = f"{self.base}/{kind}?" + "&".join(f"{k}={v}" for k, v in {**q, "_offset": offset + count}.items())
            links.append({"relation": "next", "url": self.mutate_next(nxt) if self.mutate_next else nxt})
        entries = [{"fullUrl": f"{self.base}/{kind}/{r['id']}", "resource": r, "search": {"mode": "match"}} for r in page]
        if offset == 0:
            entries.append({"resource": {"resourceType": "OperationOutcome",
                                         "issue": [{"severity": "information", "code": "informational"}]},
                            "search": {"mode": "outcome"}})
        return {"resourceType": "Bundle", "type": "searchset", "total": len(hits), "link": links, "entry": entries}

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_server_search_with_paging_matches_the_export(cohort):
    with _FhirServer(cohort) as server:
        src = open_source(server.base)
        assert isinstance(src, FhirServerSource)
        src = FhirServerSource(server.base, token="t0ken", page_size=5)
        frame = read_dataset(src, SCHEMA).frame
    _check(frame, cohort)
    paths = [p for p, _, _ in server.requests]
    assert paths.count("/fhir/Patient") == -(-N // 5)  # every page followed
    assert all(auth == "Bearer t0ken" for _, _, auth in server.requests)
    obs = next(q for p, q, _ in server.requests if p == "/fhir/Observation")
    assert obs["combo-code"] == "http://loinc.org|2093-3,http://loinc.org|8480-6"  # only declared codes
    cond = next(q for p, q, _ in server.requests if p == "/fhir/Condition")
    assert "code" not in cond  # an ICD-10 prefix (I25*) cannot be a token search: Conditions come whole
    assert set(paths) == {"/fhir/Patient", "/fhir/Observation", "/fhir/Condition", "/fhir/Encounter"}


def test_server_next_link_to_another_origin_or_a_loop_is_refused(cohort):
    with _FhirServer(cohort, mutate_next=lambda u: u.replace("127.0.0.1", "localhost")) as server:
        with pytest.raises(DataError, match="next link on page 1 leaves the server's origin"):
            read_dataset(FhirServerSource(server.base, page_size=5), SCHEMA)
    with _FhirServer(cohort, mutate_next=lambda u: u.split("?")[0] + "?_count=5") as server:
        with pytest.raises(DataError, match="points back to an earlier page"):
            read_dataset(FhirServerSource(server.base, page_size=5), SCHEMA)


def test_server_error_and_unreachable_server(cohort):
    with _FhirServer(cohort, fail_on="Encounter") as server:
        with pytest.raises(DataError, match=r"answered HTTP 500 to the Encounter search \(page 1\)"):
            read_dataset(FhirServerSource(server.base), SCHEMA)
        port = server.httpd.server_address[1]
    with pytest.raises(DataError, match="cannot reach FHIR server"):
        read_dataset(FhirServerSource(f"http://127.0.0.1:{port}/fhir", timeout=2), SCHEMA)


def test_records_to_site_data_encoding_and_missing_values(export):
    from insitu.data.features import Impute, encoding, site_data
    from insitu.data.sources import Records

    enc = encoding(SCHEMA)
    assert enc.features == ("age", "cholesterol", "systolic_bp", "diabetes", "admissions") and enc.num_classes == 2
    rec = read_dataset(export, SCHEMA)
    sd = site_data(rec, SCHEMA, "h", test_fraction=0.25)
    assert sd.X_train.shape[1] == 5 and sd.n_train + sd.n_test == N and 2 <= sd.n_test <= 4
    np.testing.assert_allclose(sd.X_train.mean(0).numpy(), 0, atol=1e-5)  # z-scored with the site's own train stats
    frame = rec.frame.copy()
    frame.loc[4, "cholesterol"] = None
    with pytest.raises(DataError, match=r"feature\(s\) \['cholesterol'\] have empty values"):
        site_data(Records(frame), SCHEMA, "h")
    filled = site_data(Records(frame), SCHEMA, "h", impute=Impute.MEAN, standardize=False)
    assert not torch_isnan(filled.X_train) and not torch_isnan(filled.X_test)
    onehot = RecordSchema.from_dict({"columns": {
        "pid": {"role": "direct_identifier", "type": "string", "fhir": "Patient.id"},
        "sex": {"role": "feature", "type": "string", "levels": ["female", "male"], "fhir": "Patient.gender"},
        "chd": {"role": "label", "type": "boolean", "fhir": {"resource": "Condition", "system": "icd10", "code": "I25*"}}}})
    assert encoding(onehot).features == ("sex=female", "sex=male")
    sd = site_data(read_dataset(export, onehot), onehot, "h", standardize=False)
    assert set(sd.X_train.sum(1).tolist()) == {1.0}


def torch_isnan(t) -> bool:
    return bool(t.isnan().any())


def test_fhir_records_go_through_deidentification(export):
    """The FHIR frame is an ordinary typed record frame: the de-identification engine pseudonymizes
    the Patient id (a direct identifier) and leaves features alone."""
    from insitu.deid import DeidPolicy, deidentify

    frame = read_records(export, SCHEMA)
    policy = DeidPolicy.from_dict({"deid": {"k": 1, "patient_id": "patient_id"},
                                   "identifiers": {"patient_id": "pseudonymize"},
                                   "generalize": {"sex": {"hierarchy": "category"}}})
    res = deidentify(frame, SCHEMA, policy, b"s" * 32)
    out = res.frame  # rows in a keyed random order; source_rows maps them back
    assert not set(out["patient_id"]) & set(frame["patient_id"]) and out["patient_id"].nunique() == N
    np.testing.assert_array_equal(out["cholesterol"].to_numpy(float), frame["cholesterol"].to_numpy(float)[res.source_rows])
