"""Append-only, tamper-evident audit log: a SHA-256 hash chain of Ed25519-signed entries.

Why both a chain and signatures: the chain (each entry holds the SHA-256 of the previous one)
makes deletion, insertion and reordering visible; the signature of the entry's writer makes a
rewritten entry visible even when the attacker recomputes every hash after it, because they
cannot sign as the writer.  Either alone is not enough: a chain without signatures can be rebuilt
wholesale by anyone with write access to the database, and signatures without a chain do not show
that an entry was removed.

The genesis record, written and signed by the log's creator (its *owner*) in the same
transaction that creates the tables, is the signed manifest of the log: its id, its owner and the
writer set, each writer's Ed25519 public key pinned by value.  The chain starts from the
genesis's hash, and a signed head record at #0 exists from the start, so a log emptied of its
entries (or of entries and head) no longer verifies.  ``verify`` trusts only pinned keys: the
verifier must hold the owner's key (which must equal the pinned one), an entry by a writer the
manifest does not pin fails even when a ``.pub`` for it sits in the keys folder, and a key in the
folder that differs from the pinned one fails.  The owner adds writers with :meth:`AuditLog.add_writer`,
itself a signed entry (``audit.writers``) that only the owner may write.

Details are canonical JSON (sorted keys, no whitespace, no NaN, at most 32 levels), checked when
written and again when verified: a stored entry whose text is not the canonical form of what was
signed (for instance a key given twice, of which SQLite's JSON functions read one value and
Python's ``json`` the other) fails verification.

What it does not protect against, stated plainly:

* Truncation of the newest entries together with the signed head record, by someone holding an
  older copy of the head (a backup).  A signed ``audit_head`` row (the last seq and hash, signed by
  the writer of the last entry) catches simple truncation; to catch the rest, publish ``head()``
  somewhere the site cannot rewrite (the coordinator's round record, a ticket) and pass it back to
  ``verify(expect_head=...)``.
* A writer whose private key is stolen: such entries verify.  Rotate the key and record it.
  A stolen owner key can also add writers.
* Wholesale replacement of the database *and* of the owner's public key the verifier holds: the
  verifier's copy of the owner key is the root of trust; keep it, with a published head, outside
  the site.

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
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import StrEnum
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from cryptography.hazmat.primitives import serialization

from insitu import strictjson
from insitu.audit.keys import check_writer_name, fingerprint, load_private_key
from insitu.errors import ConfigError, SecurityError

FORMAT = "insitu-audit-v2"
_ENTRY_DOMAIN = b"insitu-audit-entry-v2\x00"
_HEAD_DOMAIN = b"insitu-audit-head-v2\x00"
_GENESIS_DOMAIN = b"insitu-audit-genesis-v2\x00"
MAX_DETAILS_BYTES = 64 * 1024
#: details nest at most this deep; far above what any component writes
DETAILS_LIMITS = strictjson.JSONLimits(max_depth=32, max_items=20_000)
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
    WRITERS = "audit.writers"                    # the owner changed the pinned writer set (add_writer only)

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
    """The outcome of :meth:`AuditLog.verify`: the first bad entry and why, or how much verified.

    ``pinned`` are the writers the log's signed manifest names; ``ignored_keys`` are keys the
    verifier offered that the manifest does not pin (never used to check anything)."""

    ok: bool
    entries_checked: int
    first_bad_seq: int | None = None
    reason: str | None = None
    head: AuditHead | None = None
    writers: tuple[str, ...] = field(default_factory=tuple)
    owner: str | None = None
    pinned: tuple[str, ...] = field(default_factory=tuple)
    ignored_keys: tuple[str, ...] = field(default_factory=tuple)

    def raise_if_bad(self) -> "VerifyReport":
        if not self.ok:
            raise SecurityError(f"audit log verification failed at entry #{self.first_bad_seq}: {self.reason}")
        return self


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def _parse_canonical(text: str, what: str) -> Any:
    """Strictly parse stored JSON and require it to be exactly the canonical form of its value."""
    value = strictjson.loads(text, limits=DETAILS_LIMITS, error=SecurityError, what=what)
    if _canonical(value).decode() != text:
        raise SecurityError(f"{what} is not in canonical form: it was not written by insitu")
    return value


def _raw_key(key: Ed25519PublicKey) -> str:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def _key_from_hex(text: Any, what: str) -> Ed25519PublicKey:
    try:
        raw = bytes.fromhex(text) if isinstance(text, str) else b""
        if len(raw) != 32:
            raise ValueError("not 32 bytes")
        return Ed25519PublicKey.from_public_bytes(raw)
    except ValueError as exc:
        raise SecurityError(f"{what} is not an Ed25519 public key ({exc})") from None


def _writer_set(value: Any, what: str) -> dict[str, Ed25519PublicKey]:
    if not isinstance(value, dict) or not value:
        raise SecurityError(f"{what} must name at least one writer")
    out = {}
    for name, key in value.items():
        try:
            check_writer_name(name)
        except ConfigError as exc:
            raise SecurityError(f"{what}: {exc}") from None
        out[name] = _key_from_hex(key, f"{what}: key of {name!r}")
    return out


def _same_key(a: Ed25519PublicKey, b: Ed25519PublicKey) -> bool:
    return _raw_key(a) == _raw_key(b)


@dataclass(frozen=True)
class Genesis:
    """The log's signed manifest: its id, owner and pinned writer keys.  Its hash starts the chain."""

    log_id: str
    created: str
    owner: str
    writers: dict[str, Ed25519PublicKey]
    text: str
    signature: str

    @property
    def hash(self) -> str:
        return hashlib.sha256(_GENESIS_DOMAIN + self.text.encode()).hexdigest()

    @staticmethod
    def make(log_id: str, owner: str, signer: Ed25519PrivateKey, writers: Mapping[str, Ed25519PublicKey]) -> "Genesis":
        pinned = {owner: signer.public_key(), **writers}
        if not _same_key(pinned[owner], signer.public_key()):
            raise ConfigError(f"writers[{owner!r}] differs from the owner's own signing key")
        created = datetime.now(timezone.utc).isoformat(timespec="microseconds")
        body = {"format": FORMAT, "log": log_id, "created": created, "owner": owner,
                "writers": {n: _raw_key(k) for n, k in sorted(pinned.items())}}
        text = _canonical(body).decode()
        return Genesis(log_id, created, owner, dict(pinned), text, signer.sign(_GENESIS_DOMAIN + text.encode()).hex())

    @staticmethod
    def parse(log_id: str, text: str, signature: str) -> "Genesis":
        """Parse a stored genesis (its signature is checked by :meth:`AuditLog.verify`, not here)."""
        body = _parse_canonical(text, "genesis record")
        if not isinstance(body, dict) or set(body) != {"format", "log", "created", "owner", "writers"}:
            raise SecurityError("genesis record does not have the fields format, log, created, owner, writers")
        if body["format"] != FORMAT:
            raise SecurityError(f"genesis record is of format {body['format']!r}, this build reads {FORMAT!r}")
        if body["log"] != log_id:
            raise SecurityError(f"genesis record belongs to log {body['log']!r}, not {log_id!r}")
        writers = _writer_set(body["writers"], "genesis record")
        if body["owner"] not in writers:
            raise SecurityError(f"genesis owner {body['owner']!r} is not among its writers")
        return Genesis(log_id, str(body["created"]), body["owner"], writers, text, signature)


