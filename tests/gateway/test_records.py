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
        "app", "auditing", "config", "model", "policy", "records", "service", "tls", "tokens", "cli",
        "import_module", "Any"}}
    assert public == set(gw.__all__)
    assert all(getattr(gw, n) is not None for n in gw.__all__)
