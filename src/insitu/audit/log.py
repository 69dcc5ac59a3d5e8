"""Append-only, tamper-evident audit log: a SHA-256 hash chain of Ed25519-signed entries.

Why both a chain and signatures: the chain (each entry holds the SHA-256 of the previous one)
makes deletion, insertion and reordering visible; the signature of the entry's writer makes a
rewritten entry visible even when the attacker recomputes every hash after it, because they
cannot sign as the writer.  Either alone is not enough: a chain without signatures can be rebuilt
wholesale by anyone with write access to the database, and signatures without a chain do not show
that an entry was removed.

What it does not protect against, stated plainly:

* Truncation of the newest entries together with the signed head record, by someone holding an
  older copy of the head (a backup).  A signed ``audit_head`` row (the last seq and hash, signed by
  the writer of the last entry) catches simple truncation; to catch the rest, publish ``head()``
  somewhere the site cannot rewrite (the coordinator's round record, a ticket) and pass it back to
  ``verify(expect_head=...)``.
* A writer whose private key is stolen: such entries verify.  Rotate the key and record it.

Storage: SQLite by default (a path), PostgreSQL when given a ``postgresql://`` URL, both through
SQLAlchemy.  Appends are serialized: SQLite with ``BEGIN IMMEDIATE`` (one writer holds the
reserved lock while it reads the head and inserts), PostgreSQL with a self-exclusive table lock.
Database triggers reject UPDATE and DELETE on entries; they stop mistakes, not an administrator,
which is what the chain and signatures are for.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import StrEnum
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from insitu.audit.keys import check_writer_name, load_private_key
from insitu.errors import ConfigError, SecurityError

FORMAT = "insitu-audit-v1"
_ENTRY_DOMAIN = b"insitu-audit-entry-v1\x00"
_HEAD_DOMAIN = b"insitu-audit-head-v1\x00"
MAX_DETAILS_BYTES = 64 * 1024
_PREFIX_RE = re.compile(r"^[a-z_][a-z0-9_]{0,30}$")


class AuditAction(StrEnum):
    """What the platform records; each is logged by the component that did it."""

    DATA_ACCESS = "data.access"                  # records read from a source (site)
    DEID_RUN = "deid.run"                        # de-identification policy applied (site)
    KEY_ROTATION = "key.rotation"                # field-encryption or signing key rotated
    TASK_APPROVAL = "task.approval"              # site admin approved a task hash
    TASK_REVOCATION = "task.revocation"          # site admin withdrew an approval
    ROUND_PARTICIPATION = "round.participation"  # site took part (or refused) in a round
    EPSILON_SPEND = "privacy.epsilon_spend"      # DP ledger charged a site's budget
    BUDGET_CHANGE = "privacy.budget_change"      # a site's ε budget was set or changed
    MODEL_RELEASE = "model.release"              # coordinator published a model
    GATEWAY_DECISION = "gateway.decision"        # gateway allowed/denied a request
    CERTIFICATE = "pki.certificate"              # certificate issued, renewed or revoked

    @classmethod
    def parse(cls, value: "AuditAction | str") -> "AuditAction":
        if isinstance(value, cls):
            return value
        for member in cls:
            if value in (member.value, member.name):
                return member
        known = ", ".join(m.value for m in cls)
        raise ConfigError(f"unknown audit action {value!r}; known actions: {known}")


@dataclass(frozen=True)
class AuditEntry:
    """One signed entry as stored.  ``details`` is a fresh copy; changing it changes nothing stored."""

    seq: int
    timestamp: str
    writer: str
    action: AuditAction
    subject: str
    details: dict[str, Any]
    prev_hash: str
    entry_hash: str
    signature: str


@dataclass(frozen=True)
class AuditHead:
    """The newest entry's position; publish it elsewhere to make truncation detectable."""

    seq: int
    entry_hash: str


@dataclass(frozen=True)
class VerifyReport:
    ok: bool
    entries_checked: int
    first_bad_seq: int | None = None
    reason: str | None = None
    head: AuditHead | None = None
    writers: tuple[str, ...] = field(default_factory=tuple)

    def raise_if_bad(self) -> "VerifyReport":
        if not self.ok:
            raise SecurityError(f"audit log verification failed at entry #{self.first_bad_seq}: {self.reason}")
        return self


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def _genesis(log_id: str) -> str:
    return hashlib.sha256(f"{FORMAT}:{log_id}".encode()).hexdigest()


