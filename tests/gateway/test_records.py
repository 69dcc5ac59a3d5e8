"""The record store on SQLite and on a real PostgreSQL server; the gateway over PostgreSQL."""
from __future__ import annotations

import datetime as dt
import os
import secrets

import pytest
import sqlalchemy as sa

from insitu.errors import ConfigError
from insitu.gateway.records import RecordBody, RecordPatch, RecordStore, nursing_view, store_url

from .support import T0, record_body


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    if request.param == "sqlite":
        yield RecordStore(str(tmp_path / "r.db"))
        return
    url = os.environ.get("INSITU_TEST_PG_URL")
    if not url:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("CI=true but INSITU_TEST_PG_URL is unset: .ci/services.sh must start PostgreSQL")
        pytest.skip("INSITU_TEST_PG_URL not set (run `source .ci/services.sh`)")
    table = "gw_" + secrets.token_hex(5)
    s = RecordStore(url, table)
    yield s
    with s.engine.begin() as c:
        c.execute(sa.text(f"DROP TABLE {table}"))
    s.engine.dispose()


def test_put_get_patch_versions(store):
    assert store.get("p-0001") is None and store.ward_of("p-0001") is None
    r1 = store.put("p-0001", RecordBody(**record_body("cardio")), T0)
    assert r1.version == 1 and store.get("p-0001") == r1 and store.ward_of("p-0001") == "cardio"
    r2 = store.patch("p-0001", RecordPatch(ward="icu", allergies=["latex"]), T0 + dt.timedelta(minutes=1))
    assert r2.version == 2 and r2.ward == "icu" and r2.allergies == ["latex"] and r2.name == "Jane Roe"
    assert store.get("p-0001") == r2 and store.ward_of("p-0001") == "icu"
    assert store.patch("nobody-01", RecordPatch(ward="icu"), T0) is None
    r3 = store.put("p-0001", RecordBody(**record_body("cardio", name="Jane Q. Roe")), T0)
    assert r3.version == 3 and store.count() == 1


def test_nursing_view_generalises_age():
    rec = RecordStore("sqlite:///:memory:").put("p-0001", RecordBody(**record_body(birth_date="1926-01-01")), T0)
    assert nursing_view(rec, T0.date()).age_band == "90+"
    rec = rec.model_copy(update={"birth_date": dt.date(2020, 12, 1)})
    assert nursing_view(rec, T0.date()).age_band == "0-9"


def test_store_urls_and_bad_table_names(tmp_path):
    assert store_url("postgresql://u:p@h/db") == "postgresql+psycopg://u:p@h/db"
    assert store_url("x.db") == "sqlite:///x.db"
    with pytest.raises(ConfigError, match="table"):
        RecordStore(str(tmp_path / "r.db"), "records; DROP TABLE x")
    with pytest.raises(ConfigError, match="cannot open") as e:
        RecordStore("postgresql://insitu:secret-pw@127.0.0.1:1/none")
    assert "secret-pw" not in str(e.value)


def test_public_namespace_matches_all():
    import insitu.gateway as gw

    public = {n for n in dir(gw) if not n.startswith("_") and n not in {
        "app", "auditing", "config", "inputs", "model", "policy", "record_schema", "records", "service", "tls", "tokens", "cli",
        "import_module", "Any"}}
    assert public == set(gw.__all__)
    assert all(getattr(gw, n) is not None for n in gw.__all__)


def test_import_from_a_site_csv_and_sqlite(tmp_path):
    import pandas as pd

    from insitu.gateway.records import bodies_from_source

    rows = [{"pseudonym": f"p-{i:04d}", **record_body("cardio" if i % 2 else "icu"), "medications": "aspirin; statin",
             "allergies": "penicillin"}
            for i in range(5)]
    frame = pd.DataFrame(rows)
    frame.to_csv(tmp_path / "records.csv", index=False)
    got = bodies_from_source(str(tmp_path / "records.csv"))
    assert [p for p, _ in got] == [f"p-{i:04d}" for i in range(5)]
    assert got[0][1].medications == ["aspirin", "statin"] and got[1][1].ward == "cardio"
    eng = sa.create_engine(f"sqlite:///{tmp_path / 'site.db'}")
    frame.to_sql("visits", eng, index=False)
    eng.dispose()
    assert len(bodies_from_source(str(tmp_path / "site.db"), "visits")) == 5


def test_import_refuses_bad_rows_naming_rows_and_fields_not_values(tmp_path):
    import pandas as pd

    from insitu.errors import DataError
    from insitu.gateway.records import bodies_from_source

    good = {"pseudonym": "p-0001", **record_body(), "medications": "", "allergies": ""}
    bad = {**good, "pseudonym": "p-0002", "resting_bp": 999, "name": "Secret Name"}
    dup = {**good}
    pd.DataFrame([good, bad, dup]).to_csv(tmp_path / "r.csv", index=False)
    with pytest.raises(DataError) as e:
        bodies_from_source(str(tmp_path / "r.csv"))
    msg = str(e.value)
    assert "row 2: invalid field(s) ['resting_bp']" in msg and "row 3" in msg and "nothing was imported" in msg
    assert "999" not in msg and "Secret" not in msg
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "Patient.ndjson").write_text('{"resourceType": "Patient", "id": "x"}\n')
    with pytest.raises(DataError, match="is a fhir-ndjson source; gateway imports read a table"):
        bodies_from_source(str(tmp_path / "export"))


def test_import_records_command_fills_the_store_and_audits(tmp_path):
    import pandas as pd
    from typer.testing import CliRunner

    from insitu.audit import AuditLog
    from insitu.audit.keys import write_keypair
    from insitu.cli import app

    write_keypair(tmp_path / "keys", "gateway")
    (tmp_path / "gateway.toml").write_text(
        '[records]\nurl = "sqlite:///records.db"\n[audit]\npath = "audit.db"\nkey = "keys/gateway.key"\nwriter = "gateway"\n')
    pd.DataFrame([{"pseudonym": f"p-{i:04d}", **record_body(), "medications": "a;b", "allergies": ""} for i in range(3)]
                 ).to_csv(tmp_path / "site.csv", index=False)
    res = CliRunner().invoke(app, ["gateway", "import-records", str(tmp_path / "site.csv"), "--config", str(tmp_path / "gateway.toml")])
    assert res.exit_code == 0, res.output
    assert RecordStore(str(tmp_path / "records.db")).count() == 3
    (entry,) = AuditLog.read(tmp_path / "audit.db").entries()
    assert entry.action.value == "data.access" and entry.details["rows"] == 3


def test_concurrent_openers_of_a_new_store_all_succeed(tmp_path):
    """Two gateway workers starting at once both try to create the table (a race the bench hit)."""
    import threading

    for attempt in range(8):  # the unguarded CREATE fails about half the attempts
        path, errors = str(tmp_path / f"r{attempt}.db"), []
        barrier = threading.Barrier(4)

        def open_store() -> None:
            barrier.wait()
            try:
                RecordStore(path).engine.dispose()
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)

        threads = [threading.Thread(target=open_store) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
