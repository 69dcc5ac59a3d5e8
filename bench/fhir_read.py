"""Reading a FHIR Bulk Data export through a schema, against plain JSON parsing of the same files.

    .venv/bin/python bench/fhir_read.py                 # 2000 synthetic patients
    .venv/bin/python bench/fhir_read.py --patients 500

The export is written by ``insitu.data.synthetic_fhir`` (per patient: 1 Patient, 4 Observations,
0-2 Conditions, 1-3 Encounters), plus ``--other`` unrelated lab Observations per patient (a real
export holds far more labs than a schema reads; those are skipped before validation).  "insitu" is ``read_dataset(FhirNdjsonSource, schema)``: every
resource a column reads validated as FHIR R4 by ``fhir.resources``, matched by code, picked per
patient and type-checked.  The baseline is ``json.loads`` of every line and nothing else: the floor
any reader pays.  The ratio is the price of validation and mapping.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
import tomllib
from pathlib import Path

from insitu.data.fhir import FhirNdjsonSource
from insitu.data.sources import RecordSchema, read_dataset
from insitu.data.synthetic_fhir import SCHEMA_TOML, write_synthetic_export


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patients", type=int, default=2000)
    ap.add_argument("--other", type=int, default=10, help="unrelated lab Observations per patient")
    ap.add_argument("--repeat", type=int, default=3, help="best of this many runs")
    args = ap.parse_args()
    schema = RecordSchema.from_dict(tomllib.loads(SCHEMA_TOML))
    with tempfile.TemporaryDirectory() as tmp:
        write_synthetic_export(tmp, args.patients, seed=0)
        with open(Path(tmp) / "Observation.labs.ndjson", "w") as fh:
            for i in range(args.patients):
                for k in range(args.other):
                    fh.write(json.dumps({
                        "resourceType": "Observation", "id": f"lab{i}-{k}", "status": "final",
                        "subject": {"reference": f"Patient/p{i:04d}"}, "effectiveDateTime": "2023-01-02",
                        "code": {"coding": [{"system": "http://loinc.org", "code": f"{700 + k}-1"}]},
                        "valueQuantity": {"value": 1.0 + k, "unit": "g/dL"}}) + "\n")
        files = sorted(Path(tmp).glob("*.ndjson"))
        lines = sum(len(f.read_text().splitlines()) for f in files)

        def baseline() -> None:
            for f in files:
                with f.open() as fh:
                    for line in fh:
                        json.loads(line)

        def ours() -> None:
            rec = read_dataset(FhirNdjsonSource(tmp), schema)
            assert len(rec.frame) == args.patients

        times = {}
        for name, fn in (("json.loads only (baseline)", baseline), ("insitu read_dataset", ours)):
            best = float("inf")
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                fn()
                best = min(best, time.perf_counter() - t0)
            times[name] = best
    base = times["json.loads only (baseline)"]
    print(f"{args.patients} patients, {lines} resources ({args.patients * args.other} unrelated labs) "
          f"in {len(files)} NDJSON files (best of {args.repeat})")
    for name, t in times.items():
        print(f"  {name:28s} {t:7.3f} s  {lines / t:9.0f} resources/s  ratio {t / base:5.1f}x")


if __name__ == "__main__":
    main()