def _entry_bytes(log_id: str, seq: int, ts: str, writer: str, action: str, subject: str,
                 details: Mapping[str, Any], prev_hash: str) -> bytes:
    return _canonical({"format": FORMAT, "log": log_id, "seq": seq, "ts": ts, "writer": writer,
                       "action": action, "subject": subject, "details": details, "prev": prev_hash})


def _head_bytes(log_id: str, seq: int, entry_hash: str) -> bytes:
    return _HEAD_DOMAIN + _canonical({"log": log_id, "seq": seq, "hash": entry_hash})


def _check_details(details: Mapping[str, Any]) -> str:
    if not isinstance(details, Mapping) or not all(isinstance(k, str) for k in details):
        raise ConfigError("audit details must be a mapping with string keys")
    try:
        text = _canonical(dict(details)).decode()
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"audit details must be JSON (str, int, finite float, bool, None, list, dict): {exc}") from None
    if len(text.encode()) > MAX_DETAILS_BYTES:
        raise ConfigError(f"audit details are {len(text.encode())} bytes; the limit is {MAX_DETAILS_BYTES}")
    return text


def database_url(target: str | os.PathLike[str]) -> str:
    """A path becomes ``sqlite:///path``; ``postgresql://`` gets the installed psycopg 3 driver."""
    text = os.fspath(target)
    if text.startswith("postgresql://") or text.startswith("postgres://"):
        return "postgresql+psycopg://" + text.split("://", 1)[1]
    if "://" in text:
        if not (text.startswith("sqlite:") or text.startswith("postgresql+")):
            raise ConfigError(f"audit log {text!r}: use a file path, sqlite:///path or postgresql://...")
        return text
    return f"sqlite:///{Path(text).expanduser().resolve()}"


def _redact(url: str) -> str:
    return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)


