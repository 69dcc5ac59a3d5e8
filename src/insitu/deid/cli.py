"""``insitu deid``: de-identify site records and report their re-identification risk."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.table import Table

from insitu.cliopts import renamed

if TYPE_CHECKING:
    from insitu.data.sources import RecordSchema
    from insitu.deid.engine import DeidReport

# The de-identification library (pandas) loads when a deid command runs, not with the CLI.
from insitu.errors import ConfigError, DataError, PolicyViolation

app = typer.Typer(help="De-identify site records (pseudonyms, k-anonymity, l-diversity, field encryption).",
                  no_args_is_help=True)
out = Console()

_SCHEMA_HELP = "Record schema (TOML: column roles and types). Default: schema.toml beside the policy."
_SOURCE_HELP = "Records: a CSV file, a SQLite file, or a postgresql://user:pass@host/db URL."


def _schema(schema: Optional[Path], policy: Path) -> RecordSchema:
    from insitu.data.sources import RecordSchema

    return RecordSchema.from_toml(schema if schema is not None else policy.parent / "schema.toml")


def _audit(log: Optional[str], key: Optional[Path], writer: str):
    if log is None:
        return None
    if key is None:
        raise ConfigError("--audit-log needs --audit-key (the writer's Ed25519 key, `insitu audit keygen`)")
    from insitu.audit import AuditLog

    return AuditLog.open(log, key, writer)


def _risk_table(report: dict, after: dict | None, title: str) -> Table:
    t = Table(title=title)
    t.add_column("measure")
    t.add_column("before", justify="right")
    if after is not None:
        t.add_column("after", justify="right")
    rows = [("records", "records", "{:d}"), ("equivalence classes", "classes", "{:d}"),
            ("k (smallest class)", "k", "{}"), ("l (fewest sensitive values)", "l", "{}"),
            ("uniqueness (share alone in class)", "uniqueness", "{:.2%}"),
            ("prosecutor risk, max (1/k)", "prosecutor_max", "{:.3f}"),
            ("prosecutor risk, average", "prosecutor_avg", "{:.3f}"),
            ("records in classes below policy k", "share_below_k", "{:.2%}")]
    for label, key, fmt in rows:
        cells = [fmt.format(report[key]) if report[key] is not None else "-"]
        if after is not None:
            cells.append(fmt.format(after[key]) if after[key] is not None else "-")
        t.add_row(label, *cells)
    return t


def _summary(r: DeidReport) -> None:
    out.print(_risk_table(r.before, r.after, f"re-identification risk (policy k={r.k}, l={r.l})"))
    out.print(f"levels: {', '.join(f'{c}={v}' for c, v in r.levels.items()) or '-'}; "
              f"suppressed {r.suppressed} of {r.rows_in} records ({r.suppressed_share:.2%}, "
              f"allowed {r.max_suppression:.0%})")
    out.print(f"pseudonymized: {r.pseudonymized or '-'}  dropped: {r.dropped or '-'}  "
              f"encrypted: {r.encrypted or '-'}" + (f" (key {r.key_id})" if r.key_id else ""))
    for col, t in r.tokens.items():
        out.print(f"tokens of {col}: padded to {t['max_bytes']} bytes, every token {t['token_chars']} characters")
    out.print(f"row order: keyed random (nonce {r.row_order_nonce})")
    iv = r.intervals
    if iv and iv.get("multi_visit_patients"):
        rates = "  ".join(f"{u}={v:.1%}" + ("*" if u == iv["applied"] else "")
                          for u, v in iv["singling_out"].items() if v is not None)
        out.print(f"dates shifted ±{r.date_shift_days} days, coarsened to {r.date_coarsening}; share of the "
                  f"{iv['multi_visit_patients']} multi-visit patients singled out by their intervals: {rates} "
                  "(* = this release; set \\[deid] date_coarsening to lower it)")


@app.command("apply")
def apply_command(
    policy: Path = typer.Option(..., help="De-identification policy (TOML)."),
    source: str = typer.Option(..., help=_SOURCE_HELP),
    out_path: str = typer.Option(..., "--out", "-o", help="Where to write: .csv, .db/.sqlite (SQLite) or postgresql:// URL."),
    table: Optional[str] = typer.Option(None, help="Table to read from a SQLite/PostgreSQL source (default: the schema's)."),
    out_table: str = typer.Option("deidentified", help="Table name for SQLite/PostgreSQL output."),
    schema: Optional[Path] = typer.Option(None, help=_SCHEMA_HELP),
    secret: Path = typer.Option(Path("site.secret"), help="Site secret for pseudonyms and date shifts (`insitu deid keygen`)."),
    keyring: Optional[Path] = typer.Option(None, help="Field-encryption keyring for sensitive columns (`insitu deid keygen --keyring`)."),
    report: Optional[Path] = typer.Option(None, help="Also write the run report as JSON here."),
    audit_log: Optional[str] = typer.Option(None, help="Record the data access and the run in this audit log (path or postgresql:// URL)."),
    audit_key: Optional[Path] = typer.Option(None, help="Ed25519 key of the audit writer."),
    writer: str = typer.Option("site", help="Audit writer name."),
    overwrite: bool = typer.Option(False, help="Replace --out if it exists."),
) -> None:
    """Apply a policy: pseudonymize or drop identifiers, generalize to k-anonymity/l-diversity, encrypt sensitive columns.

    Everything is checked in memory first: if the policy cannot be met (e.g. k needs more
    suppression than allowed, or a sensitive value is longer than its column's max_bytes) nothing
    is written.  Tokens of a column all have one length, rows come out in a keyed random order,
    and the report gives the share of patients their visit intervals single out.
    """
    from insitu.data.sources import read_records, write_table
    from insitu.deid import DeidPolicy, FieldKeyring, deidentify, load_site_secret

    if "://" not in out_path and Path(out_path).exists() and not overwrite:
        raise DataError(f"{out_path} already exists; pass --overwrite to replace it")
    from insitu.clitools import check_writable

    if "://" not in out_path:  # refuse an output that cannot be written before reading a record
        check_writable(out_path, "--out")
    if report is not None:
        check_writable(report, "--report")
    sch = _schema(schema, policy)
    pol = DeidPolicy.from_toml(policy)
    ring = FieldKeyring.load(keyring) if keyring is not None else None
    site_secret = load_site_secret(secret)
    audit = _audit(audit_log, audit_key, writer)
    records = read_records(source, sch, table=table, audit=audit)
    result = deidentify(records, sch, pol, site_secret, keyring=ring)
    where = write_table(result.frame, out_path, table=out_table, overwrite=overwrite)
    if report is not None:
        report.write_text(json.dumps(result.report.as_dict(), indent=2))
    if audit is not None:
        from insitu.audit import AuditAction

        audit.append(AuditAction.DEID_RUN, where, result.report.as_dict())
        audit.close()
    _summary(result.report)
    out.print(f"wrote {result.report.rows_out} records to {where}")


@app.command("check")
def check_command(
    policy: Path = typer.Option(..., help="De-identification policy (TOML)."),
    source: str = typer.Option(..., help=_SOURCE_HELP),
    table: Optional[str] = typer.Option(None, help="Table of a SQLite/PostgreSQL source."),
    schema: Optional[Path] = typer.Option(None, help=_SCHEMA_HELP),
    secret: Optional[Path] = typer.Option(None, help="Site secret (for the exact date shifts of `apply`); default: a throw-away one."),
) -> None:
    """Report k, l, uniqueness and prosecutor risk of the records before and after the policy; writes nothing."""
    from insitu.data.sources import read_records
    from insitu.deid import DeidPolicy, assess, deidentify, load_site_secret

    sch = _schema(schema, policy)
    pol = DeidPolicy.from_toml(policy)
    records = read_records(source, sch, table=table)
    site_secret = load_site_secret(secret) if secret is not None else os.urandom(32)
    try:
        result = deidentify(records, sch, pol, site_secret, encrypt=False)
    except PolicyViolation:
        out.print(_risk_table(assess(records, sch, pol).as_dict(), None, "re-identification risk of the records"))
        raise
    _summary(result.report)


@app.command("keygen")
def keygen_command(
    secret: Optional[Path] = typer.Option(None, help="Create a site secret (32 random bytes, mode 0600) here."),
    keyring: Optional[Path] = typer.Option(None, help="Create a field-encryption keyring here."),
    key_id: str = typer.Option("k1", help="Id of the keyring's first key."),
) -> None:
    """Create the site secret (pseudonyms, date shifts) and/or the AES-256-GCM keyring. Never overwrites."""
    from insitu.deid import FieldKeyring, generate_site_secret

    if secret is None and keyring is None:
        raise ConfigError("pass --secret PATH and/or --keyring PATH")
    if secret is not None:
        out.print(f"site secret: {generate_site_secret(secret)}  (back it up: pseudonyms depend on it)")
    if keyring is not None:
        out.print(f"keyring: {FieldKeyring.generate(key_id).save(keyring)} (active key {key_id})")


@app.command("rotate")
def rotate_command(
    data: Path = typer.Option(..., "--target", help="The de-identified file to re-encrypt in place (.csv or SQLite), as `deid apply --out` wrote it."),
    _old_data: Any = renamed("--data", "--target (--data always names an input data set)"),
    keyring: Path = typer.Option(..., help="Keyring; a new key is added and made active."),
    new_key_id: str = typer.Option(..., help="Id of the new key, e.g. k2."),
    id_column: str = typer.Option(..., help="Pseudonym column the tokens are bound to (the policy's patient_id feature)."),
    table: str = typer.Option("deidentified", help="Table, for a SQLite file."),
) -> None:
    """Rotate the field-encryption key: re-encrypt every token in DATA to a new key id (all verified first).

    Each column keeps its padded token length; tokens of the old unpadded format come out padded
    to the column's longest value.
    """
    import pandas as pd
    
    from insitu.data.sources import write_table
    from insitu.deid import FieldKeyring, rotate_frame
    from insitu.deid.fieldcrypt import encrypted_columns, token_lengths

    ring = FieldKeyring.load(keyring)
    is_sqlite = data.suffix.lower() in (".db", ".sqlite", ".sqlite3")
    if is_sqlite:
        import sqlalchemy as sa

        eng = sa.create_engine(f"sqlite:///{data}")
        with eng.connect() as conn:
            frame = pd.read_sql_table(table, conn)
        eng.dispose()
    else:
        frame = pd.read_csv(data, dtype=str, keep_default_na=False)
    cols = encrypted_columns(frame)
    if not cols:
        raise DataError(f"{data} has no encrypted columns")
    if id_column not in frame.columns:
        raise ConfigError(f"{data} has no column {id_column!r}; columns: {list(frame.columns)}")
    new_ring = ring.rotated(new_key_id)
    rotated = rotate_frame(frame, cols, id_column, new_ring)
    new_ring.save(keyring, overwrite=True)
    write_table(rotated, data, table=table, overwrite=True)
    lengths = ", ".join(f"{c}: {'/'.join(map(str, n))} characters" for c, n in token_lengths(rotated, cols).items())
    out.print(f"re-encrypted {len(cols)} column(s) {cols} of {len(frame)} records to key {new_key_id} "
              f"(token length {lengths}); old keys kept in {keyring} until retired")
