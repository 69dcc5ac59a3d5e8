"""De-identification and audit-log throughput, each beside a baseline measured in the same run.

    .venv/bin/python bench/deid.py            # 1,000,000 synthetic visit rows
    .venv/bin/python bench/deid.py --quick    # 100,000 rows, fewer audit appends

1. pseudonymize + date shift + generalize + k-anonymity check, at fixed hierarchy levels:
   insitu's vectorized path (one HMAC per distinct patient, hierarchies on distinct values, numpy
   codes and bincount) vs the naive per-row Python loop (``hmac.new`` per row, string slicing per
   row, a ``Counter`` of QI tuples).  The baseline runs on the first ``--baseline-rows`` rows (its
   cost is linear in rows; said in the output).
2. the full ``deidentify`` (search of the generalization lattice + suppression + risk before and
   after), rows per second, for scale.
3. the unkeyed-SHA-256 dictionary attack: how long hashing a whole 7-digit MRN space takes here.
4. audit appends per second (SQLite file, durable commits): batched ``append_many`` vs one
   transaction per ``append`` (the baseline), and plain SQLite INSERTs without chain or signature
   (the price of tamper evidence); on PostgreSQL too with ``--pg URL`` or $INSITU_TEST_PG_URL.
5. what a release leaks around its cells, attacked without and with each defence (same run, same
   records: a visit export sorted by date, ICD-10 codes of different lengths): token length ->
   diagnosis (unpadded vs padded tokens), row position -> hidden visit date and date shift (source
   order vs keyed order), visit intervals -> patient (exact vs coarsened dates); then what the
   defences cost (token size, time, date precision).  ``--release-rows`` sets its size.
"""
from __future__ import annotations

import argparse
import hashlib
import hmac
import os
import sqlite3
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from insitu.audit import AuditAction, AuditLog
from insitu.data.sources import RecordSchema
from insitu.attacks.linkage import interval_linkage_attack, row_position_attack, token_length_attack
from insitu.deid import DeidPolicy, FieldKeyring, Pseudonymizer, deidentify
from insitu.deid.fieldcrypt import encrypt_values, token_chars, unpadded_tokens
from insitu.deid.release import DateCoarsening, coarsen, release_order, singling_out
from insitu.deid.hierarchy import HIPAA_RESTRICTED_ZIP3, HierarchyKind, build_hierarchy
from insitu.deid.kanon import failing

K = 5
SHIFT_DAYS = 180