def _entry_bytes(log_id: str, seq: int, ts: str, writer: str, action: str, subject: str,
                 details: Mapping[str, Any], prev_hash: str) -> bytes:
    return _canonical({"format": FORMAT, "log": log_id, "seq": seq, "ts": ts, "writer": writer,
                       "action": action, "subject": subject, "details": details, "prev": prev_hash})


def _head_bytes(log_id: str, seq: int, entry_hash: str) -> bytes:
    return _HEAD_DOMAIN + _canonical({"log": log_id, "seq": seq, "hash": entry_hash})


def _check_details(details: Mapping[str, Any]) -> str:
    """The canonical JSON text of ``details``, refused unless it parses back strictly to itself."""
    if not isinstance(details, Mapping) or not all(isinstance(k, str) for k in details):
        raise ConfigError("audit details must be a mapping with string keys")
    try:
        text = _canonical(dict(details)).decode()
    except (TypeError, ValueError, RecursionError) as exc:
        raise ConfigError(f"audit details must be JSON (str, int, finite float, bool, None, list, dict): {exc}") from None
    if len(text.encode()) > MAX_DETAILS_BYTES:
        raise ConfigError(f"audit details are {len(text.encode())} bytes; the limit is {MAX_DETAILS_BYTES}")
    try:
        _parse_canonical(text, "audit details")  # duplicate keys (from a mapping with equal str keys), depth
    except SecurityError as exc:
        raise ConfigError(str(exc)) from None
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
             table_prefix: str = "audit", writers: Mapping[str, Ed25519PublicKey] | None = None) -> "AuditLog":
        """Open (creating if needed) a log to append to as ``writer``, signing with ``signer``.

        ``signer`` is an Ed25519 private key or the path of its PEM file (mode 0600).  Creating
        the log makes ``writer`` its owner and pins ``writer`` plus ``writers`` (name -> public
        key) in the signed genesis.  Opening an existing log as a writer it does not pin, or with
        another key than the pinned one, is refused.
        """
        check_writer_name(writer)
        if isinstance(signer, (str, os.PathLike)):
            signer = load_private_key(signer)
        if not isinstance(signer, Ed25519PrivateKey):
            raise ConfigError(f"signer must be an Ed25519 private key or key file, got {type(signer).__name__}")
        for name in writers or {}:
            check_writer_name(name)
        url = database_url(url_or_path)
        if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
            Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        engine = _make_engine(url)
        tables = _Tables(table_prefix)
        log_id, created = tables.create(engine, lambda log_id: _start(log_id, writer, signer, writers or {}))
        log = cls(engine, log_id=log_id, tables=tables, signer=signer, writer=writer, url=url)
        if not created:
            try:
                log._check_may_write(writers or {})
            except Exception:
                engine.dispose()
                raise
        return log

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

    # -- the manifest ----------------------------------------------------------------------
    def genesis(self, conn: sa.Connection | None = None) -> Genesis:
        """The stored genesis record, parsed (not verified); SecurityError if it is missing or malformed."""
        if conn is None:
            with self._engine.connect() as c:
                return self.genesis(c)
        t = self._t.info
        rows = dict(conn.execute(sa.select(t.c.key, t.c.value).where(t.c.key.in_(("genesis", "genesis_signature")))).all())
        if "genesis" not in rows or "genesis_signature" not in rows:
            raise SecurityError("the log has no signed genesis record: it was emptied or replaced, or was written "
                                f"by an insitu older than {FORMAT}")
        return Genesis.parse(self._log_id, rows["genesis"], rows["genesis_signature"])

    def writers(self) -> dict[str, Ed25519PublicKey]:
        """The writer set pinned now (genesis plus the owner's ``audit.writers`` entries), as stored."""
        with self._engine.connect() as conn:
            return self._pinned(conn)

    def _pinned(self, conn: sa.Connection) -> dict[str, Ed25519PublicKey]:
        pinned = dict(self.genesis(conn).writers)
        t = self._t.entries
        last = conn.execute(sa.select(t.c.details).where(t.c.action == AuditAction.WRITERS.value)
                            .order_by(t.c.seq.desc()).limit(1)).scalar_one_or_none()
        if last is not None:
            pinned = _writer_set(_parse_canonical(last, "writer-set entry").get("writers"), "writer-set entry")
        return pinned

    def _check_may_write(self, extra: Mapping[str, Ed25519PublicKey], conn: sa.Connection | None = None) -> None:
        if conn is None:
            with self._engine.connect() as c:
                return self._check_may_write(extra, c)
        assert self._signer is not None and self._writer is not None
        pinned = self._pinned(conn)
        mine = pinned.get(self._writer)
        if mine is None:
            owner = self.genesis(conn).owner
            raise SecurityError(
                f"writer {self._writer!r} is not pinned in this audit log's signed manifest (pinned: {sorted(pinned)}); "
                f"the owner {owner!r} adds it: `insitu audit add-writer --writer {self._writer} ...`")
        if not _same_key(mine, self._signer.public_key()):
            raise SecurityError(
                f"writer {self._writer!r} signs with key {fingerprint(self._signer.public_key())}, but the log pins "
                f"{fingerprint(mine)}: wrong key file, or a rotated key the owner has not pinned")
        unknown = sorted(n for n, k in extra.items() if n not in pinned or not _same_key(pinned[n], k))
        if unknown:
            raise ConfigError(f"the log exists; writers {unknown} are pinned only by its owner with add_writer")

    def add_writer(self, name: str, public_key: Ed25519PublicKey) -> AuditEntry:
        """Pin ``name`` -> ``public_key`` (owner only); the new set is a signed ``audit.writers`` entry."""
        check_writer_name(name)
        if not isinstance(public_key, Ed25519PublicKey):
            raise ConfigError(f"public_key must be an Ed25519 public key, got {type(public_key).__name__}")
        owner = self.genesis().owner
        if self._writer != owner:
            raise SecurityError(f"only the log's owner {owner!r} may change its writers (this is {self._writer!r})")
        pinned = self.writers()
        if name in pinned and not _same_key(pinned[name], public_key):
            raise ConfigError(f"writer {name!r} is already pinned with another key; pin a rotated key under a new name")
        pinned[name] = public_key
        details = {"writers": {n: _raw_key(k) for n, k in sorted(pinned.items())}, "added": name,
                   "fingerprint": fingerprint(public_key)}
        return self._append([(AuditAction.WRITERS, name, _check_details(details))])[0]

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
            parsed = AuditAction.parse(action)
            if parsed is AuditAction.WRITERS:
                raise ConfigError("audit.writers entries are written by AuditLog.add_writer only")
            prepared.append((parsed, subject, _check_details(details)))
        return self._append(prepared)

    def _append(self, prepared: list[tuple[AuditAction, str, str]]) -> list[AuditEntry]:
        assert self._signer is not None and self._writer is not None
        if not prepared:
            return []
        t = self._t
        out: list[AuditEntry] = []
        with self._engine.connect().execution_options(insitu_write=True) as conn, conn.begin():
            t.lock(conn)
            genesis = self.genesis(conn)
            self._check_may_write({}, conn)
            head = conn.execute(sa.select(t.head.c.seq, t.head.c.entry_hash)
                                .where(t.head.c.id == 1)).one_or_none()
            if head is None:
                raise SecurityError("the audit log has no signed head record: it was emptied or altered; "
                                    "run `insitu audit verify` before appending")
            last = conn.execute(sa.select(t.entries.c.seq, t.entries.c.entry_hash)
                                .order_by(t.entries.c.seq.desc()).limit(1)).one_or_none()
            seq, prev = head.seq, head.entry_hash
            last_pair = (0, genesis.hash) if last is None else (last.seq, last.entry_hash)
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
            conn.execute(t.head.update().where(t.head.c.id == 1).values(
                seq=seq, entry_hash=prev, writer=self._writer,
                signature=self._signer.sign(_head_bytes(self._log_id, seq, prev)).hex()))
        return out

    # -- reading ---------------------------------------------------------------------------
    def head(self) -> AuditHead:
        with self._engine.connect() as conn:
            row = conn.execute(sa.select(self._t.head.c.seq, self._t.head.c.entry_hash)).one_or_none()
        if row is None:
            raise SecurityError("the audit log has no signed head record: it was emptied or altered")
        return AuditHead(row.seq, row.entry_hash)

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
        """Walk the genesis, the whole chain and the head; the report names the first bad entry and why.

        ``public_keys`` must hold the owner's key (the root of trust: it must equal the key the
        genesis pins); every other writer's key comes from the signed manifest, and a key given
        here for a pinned writer must equal the pinned one.  Keys of writers the manifest does not
        pin are ignored (listed in ``ignored_keys``).  ``expect_head`` is a head published earlier
        outside the site; the log must still contain that exact entry, which makes truncation and
        wholesale replacement detectable.
        """
        t = self._t.entries
        seen_writers: set[str] = set()
        checked = 0
        owner: str | None = None
        pinned: dict[str, Ed25519PublicKey] = {}
        last = AuditHead(0, "")

        def bad(seq: int | None, reason: str) -> VerifyReport:
            return VerifyReport(False, checked, seq, reason, last, tuple(sorted(seen_writers)), owner,
                                tuple(sorted(pinned)), tuple(sorted(set(public_keys) - set(pinned))))

        with self._engine.connect() as conn:
            try:
                genesis = self.genesis(conn)
            except SecurityError as exc:
                return bad(0, str(exc))
            owner, pinned = genesis.owner, dict(genesis.writers)
            held = public_keys.get(owner)
            if held is None:
                return bad(0, f"the verifier holds no key for the log's owner {owner!r}; without it the signed "
                              "manifest cannot be trusted (give the owner's .pub)")
            if not _same_key(held, genesis.writers[owner]):
                return bad(0, f"the genesis pins owner {owner!r} with key {fingerprint(genesis.writers[owner])}, "
                              f"but the verifier's key for {owner!r} is {fingerprint(held)}: the log or the key was replaced")
            try:
                held.verify(bytes.fromhex(genesis.signature), _GENESIS_DOMAIN + genesis.text.encode())
            except (InvalidSignature, ValueError):
                return bad(0, f"genesis signature is not the owner {owner!r}'s: the manifest was forged")
            for name, key in public_keys.items():
                if name in pinned and not _same_key(key, pinned[name]):
                    return bad(0, f"the verifier's key for {name!r} ({fingerprint(key)}) is not the one the signed "
                                  f"manifest pins ({fingerprint(pinned[name])}): a key file was replaced")
            expected_seq, prev = 1, genesis.hash
            last = AuditHead(0, prev)
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
                    details = _parse_canonical(row.details, "details")
                    body = _entry_bytes(self._log_id, row.seq, row.ts, row.writer, row.action, row.subject,
                                        details, row.prev_hash)
                except (TypeError, ValueError, SecurityError) as exc:
                    return bad(row.seq, f"unreadable entry ({exc}): edited")
                if hashlib.sha256(body).hexdigest() != row.entry_hash:
                    return bad(row.seq, "content does not match its hash: the entry was edited")
                key = pinned.get(row.writer)
                if key is None:
                    why = (f"; a key for it in the key set is not enough" if row.writer in public_keys else "")
                    return bad(row.seq, f"writer {row.writer!r} is not pinned in the log's signed manifest "
                                        f"(pinned: {sorted(pinned)}){why}")
                try:
                    key.verify(bytes.fromhex(row.signature), _ENTRY_DOMAIN + body)
                except (InvalidSignature, ValueError):
                    return bad(row.seq, f"signature is not {row.writer!r}'s: the entry was re-signed or forged "
                                        "with another key")
                if row.action == AuditAction.WRITERS.value:
                    if row.writer != owner:
                        return bad(row.seq, f"writer set changed by {row.writer!r}, not by the owner {owner!r}")
                    try:
                        pinned = _writer_set(details.get("writers") if isinstance(details, dict) else None,
                                             f"writer-set entry #{row.seq}")
                    except SecurityError as exc:
                        return bad(row.seq, str(exc))
                    if owner not in pinned or not _same_key(pinned[owner], genesis.writers[owner]):
                        return bad(row.seq, "a writer-set entry may not drop or replace the owner")
                    clash = [n for n, k in public_keys.items() if n in pinned and not _same_key(k, pinned[n])]
                    if clash:
                        return bad(row.seq, f"the verifier's key for {clash[0]!r} is not the one entry #{row.seq} pins")
                seen_writers.add(row.writer)
                checked += 1
                prev = row.entry_hash
                last = AuditHead(row.seq, row.entry_hash)
                expected_seq += 1
            head = conn.execute(sa.select(self._t.head)).one_or_none()
        if head is None:
            return bad(last.seq, "the signed head record is missing: the log was emptied or altered")
        if (head.seq, head.entry_hash) != (last.seq, last.entry_hash):
            return bad(min(head.seq, last.seq) + 1 if head.seq > last.seq else last.seq,
                       f"signed head names entry #{head.seq} but the log ends at #{last.seq}: "
                       + ("entries were deleted from the end" if head.seq > last.seq else
                          "entries were appended without the writer's key"))
        key = pinned.get(head.writer)
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
        return VerifyReport(True, checked, None, None, last, tuple(sorted(seen_writers)), owner,
                            tuple(sorted(pinned)), tuple(sorted(set(public_keys) - set(pinned))))


