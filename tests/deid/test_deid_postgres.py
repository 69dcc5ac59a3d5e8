"""De-identification from a real PostgreSQL table to a PostgreSQL table, audited in PostgreSQL."""
from __future__ import annotations

import pandas as pd
import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from insitu.audit import AuditAction, AuditLog
from insitu.data.sources import RecordSchema, read_records, write_table
from insitu.deid import DeidPolicy, FieldKeyring, decrypt_frame, deidentify

from .helpers import POLICY, SCHEMA, visits


@pytest.mark.postgres
def test_postgres_to_postgres_with_audit(pg_url, pg_prefix):
    engine = sa.create_engine(pg_url)
    src_table, out_table = f"{pg_prefix}_visits", f"{pg_prefix}_deid"
    raw = visits(400, seed=9)
    try:
        with engine.begin() as conn:
            raw.to_sql(src_table, conn, index=False)
        key = Ed25519PrivateKey.generate()
        log = AuditLog.open(pg_url, key, "site-a", table_prefix=f"{pg_prefix}_audit")
        schema = RecordSchema.from_dict(SCHEMA)
        records = read_records(pg_url, schema, table=src_table, audit=log)
        ring = FieldKeyring.generate()
        result = deidentify(records, schema, DeidPolicy.from_dict(POLICY), bytes(range(32)), keyring=ring)
        write_table(result.frame, pg_url, table=out_table)
        log.append(AuditAction.DEID_RUN, out_table, result.report.as_dict())
        with engine.connect() as conn:
            back = pd.read_sql_table(out_table, conn)
        assert len(back) == result.report.rows_out and "name" not in back.columns
        plain = decrypt_frame(back, ["diagnosis"], "mrn", ring)
        assert set(plain["diagnosis"]) <= {"I10", "E11", "J45", "C50", "F32"}
        assert back.groupby(["age", "zip", "sex", "visit_date"]).size().min() >= 5
        assert log.verify({"site-a": key.public_key()}).ok
        assert [e.action for e in log.entries()] == [AuditAction.DATA_ACCESS, AuditAction.DEID_RUN]
        log.close()
    finally:
        with engine.begin() as conn:
            for t in (src_table, out_table, f"{pg_prefix}_audit_entries", f"{pg_prefix}_audit_head",
                      f"{pg_prefix}_audit_meta"):
                conn.exec_driver_sql(f'DROP TABLE IF EXISTS "{t}" CASCADE')
            conn.exec_driver_sql(f'DROP FUNCTION IF EXISTS "{pg_prefix}_audit_entries_append_only"() CASCADE')
        engine.dispose()