def synth(n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    patients = rng.integers(10**6, 10**7, size=max(n // 3, 1)).astype(str)
    base = pd.Timestamp("2018-01-01")
    return pd.DataFrame({
        "mrn": pd.Series(rng.choice(patients, size=n), dtype="string"),
        "age": pd.Series(rng.integers(0, 100, size=n), dtype="Int64"),
        "zip": pd.Series(rng.choice([f"{z:05d}" for z in rng.integers(500, 99999, size=5000)], size=n), dtype="string"),
        "sex": pd.Series(rng.choice(["F", "M"], size=n), dtype="string"),
        "visit_date": base + pd.to_timedelta(rng.integers(0, 5 * 365, size=n), unit="D"),
        "diagnosis": pd.Series(rng.choice([f"D{i:02d}" for i in range(40)], size=n), dtype="string"),
    })


def ours_fixed(df: pd.DataFrame, secret: bytes) -> int:
    """Vectorized: pseudonyms, date shift, age band 10 / ZIP3 / sex / month, count of records below k."""
    pz = Pseudonymizer(secret)
    pseud, offsets = pz.pseudonyms_and_offsets(df["mrn"], SHIFT_DAYS)
    shifted = df["visit_date"] + pd.to_timedelta(offsets, unit="D")
    hier = {"age": build_hierarchy(HierarchyKind.AGE_BAND, [10], {}, column="age"),
            "zip": build_hierarchy(HierarchyKind.ZIP_PREFIX, [3], {}, column="zip"),
            "sex": build_hierarchy(HierarchyKind.CATEGORY, ["value"], {}, column="sex"),
            "visit_date": build_hierarchy(HierarchyKind.DATE, ["month"], {}, column="visit_date")}
    codes = []
    for col, h in hier.items():
        values = shifted if col == "visit_date" else df[col]
        base, uniques = pd.factorize(values, use_na_sentinel=False)
        lab, _ = pd.factorize(h.generalize(np.asarray(uniques, dtype=object), 0))
        codes.append(lab[base])
    assert len(pseud) == len(df)
    return int(failing(codes, [], K, 1).sum())


def naive_fixed(df: pd.DataFrame, secret: bytes) -> int:
    """The same work, row by row in Python."""
    pz = Pseudonymizer(secret)  # same sub-keys, so both paths must find the same records below k
    key = pz._k_pseudo
    counts: Counter = Counter()
    rows = []
    for mrn, age, z, sex, visit in zip(df["mrn"].tolist(), df["age"].tolist(), df["zip"].tolist(),
                                       df["sex"].tolist(), df["visit_date"].tolist()):
        mac = hmac.new(key, mrn.encode(), hashlib.sha256).digest()
        pseud = mac[:16].hex()
        raw = int.from_bytes(mac[24:32], "big")
        off = (raw % SHIFT_DAYS + 1) * (-1 if raw >> 63 else 1)
        month = (visit + pd.Timedelta(days=off)).strftime("%Y-%m")
        band = "90+" if age >= 90 else f"{age // 10 * 10}-{age // 10 * 10 + 9}"
        z = "000" if z[:3] in HIPAA_RESTRICTED_ZIP3 else z[:3]
        qi = (band, z + "**", sex, month)
        counts[qi] += 1
        rows.append((pseud, qi))
    return sum(1 for _, qi in rows if counts[qi] < K)


SCHEMA = RecordSchema.from_dict({"columns": {
    "mrn": {"role": "direct_identifier", "type": "string"},
    "age": {"role": "quasi_identifier", "type": "integer"},
    "zip": {"role": "quasi_identifier", "type": "string"},
    "sex": {"role": "quasi_identifier", "type": "string"},
    "visit_date": {"role": "quasi_identifier", "type": "date"},
    "diagnosis": {"role": "sensitive", "type": "string"},
}})
POLICY = DeidPolicy.from_dict({
    "deid": {"k": K, "l": 2, "max_suppression": 0.02, "patient_id": "mrn", "date_shift_days": SHIFT_DAYS},
    "identifiers": {"mrn": "pseudonymize"},
    "generalize": {"age": {"hierarchy": "age_band", "levels": [5, 10, 20, "*"]},
                   "zip": {"hierarchy": "zip_prefix", "levels": [3, 2, 1, "*"]},
                   "sex": {"hierarchy": "category"},
                   "visit_date": {"hierarchy": "date", "levels": ["month", "year", "*"]}},
    "sensitive": {"diagnosis": {"encrypt": False, "diversity": True}},
})


#: ICD-10 codes of different lengths, unevenly common (the commonest is 22 %)
ICD = ["I10", "E11.9", "J45.909", "C50.911", "F32.A", "Z00.00", "M54.5", "K21.9", "E78.5", "N39.0"]
ICD_P = np.array([22, 14, 12, 10, 10, 9, 8, 7, 5, 3], float) / 100


def release_schema() -> RecordSchema:
    """SCHEMA's columns plus a released (shifted, not generalized) admission date."""
    cols = {c.name: {"role": c.role.value, "type": c.type.value} for c in SCHEMA.columns}
    cols["admitted"] = {"role": "feature", "type": "date"}
    return RecordSchema.from_dict({"columns": cols})


def release_policy(coarsening: str) -> DeidPolicy:
    return DeidPolicy.from_dict({
        "deid": {"k": K, "l": 2, "max_suppression": 0.02, "patient_id": "mrn", "date_shift_days": SHIFT_DAYS,
                 "date_coarsening": coarsening},
        "identifiers": {"mrn": "pseudonymize"},
        "generalize": {"age": {"hierarchy": "age_band", "levels": [5, 10, 20, "*"]},
                       "zip": {"hierarchy": "zip_prefix", "levels": [3, 2, 1, "*"]},
                       "sex": {"hierarchy": "category"},
                       "visit_date": {"hierarchy": "date", "levels": ["month", "year", "*"]}},
        "sensitive": {"diagnosis": {"encrypt": True, "diversity": True, "max_bytes": 16}},
    })


def synth_release(n: int, seed: int = 1) -> pd.DataFrame:
    """Visits as an export sorted by visit date: ~3 per patient, admission 0-9 days before the visit."""
    df = synth(n, seed)
    rng = np.random.default_rng(seed + 1)
    df["diagnosis"] = pd.Series(rng.choice(ICD, size=n, p=ICD_P), dtype="string")
    df["admitted"] = df["visit_date"] - pd.to_timedelta(rng.integers(0, 10, size=n), unit="D")
    return df.sort_values("visit_date", kind="stable").reset_index(drop=True)


def release_bench(n: int, targets: int, seed: int = 1) -> None:
    df = synth_release(n, seed)
    secret, ring, schema = os.urandom(32), FieldKeyring.generate(), release_schema()
    t_on, on = timed(lambda: deidentify(df, schema, release_policy("month"), secret, keyring=ring))
    t_off, off = timed(lambda: deidentify(df, schema, release_policy("none"), secret, keyring=ring))
    src = df.iloc[on.source_rows].reset_index(drop=True)  # the evaluator's truth, in release order
    back = np.argsort(on.source_rows)                       # the same release in source order

    # token length -> diagnosis
    rids = on.frame["mrn"].astype(str).tolist()
    t_unpad, unpadded = timed(lambda: unpadded_tokens(src["diagnosis"].tolist(), "diagnosis", rids, ring))
    t_pad, _ = timed(lambda: encrypt_values(src["diagnosis"].tolist(), "diagnosis", rids, ring, max_bytes=16))
    tl_off = token_length_attack(unpadded, src["diagnosis"])
    tl_on = token_length_attack(on.frame["diagnosis"], src["diagnosis"])
    # row position -> hidden visit date, and the date shift (from the shifted, released admission date)
    true_shift = Pseudonymizer(secret).date_offsets(df["mrn"], SHIFT_DAYS)[on.source_rows]
    ro_off = row_position_attack(src["visit_date"].iloc[back], shifted=on.frame["admitted"].iloc[back],
                                 true_shift_days=true_shift[back])
    ro_on = row_position_attack(src["visit_date"], shifted=on.frame["admitted"], true_shift_days=true_shift)
    # visit intervals -> patient: an attacker holding some patients' true admission dates
    truth = dict(zip(df["mrn"], Pseudonymizer(secret).pseudonyms(df["mrn"])))
    rng = np.random.default_rng(seed)
    chosen = set(rng.choice(df["mrn"].unique(), size=min(targets, df["mrn"].nunique()), replace=False))
    aux = df[df["mrn"].isin(chosen)]
    il_off = interval_linkage_attack(off.frame["mrn"], [off.frame["admitted"]], aux["mrn"], [aux["admitted"]],
                                     truth=truth, coarsening="none", max_shift_days=SHIFT_DAYS)
    t_il, il_on = timed(lambda: interval_linkage_attack(on.frame["mrn"], [on.frame["admitted"]], aux["mrn"],
                                                        [aux["admitted"]], truth=truth, coarsening="month",
                                                        max_shift_days=SHIFT_DAYS))
    so = on.report.intervals["singling_out"]

    def ratio(a: float, b: float) -> str:
        return f"{a / b:.3f}" if b else "-"

    print(f"\n5. what a release leaks around its cells ({len(on.frame):,} released visits of a date-sorted export, "
          f"{on.report.intervals['multi_visit_patients']:,} multi-visit patients; same run, same records)")
    rows = [
        ("token length -> diagnosis", "accuracy", "unpadded", tl_off.accuracy, "padded to 16 B", tl_on.accuracy,
         f"majority {tl_on.majority_rate:.3f}"),
        ("row position -> visit date", "Spearman", "source order", ro_off.spearman, "keyed order", ro_on.spearman,
         "0"),
        ("", "median error, days", "", ro_off.median_error_days, "", ro_on.median_error_days,
         f"mid-span guess {ro_on.baseline_error_days:.0f}"),
        ("  ... -> date shift", "median error, days", "", ro_off.shift_median_error_days, "",
         ro_on.shift_median_error_days, f"guess 0: {ro_on.shift_baseline_error_days:.0f}"),
        ("intervals -> patient: unique", "share of patients", "exact", so["none"], "week", so["week"], "-"),
        ("  (report, all released dates)", "", "exact", so["none"], "month", so["month"], "-"),
        ("", "", "exact", so["none"], "quarter", so["quarter"], "-"),
        ("intervals -> patient: linkage", "re-identified", "exact", il_off.rate, "month", il_on.rate, "-"),
        (f"  ({len(chosen):,} patients' admissions known)", "", "", np.nan, "", np.nan, ""),
    ]
    head = f"   {'attack':<34}{'measure':<22}{'without':>16}{'':>8}{'with':>18}{'':>8}{'with/without':>14}  baseline"
    print(head)
    for attack, measure, wo_name, wo, w_name, w, base in rows:
        if np.isnan(wo):
            print(f"   {attack}")
            continue
        print(f"   {attack:<34}{measure:<22}{wo_name:>16}{wo:>8.3f}{w_name:>18}{w:>8.3f}{ratio(w, wo):>14}  {base}")
    m = len(on.frame)
    t_order, _ = timed(lambda: release_order(secret, os.urandom(16), m))
    exact_days = src["admitted"]
    week = (exact_days - coarsen(exact_days, DateCoarsening.WEEK)).dt.days.mean()
    month = (exact_days - coarsen(exact_days, DateCoarsening.MONTH)).dt.days.mean()
    unpadded_len = np.mean([len(t) for t in unpadded])
    print("   costs:")
    print(f"   token size            {token_chars(16, ring.active):>8} chars padded (max_bytes 16)   vs "
          f"{unpadded_len:.1f} mean unpadded   ratio {token_chars(16, ring.active) / unpadded_len:.2f} x")
    print(f"   encryption            {m / t_pad:>12,.0f} rows/s padded   vs {m / t_unpad:>10,.0f} unpadded   "
          f"ratio {(m / t_pad) / (m / t_unpad):.2f} x")
    print(f"   keyed row order       {m / t_order:>12,.0f} rows/s ({t_order * 1e3:.0f} ms for the release)")
    t_so, _ = timed(lambda: [singling_out(on.frame["mrn"], [coarsen(on.frame["admitted"], u)]) for u in DateCoarsening])
    print(f"   singling-out measure  {t_so:>12.2f} s for {len(DateCoarsening)} units (admission dates), vs {t_on:.2f} s for the whole "
          f"deidentify (month coarsening; {t_off:.2f} s without)")
    print(f"   date precision        rounding moves a date by {week:.1f} days on average to weeks, {month:.1f} to months "
          f"(after the ±{SHIFT_DAYS}-day shift, which already moves it {np.abs(true_shift).mean():.0f})")
    print(f"   interval attack time  {t_il:.1f} s for {len(chosen):,} targets x {2 * SHIFT_DAYS + 1} candidate shifts")


def timed(fn, *a):
    t = time.perf_counter()
    out = fn(*a)
    return time.perf_counter() - t, out


def audit_bench(n: int, batch: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as d:
        key = Ed25519PrivateKey.generate()
        details = {"rows": 1200, "columns": ["age", "zip", "sex"], "epsilon": 0.25}
        log = AuditLog.open(Path(d) / "single.db", key, "site-a")
        t_single, _ = timed(lambda: [log.append(AuditAction.DATA_ACCESS, "visits", details) for _ in range(n)])
        log.close()
        log = AuditLog.open(Path(d) / "batched.db", key, "site-a")
        t_batch, _ = timed(lambda: [log.append_many([(AuditAction.DATA_ACCESS, "visits", details)] * batch)
                                    for _ in range(max(n * 5 // batch, 1))])
        n_batch = max(n * 5 // batch, 1) * batch
        ok = AuditLog.read(Path(d) / "batched.db").verify({"site-a": key.public_key()})
        t_verify, _ = timed(lambda: AuditLog.read(Path(d) / "batched.db").verify({"site-a": key.public_key()}))
        assert ok.ok and ok.entries_checked == n_batch
        log.close()
        con = sqlite3.connect(Path(d) / "plain.db", isolation_level=None)
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA synchronous=FULL")
        con.execute("CREATE TABLE t (seq INTEGER PRIMARY KEY, action TEXT, subject TEXT, details TEXT)")
        import json

        text = json.dumps(details)

        def plain() -> None:
            for i in range(n):
                con.execute("BEGIN IMMEDIATE")
                con.execute("INSERT INTO t VALUES (?, ?, ?, ?)", (i, "data.access", "visits", text))
                con.execute("COMMIT")

        t_plain, _ = timed(plain)
        con.close()
    return {"single": n / t_single, "batched": n_batch / t_batch, "plain": n / t_plain,
            "verify": n_batch / t_verify}


def audit_bench_pg(url: str, n: int, batch: int) -> dict[str, float]:
    """Same on PostgreSQL, in throw-away tables."""
    import secrets as _s

    import sqlalchemy as sa

    prefix = "bench_" + _s.token_hex(4)
    key = Ed25519PrivateKey.generate()
    details = {"rows": 1200, "columns": ["age", "zip", "sex"], "epsilon": 0.25}
    log = AuditLog.open(url, key, "site-a", table_prefix=prefix)
    try:
        t_single, _ = timed(lambda: [log.append(AuditAction.DATA_ACCESS, "visits", details) for _ in range(n)])
        reps = max(n * 5 // batch, 1)
        t_batch, _ = timed(lambda: [log.append_many([(AuditAction.DATA_ACCESS, "visits", details)] * batch)
                                    for _ in range(reps)])
        assert log.verify({"site-a": key.public_key()}).ok
    finally:
        log.close()
        eng = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
        with eng.begin() as conn:
            for t in ("entries", "head", "meta"):
                conn.exec_driver_sql(f'DROP TABLE IF EXISTS "{prefix}_{t}" CASCADE')
            conn.exec_driver_sql(f'DROP FUNCTION IF EXISTS "{prefix}_entries_append_only"() CASCADE')
        eng.dispose()
    return {"single": n / t_single, "batched": reps * batch / t_batch}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="100,000 rows and fewer audit appends")
    ap.add_argument("--rows", type=int, default=None)
    ap.add_argument("--baseline-rows", type=int, default=None, help="rows for the per-row baseline (default min(rows, 200,000))")
    ap.add_argument("--release-rows", type=int, default=None,
                    help="rows of the release-leak section 5 (default min(rows, 200,000))")
    ap.add_argument("--pg", default=os.environ.get("INSITU_TEST_PG_URL"),
                    help="also measure audit appends on this PostgreSQL URL (default: $INSITU_TEST_PG_URL)")
    args = ap.parse_args()
    n = args.rows or (100_000 if args.quick else 1_000_000)
    nb = min(n, args.baseline_rows or 200_000)
    secret = os.urandom(32)
    print(f"insitu bench/deid.py  rows={n:,}  python={sys.version.split()[0]}  cores={os.cpu_count()}")
    df = synth(n)

    t_ours, bad_ours = timed(ours_fixed, df, secret)
    t_naive, bad_naive = timed(naive_fixed, df.iloc[:nb], secret)
    _, bad_ours_nb = timed(ours_fixed, df.iloc[:nb].reset_index(drop=True), secret)
    print("\n1. pseudonymize + date shift + generalize + k-anonymity check (fixed levels, k=5)")
    print(f"   insitu vectorized     {n / t_ours:>12,.0f} rows/s   ({n:,} rows in {t_ours:.2f} s)")
    print(f"   naive per-row Python  {nb / t_naive:>12,.0f} rows/s   ({nb:,} rows in {t_naive:.2f} s)")
    print(f"   ratio                 {(n / t_ours) / (nb / t_naive):>12.1f} x")
    assert bad_ours_nb == bad_naive, (bad_ours_nb, bad_naive)
    print(f"   (same answer: {bad_naive:,} of the first {nb:,} records are in classes below k at these levels)")

    t_full, res = timed(lambda: deidentify(df, SCHEMA, POLICY, secret, encrypt=False))
    r = res.report
    print("\n2. full deidentify: lattice search + suppression + risk before/after (k=5, l=2, ≤2% suppressed)")
    print(f"   insitu                {n / t_full:>12,.0f} rows/s   ({t_full:.2f} s; levels {r.levels}; "
          f"suppressed {r.suppressed:,}; uniqueness {r.before['uniqueness']:.1%} -> {r.after['uniqueness']:.1%}; "
          f"prosecutor max {r.before['prosecutor_max']:.2f} -> {r.after['prosecutor_max']:.2f})")

    space = 1_000_000 if not args.quick else 200_000
    t_hash, _ = timed(lambda: [hashlib.sha256(f"{i:07d}".encode()).digest() for i in range(space)])
    print("\n3. dictionary attack on unkeyed SHA-256 pseudonyms")
    print(f"   hashing {space:,} MRNs: {t_hash:.2f} s -> whole 7-digit MRN space (10^7) in about "
          f"{t_hash * 10**7 / space:.0f} s on one core; keyed HMAC: impossible without the site secret")

    na = 100 if args.quick else 400
    a = audit_bench(na, 100)
    print("\n4. audit log appends (SQLite WAL, synchronous=FULL, each transaction durable)")
    print(f"   batched append_many(100)          {a['batched']:>10,.0f} appends/s")
    print(f"   baseline: one commit per append   {a['single']:>10,.0f} appends/s   ratio {a['batched'] / a['single']:.1f} x")
    print(f"   plain INSERT, no chain/signature  {a['plain']:>10,.0f} appends/s   "
          f"(insitu single / plain = {a['single'] / a['plain']:.2f}: the price of tamper evidence)")
    print(f"   verify (hash + Ed25519 check)     {a['verify']:>10,.0f} entries/s")
    if args.pg:
        p = audit_bench_pg(args.pg, na // 2, 100)
        print("   PostgreSQL (same machine, 127.0.0.1):")
        print(f"   batched append_many(100)          {p['batched']:>10,.0f} appends/s")
        print(f"   baseline: one commit per append   {p['single']:>10,.0f} appends/s   ratio {p['batched'] / p['single']:.1f} x")

    release_bench(args.release_rows or min(n, 200_000), 500 if args.quick else 2000)


if __name__ == "__main__":
    main()