def _start(log_id: str, owner: str, signer: Ed25519PrivateKey,
           writers: Mapping[str, Ed25519PublicKey]) -> tuple[Genesis, str]:
    """A new log's signed genesis and its signed head #0 (which names the genesis)."""
    genesis = Genesis.make(log_id, owner, signer, writers)
    return genesis, signer.sign(_head_bytes(log_id, 0, genesis.hash)).hex()


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

    def create(self, engine: sa.Engine, start: "Callable[[str], tuple[Genesis, str]]") -> tuple[str, bool]:
        """The log id, and whether this call created the log (tables, genesis and head #0 in one transaction)."""
        existing = self.existing_log_id(engine)
        if existing is not None:
            return existing, False
        with engine.connect().execution_options(insitu_write=True) as conn, conn.begin():
            if conn.dialect.name == "postgresql":
                # serialize concurrent first opens of the same database
                conn.exec_driver_sql("SELECT pg_advisory_xact_lock(hashtext(%(n)s))", {"n": f"insitu:{self.prefix}"})
            self.meta.create_all(conn)
            log_id = conn.execute(sa.select(self.info.c.value).where(self.info.c.key == "log_id")).scalar_one_or_none()
            created = log_id is None
            if created:
                log_id = secrets.token_hex(16)
                genesis, head_signature = start(log_id)
                conn.execute(self.info.insert(), [{"key": "log_id", "value": log_id},
                                                  {"key": "format", "value": FORMAT},
                                                  {"key": "genesis", "value": genesis.text},
                                                  {"key": "genesis_signature", "value": genesis.signature}])
                conn.execute(self.head.insert().values(id=1, seq=0, entry_hash=genesis.hash, writer=genesis.owner,
                                                       signature=head_signature))
            self._append_only_triggers(conn)
        return log_id, created

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