class AuditLog:
    """An audit log opened by one writer.  Use ``AuditLog.open`` (read-write) or ``AuditLog.read``."""

    def __init__(self, engine: sa.Engine, *, log_id: str, tables: "_Tables",
                 signer: Ed25519PrivateKey | None, writer: str | None, url: str) -> None:
        self._engine = engine
        self._log_id = log_id
        self._t = tables
        self._signer = signer
        self._writer = writer
        self._url = url

    # -- opening ---------------------------------------------------------------------------
    @classmethod
    def open(cls, url_or_path: str | os.PathLike[str],
             signer: Ed25519PrivateKey | str | os.PathLike[str], writer: str, *,
             table_prefix: str = "audit") -> "AuditLog":
        """Open (creating if needed) a log to append to as ``writer``, signing with ``signer``.

        ``signer`` is an Ed25519 private key or the path of its PEM file (mode 0600).
        """
        check_writer_name(writer)
        if isinstance(signer, (str, os.PathLike)):
            signer = load_private_key(signer)
        if not isinstance(signer, Ed25519PrivateKey):
            raise ConfigError(f"signer must be an Ed25519 private key or key file, got {type(signer).__name__}")
        url = database_url(url_or_path)
        if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
            Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        engine = _make_engine(url)
        tables = _Tables(table_prefix)
        log_id = tables.create(engine)
        return cls(engine, log_id=log_id, tables=tables, signer=signer, writer=writer, url=url)

    @classmethod
    def read(cls, url_or_path: str | os.PathLike[str], *, table_prefix: str = "audit") -> "AuditLog":
        """Open an existing log for verification and listing only; never creates anything."""
        url = database_url(url_or_path)
        if url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).is_file():
            raise ConfigError(f"audit log {url_or_path} does not exist")
        engine = _make_engine(url)
        tables = _Tables(table_prefix)
        log_id = tables.existing_log_id(engine)
        if log_id is None:
            engine.dispose()
            raise ConfigError(f"{_redact(url)} holds no insitu audit log (tables {table_prefix}_*)")
        return cls(engine, log_id=log_id, tables=tables, signer=None, writer=None, url=url)

    def close(self) -> None:
        self._engine.dispose()

    def __enter__(self) -> "AuditLog":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def log_id(self) -> str:
        return self._log_id

    @property
    def writer(self) -> str | None:
        return self._writer

    def __repr__(self) -> str:
        return f"AuditLog({_redact(self._url)!r}, writer={self._writer!r})"

    # -- writing ---------------------------------------------------------------------------
    def append(self, action: AuditAction | str, subject: str, details: Mapping[str, Any] | None = None) -> AuditEntry:
        """Append one entry in its own transaction (durable when this returns)."""
        return self.append_many([(action, subject, details or {})])[0]

    def append_many(self, items: Iterable[tuple[AuditAction | str, str, Mapping[str, Any]]]) -> list[AuditEntry]:
        """Append several entries in one transaction: all or none are written."""
        if self._signer is None or self._writer is None:
            raise SecurityError("this audit log was opened read-only (AuditLog.read); use AuditLog.open with a signing key")
        prepared = []
        for action, subject, details in items:
            if not isinstance(subject, str):
                raise ConfigError(f"audit subject must be a string, got {type(subject).__name__}")
            prepared.append((AuditAction.parse(action), subject, _check_details(details)))
        if not prepared:
            return []
        t = self._t
        out: list[AuditEntry] = []
        with self._engine.connect().execution_options(insitu_write=True) as conn, conn.begin():
            t.lock(conn)
            head = conn.execute(sa.select(t.head.c.seq, t.head.c.entry_hash)
                                .where(t.head.c.id == 1)).one_or_none()
            last = conn.execute(sa.select(t.entries.c.seq, t.entries.c.entry_hash)
                                .order_by(t.entries.c.seq.desc()).limit(1)).one_or_none()
            seq, prev = (0, _genesis(self._log_id)) if head is None else (head.seq, head.entry_hash)
            last_pair = (0, _genesis(self._log_id)) if last is None else (last.seq, last.entry_hash)
            if (seq, prev) != last_pair:
                raise SecurityError(
                    f"audit log head (#{seq}) does not match its newest entry (#{last_pair[0]}): the log was "
                    "altered; run `insitu audit verify` before appending"
                )
            rows = []
            for action, subject, details_text in prepared:
                seq += 1
                ts = datetime.now(timezone.utc).isoformat(timespec="microseconds")
                details = json.loads(details_text)
                body = _entry_bytes(self._log_id, seq, ts, self._writer, action.value, subject, details, prev)
                entry_hash = hashlib.sha256(body).hexdigest()
                signature = self._signer.sign(_ENTRY_DOMAIN + body).hex()
                rows.append({"seq": seq, "ts": ts, "writer": self._writer, "action": action.value,
                             "subject": subject, "details": details_text, "prev_hash": prev,
                             "entry_hash": entry_hash, "signature": signature})
                out.append(AuditEntry(seq, ts, self._writer, action, subject, details, prev, entry_hash, signature))
                prev = entry_hash
            conn.execute(t.entries.insert(), rows)
            head_row = {"seq": seq, "entry_hash": prev, "writer": self._writer,
                        "signature": self._signer.sign(_head_bytes(self._log_id, seq, prev)).hex()}
            if head is None:
                conn.execute(t.head.insert().values(id=1, **head_row))
            else:
                conn.execute(t.head.update().where(t.head.c.id == 1).values(**head_row))
        return out

    # -- reading ---------------------------------------------------------------------------
    def head(self) -> AuditHead:
        with self._engine.connect() as conn:
            row = conn.execute(sa.select(self._t.head.c.seq, self._t.head.c.entry_hash)).one_or_none()
        return AuditHead(0, _genesis(self._log_id)) if row is None else AuditHead(row.seq, row.entry_hash)

    def entries(self, *, start: int = 1, limit: int | None = None,
                action: AuditAction | str | None = None) -> Iterator[AuditEntry]:
        """Entries in sequence order, as stored (not verified: use ``verify`` for that)."""
        t = self._t.entries
        query = sa.select(t).where(t.c.seq >= start).order_by(t.c.seq)
        if action is not None:
            query = query.where(t.c.action == AuditAction.parse(action).value)
        if limit is not None:
            query = query.limit(limit)
        with self._engine.connect() as conn:
            for row in conn.execution_options(yield_per=5000).execute(query):
                yield AuditEntry(row.seq, row.ts, row.writer, _action_or_raw(row.action), row.subject,
                                 json.loads(row.details), row.prev_hash, row.entry_hash, row.signature)

    def verify(self, public_keys: Mapping[str, Ed25519PublicKey], *,
               expect_head: AuditHead | None = None) -> VerifyReport:
        """Walk the whole chain; the report names the first bad entry and why.

        ``expect_head`` is a head published earlier outside the site; the log must still contain
        that exact entry, which makes truncation and wholesale replacement detectable.
        """
        t = self._t.entries
        expected_seq, prev = 1, _genesis(self._log_id)
        seen_writers: set[str] = set()
        checked = 0
        last: AuditHead = AuditHead(0, prev)

        def bad(seq: int | None, reason: str) -> VerifyReport:
            return VerifyReport(False, checked, seq, reason, last, tuple(sorted(seen_writers)))

        with self._engine.connect() as conn:
            rows = conn.execution_options(yield_per=5000).execute(sa.select(t).order_by(t.c.seq))
            for row in rows:
                if row.seq != expected_seq:
                    kind = "deleted" if row.seq > expected_seq else "duplicated or inserted"
                    return bad(expected_seq, f"sequence broken: expected entry #{expected_seq}, found #{row.seq} "
                                             f"(entries {kind})")
                if row.prev_hash != prev:
                    return bad(row.seq, f"does not link to entry #{row.seq - 1}: its previous-hash differs "
                                        "(an entry was deleted, inserted or reordered here)")
                try:
                    details = json.loads(row.details)
                    body = _entry_bytes(self._log_id, row.seq, row.ts, row.writer, row.action, row.subject,
                                        details, row.prev_hash)
                except (TypeError, ValueError) as exc:
                    return bad(row.seq, f"unreadable entry ({exc}): edited")
                if hashlib.sha256(body).hexdigest() != row.entry_hash:
                    return bad(row.seq, "content does not match its hash: the entry was edited")
                key = public_keys.get(row.writer)
                if key is None:
                    return bad(row.seq, f"writer {row.writer!r} has no public key in the given key set")
                try:
                    key.verify(bytes.fromhex(row.signature), _ENTRY_DOMAIN + body)
                except (InvalidSignature, ValueError):
                    return bad(row.seq, f"signature is not {row.writer!r}'s: the entry was re-signed or forged "
                                        "with another key")
                seen_writers.add(row.writer)
                checked += 1
                prev = row.entry_hash
                last = AuditHead(row.seq, row.entry_hash)
                expected_seq += 1
            head = conn.execute(sa.select(self._t.head)).one_or_none()
        if head is None:
            if checked:
                return bad(last.seq, "the signed head record is missing: the log was altered")
        else:
            if (head.seq, head.entry_hash) != (last.seq, last.entry_hash):
                return bad(min(head.seq, last.seq) + 1 if head.seq > last.seq else last.seq,
                           f"signed head names entry #{head.seq} but the log ends at #{last.seq}: "
                           + ("entries were deleted from the end" if head.seq > last.seq else
                              "entries were appended without the writer's key"))
            key = public_keys.get(head.writer)
            try:
                if key is None:
                    raise InvalidSignature
                key.verify(bytes.fromhex(head.signature), _head_bytes(self._log_id, head.seq, head.entry_hash))
            except (InvalidSignature, ValueError):
                return bad(head.seq, f"head signature is not {head.writer!r}'s: the head record was forged")
        if expect_head is not None and expect_head.seq > 0:
            with self._engine.connect() as conn:
                h = conn.execute(sa.select(t.c.entry_hash).where(t.c.seq == expect_head.seq)).scalar_one_or_none()
            if h != expect_head.entry_hash:
                return bad(expect_head.seq, f"published checkpoint #{expect_head.seq} "
                                            f"({expect_head.entry_hash[:12]}…) is not in this log: truncated or replaced")
        return VerifyReport(True, checked, None, None, last, tuple(sorted(seen_writers)))


