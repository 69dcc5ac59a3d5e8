"""Record sources: CSV, SQLite and a real PostgreSQL read through a typed role schema."""
from __future__ import annotations

import sqlite3

import pandas as pd
import pytest
import sqlalchemy as sa

from insitu.audit import AuditAction, AuditLog
from insitu.data.sources import RecordSchema, SourceKind, open_source, read_records, write_table
from insitu.errors import ConfigError, DataError

SCHEMA = RecordSchema.from_dict({
    "table": "visits",
    "columns": {
        "mrn": {"role": "direct_identifier", "type": "string", "nullable": False},
        "age": {"role": "quasi_identifier", "type": "integer"},
        "visit": {"role": "quasi_identifier", "type": "date"},
        "smoker": {"role": "feature", "type": "boolean"},
        "chol": {"role": "feature", "type": "float", "feature": "cholesterol"},
        "dx": {"role": "sensitive", "type": "string"},
    },
})

RAW = pd.DataFrame({
    "mrn": ["A1", "A2", "A3"],
    "age": ["41", "", "77"],
    "visit": ["2021-03-04", "2021-03-05", ""],
    "smoker": ["TRUE", "false", ""],
    "chol": ["180.5", "201", ""],
    "dx": ["I10", "", "E11"],
    "secret_note": ["x", "y", "z"],  # undeclared: never read
})


def _check(frame: pd.DataFrame) -> None:
    assert list(frame.columns) == SCHEMA.names
    assert str(frame["age"].dtype) == "Int64" and frame["age"].tolist()[0] == 41 and pd.isna(frame["age"][1])
    assert frame["visit"][0] == pd.Timestamp("2021-03-04") and pd.isna(frame["visit"][2])
    assert frame["smoker"].tolist()[:2] == [True, False] and pd.isna(frame["smoker"][2])
    assert frame["chol"][0] == 180.5 and pd.isna(frame["dx"][1])


def test_csv_source(tmp_path):
    RAW.to_csv(tmp_path / "v.csv", index=False)
    src = open_source(tmp_path / "v.csv")
    assert src.kind is SourceKind.CSV
    _check(read_records(src, SCHEMA))


def test_sqlite_source_and_audit(tmp_path):
    con = sqlite3.connect(tmp_path / "h.db")
    RAW.replace("", None).to_sql("visits", con, index=False)
    con.close()
    src = open_source(tmp_path / "h.db", "visits")
    assert src.kind is SourceKind.SQLITE
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    log = AuditLog.open(tmp_path / "audit.db", Ed25519PrivateKey.generate(), "site-a")
    _check(read_records(tmp_path / "h.db", SCHEMA, audit=log))
    (entry,) = log.entries()
    assert entry.action is AuditAction.DATA_ACCESS and entry.details["rows"] == 3
    with pytest.raises(DataError, match=r"no table 'visitz'; tables: \['visits'\]"):
        read_records(tmp_path / "h.db", SCHEMA, table="visitz")


def test_missing_column_named(tmp_path):
    RAW.drop(columns=["chol", "dx"]).to_csv(tmp_path / "v.csv", index=False)
    with pytest.raises(DataError, match=r"lacks column\(s\) \['chol', 'dx'\]"):
        read_records(tmp_path / "v.csv", SCHEMA)


def test_type_mismatch_names_column_and_row_not_value(tmp_path):
    bad = RAW.copy()
    bad.loc[2, "age"] = "seventy-seven"
    bad.loc[0, "visit"] = "yesterday"
    bad.loc[1, "mrn"] = ""
    bad.to_csv(tmp_path / "v.csv", index=False)
    with pytest.raises(DataError) as exc:
        read_records(tmp_path / "v.csv", SCHEMA)
    msg = str(exc.value)
    assert "'age' is declared integer but 1 value(s), first at data row(s) 3" in msg
    assert "'visit' is declared date" in msg and "'mrn' is declared nullable = false" in msg
    assert "seventy" not in msg and "yesterday" not in msg


def test_bad_source_specs(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        open_source(tmp_path / "nope.csv")
    with pytest.raises(ConfigError, match="name the table"):
        open_source("postgresql://u:p@127.0.0.1/db")
    with pytest.raises(ConfigError, match="use a CSV path"):
        open_source("mysql://u:p@h/db", "t")
    assert "p@" not in open_source("postgresql://u:p@127.0.0.1/db", "t").display


def test_write_table_refuses_overwrite(tmp_path):
    write_table(RAW, tmp_path / "o.csv")
    with pytest.raises(DataError, match="already exists"):
        write_table(RAW, tmp_path / "o.csv")
    write_table(RAW, tmp_path / "o.db", table="x")
    assert pd.read_sql("SELECT * FROM x", sqlite3.connect(tmp_path / "o.db")).shape == RAW.shape


@pytest.mark.postgres
def test_postgresql_source_real_server(pg_url, pg_prefix):
    table = f"{pg_prefix}_visits"
    engine = sa.create_engine(pg_url)
    try:
        typed = RAW.replace("", None).drop(columns=["secret_note"])
        with engine.begin() as conn:
            typed.to_sql(table, conn, index=False)
        src = open_source(pg_url.replace("postgresql+psycopg://", "postgresql://"), table)
        assert src.kind is SourceKind.POSTGRESQL and "insitu:***@" in src.display
        _check(read_records(src, SCHEMA))
        with pytest.raises(DataError, match=r"lacks column\(s\) \['extra'\]"):
            read_records(src, RecordSchema.from_dict({"columns": {
                "mrn": {"role": "direct_identifier", "type": "string"},
                "extra": {"role": "feature", "type": "float"}}}))
        with pytest.raises(DataError, match="no table"):
            read_records(pg_url, SCHEMA, table=f"{pg_prefix}_missing")
        where = write_table(typed, pg_url, table=f"{pg_prefix}_out")
        assert "***" in where
        with pytest.raises(DataError, match="overwrite"):
            write_table(typed, pg_url, table=f"{pg_prefix}_out")
    finally:
        with engine.begin() as conn:
            for t in (table, f"{pg_prefix}_out"):
                conn.exec_driver_sql(f'DROP TABLE IF EXISTS "{t}"')
        engine.dispose()