def _action_or_raw(value: str) -> AuditAction | str:
    try:
        return AuditAction(value)
    except ValueError:
        return value


class _Tables:
    def __init__(self, prefix: str) -> None:
        if not _PREFIX_RE.match(prefix):
            raise ConfigError(f"table prefix {prefix!r}: use lower-case letters, digits and _ (max 31)")
        self.prefix = prefix
        self.meta = sa.MetaData()
        self.info = sa.Table(f"{prefix}_meta", self.meta,
                             sa.Column("key", sa.String(64), primary_key=True),
                             sa.Column("value", sa.Text, nullable=False))
        self.entries = sa.Table(f"{prefix}_entries", self.meta,
                                sa.Column("seq", sa.BigInteger().with_variant(sa.Integer, "sqlite"),
                                          primary_key=True, autoincrement=False),
                                sa.Column("ts", sa.String(40), nullable=False),
                                sa.Column("writer", sa.String(64), nullable=False),
                                sa.Column("action", sa.String(64), nullable=False),
                                sa.Column("subject", sa.Text, nullable=False),
                                sa.Column("details", sa.Text, nullable=False),
                                sa.Column("prev_hash", sa.String(64), nullable=False),
                                sa.Column("entry_hash", sa.String(64), nullable=False),
                                sa.Column("signature", sa.String(128), nullable=False))
        self.head = sa.Table(f"{prefix}_head", self.meta,
                             sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
                             sa.Column("seq", sa.BigInteger, nullable=False),
                             sa.Column("entry_hash", sa.String(64), nullable=False),
                             sa.Column("writer", sa.String(64), nullable=False),
                             sa.Column("signature", sa.String(128), nullable=False))

    def lock(self, conn: sa.Connection) -> None:
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql(f'LOCK TABLE "{self.prefix}_head" IN SHARE ROW EXCLUSIVE MODE')
        # SQLite: the transaction began with BEGIN IMMEDIATE (see _make_engine)

    def existing_log_id(self, engine: sa.Engine) -> str | None:
        if not sa.inspect(engine).has_table(self.info.name):
            return None
        with engine.connect() as conn:
            return conn.execute(sa.select(self.info.c.value).where(self.info.c.key == "log_id")).scalar_one_or_none()

    def create(self, engine: sa.Engine) -> str:
        existing = self.existing_log_id(engine)
        if existing is not None:
            return existing
        with engine.connect().execution_options(insitu_write=True) as conn, conn.begin():
            if conn.dialect.name == "postgresql":
                # serialize concurrent first opens of the same database
                conn.exec_driver_sql("SELECT pg_advisory_xact_lock(hashtext(%(n)s))", {"n": f"insitu:{self.prefix}"})
            self.meta.create_all(conn)
            log_id = conn.execute(sa.select(self.info.c.value).where(self.info.c.key == "log_id")).scalar_one_or_none()
            if log_id is None:
                log_id = secrets.token_hex(16)
                conn.execute(self.info.insert(), [{"key": "log_id", "value": log_id},
                                                  {"key": "format", "value": FORMAT}])
            self._append_only_triggers(conn)
        return log_id

    def _append_only_triggers(self, conn: sa.Connection) -> None:
        e = f"{self.prefix}_entries"
        if conn.dialect.name == "sqlite":
            for op in ("UPDATE", "DELETE"):
                conn.exec_driver_sql(
                    f'CREATE TRIGGER IF NOT EXISTS "{e}_no_{op.lower()}" BEFORE {op} ON "{e}" '
                    f"BEGIN SELECT RAISE(ABORT, 'insitu audit log is append-only'); END")
        elif conn.dialect.name == "postgresql":
            conn.exec_driver_sql(
                f'CREATE OR REPLACE FUNCTION "{e}_append_only"() RETURNS trigger LANGUAGE plpgsql AS '
                "$$ BEGIN RAISE EXCEPTION 'insitu audit log is append-only'; END $$")
            conn.exec_driver_sql(
                f'CREATE OR REPLACE TRIGGER "{e}_no_change" BEFORE UPDATE OR DELETE ON "{e}" '
                f'FOR EACH ROW EXECUTE FUNCTION "{e}_append_only"()')
            conn.exec_driver_sql(
                f'CREATE OR REPLACE TRIGGER "{e}_no_truncate" BEFORE TRUNCATE ON "{e}" '
                f'FOR EACH STATEMENT EXECUTE FUNCTION "{e}_append_only"()')


def _make_engine(url: str) -> sa.Engine:
    if url.startswith("sqlite"):
        engine = sa.create_engine(url, connect_args={"timeout": 60})

        @sa.event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.close()

        @sa.event.listens_for(engine, "begin")
        def _on_begin(conn: sa.Connection) -> None:
            # writers take the reserved lock up front, so two appends cannot read the same head;
            # readers use a deferred transaction and never block writers (WAL)
            write = conn.get_execution_options().get("insitu_write", False)
            conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

        return engine
    if url.startswith("postgresql"):
        return sa.create_engine(url, pool_pre_ping=True)
    raise ConfigError(f"unsupported audit log URL {_redact(url)!r}")
