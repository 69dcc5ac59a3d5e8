"""Field-level encryption at rest for sensitive columns: AES-256-GCM with key ids and rotation.

Each value becomes a token ``gcm2.<key id>.<base64url(nonce ‖ ciphertext ‖ tag)>``.  The
associated data binds the token to its column, to its row's pseudonym and to the key id, so a
token copied into another column or another patient's row fails to decrypt, exactly like a
tampered one — a database administrator cannot move a diagnosis between patients unnoticed.
(Two rows of the *same* patient share a pseudonym; a swap between them is not detected.)

**Every token of a column has the same length.**  AES-GCM hides a value's bytes but not how many
there are, and diagnosis codes differ in length ("I10", "E11.9", "J45.909"): unpadded, token
length alone predicted the diagnosis 67 % of the time where guessing the commonest gets 22 %.
So the plaintext is ``type (1 byte) ‖ length (2 bytes) ‖ value ‖ zeros`` padded to the column's
declared ``max_bytes`` (policy ``[sensitive.<column>] max_bytes``, default 64): the length prefix
sits inside the ciphertext, so decryption is exact, and a value longer than the declared maximum
is refused naming the column and the limit (never the value) before anything is encrypted.

Wrong key, unknown key id, edited token, moved token: one ``SecurityError`` naming the column
and the row pseudonym, never the plaintext.

The keyring is a JSON file (mode 0600) of 256-bit keys by id plus the active id.  Rotation adds a
key, makes it active and re-encrypts tokens to it; old keys stay until ``retire`` removes them
once no token uses them.  Tokens of the earlier, unpadded format (``gcm1``) still decrypt, and
rotation turns them into padded ones.
"""
from __future__ import annotations

import base64
import json
import os
import re
import secrets
import stat
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from insitu.errors import ConfigError, DataError, SecurityError

TOKEN_PREFIX = "gcm2"  # padded to the column's max_bytes
LEGACY_PREFIX = "gcm1"  # unpadded (before padding existed): decrypted and rotated, never written
DEFAULT_MAX_BYTES = 64
MAX_BYTES_LIMIT = 65535  # the length prefix is two bytes
_KEYRING_FORMAT = "insitu-field-keyring-v1"
_KEY_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
_NONCE = 12
_TAG = 16
_HEADER = 3  # type byte + two length bytes


def _aad(column: str, row_id: str, key_id: str, prefix: str = TOKEN_PREFIX) -> bytes:
    label = b"insitu-field-v2" if prefix == TOKEN_PREFIX else b"insitu-field-v1"
    return b"\x00".join([label, column.encode(), str(row_id).encode(), key_id.encode()])


@dataclass(frozen=True)
class FieldKeyring:
    keys: Mapping[str, bytes]
    active: str

    def __post_init__(self) -> None:
        if self.active not in self.keys:
            raise ConfigError(f"keyring's active key id {self.active!r} is not among its keys {sorted(self.keys)}")
        for kid, key in self.keys.items():
            if not _KEY_ID_RE.match(kid):
                raise ConfigError(f"key id {kid!r}: use 1-32 characters from A-Z a-z 0-9 _ -")
            if len(key) != 32:
                raise SecurityError(f"key {kid!r} has {len(key)} bytes; AES-256-GCM needs 32")

    @classmethod
    def generate(cls, key_id: str = "k1") -> "FieldKeyring":
        return cls({key_id: AESGCM.generate_key(bit_length=256)}, key_id)

    def rotated(self, new_key_id: str) -> "FieldKeyring":
        """A keyring with a fresh active key ``new_key_id``; the old keys stay for decryption."""
        if new_key_id in self.keys:
            raise ConfigError(f"key id {new_key_id!r} already exists in the keyring; pick a new one")
        return FieldKeyring({**self.keys, new_key_id: AESGCM.generate_key(bit_length=256)}, new_key_id)

    def retire(self, key_id: str) -> "FieldKeyring":
        if key_id == self.active:
            raise ConfigError(f"cannot retire the active key {key_id!r}; rotate first")
        if key_id not in self.keys:
            raise ConfigError(f"no key {key_id!r} in the keyring")
        return FieldKeyring({k: v for k, v in self.keys.items() if k != key_id}, self.active)

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        path = Path(path)
        if path.exists() and not overwrite:
            raise ConfigError(f"{path} already exists; refusing to overwrite a keyring")
        doc = {"format": _KEYRING_FORMAT, "active": self.active,
               "keys": {k: base64.b64encode(v).decode() for k, v in self.keys.items()}}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, json.dumps(doc, indent=2).encode())
        finally:
            os.close(fd)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "FieldKeyring":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"keyring {path} not found; create one with `insitu deid keygen --keyring {path}`")
        if os.name == "posix" and path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise SecurityError(f"keyring {path} is readable by group/others; run `chmod 600 {path}`")
        try:
            doc = json.loads(path.read_text())
            if doc.get("format") != _KEYRING_FORMAT:
                raise ValueError(f"format is {doc.get('format')!r}")
            keys = {k: base64.b64decode(v, validate=True) for k, v in doc["keys"].items()}
            return cls(keys, doc["active"])
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise SecurityError(f"keyring {path} is not a valid {_KEYRING_FORMAT} file: {exc}") from None


# -- plaintext encoding: type ‖ length ‖ value ‖ zero padding -----------------------------------
_NULL, _TEXT, _JSON = b"n", b"s", b"j"


def _normalize(value: Any) -> Any:
    if isinstance(value, str):
        return value
    if value is None or (not isinstance(value, (str, bytes)) and pd.isna(value)):
        return None
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, pd.Timestamp):
        return value.date().isoformat() if value == value.normalize() else value.isoformat()
    return value


def _body(value: Any) -> tuple[bytes, bytes]:
    """(type byte, value bytes): text as UTF-8, numbers and booleans as JSON, null as nothing."""
    value = _normalize(value)
    if value is None:
        return _NULL, b""
    if isinstance(value, str):
        return _TEXT, value.encode("utf-8")
    return _JSON, json.dumps(value, ensure_ascii=False, allow_nan=False).encode()


def value_bytes(value: Any) -> int:
    """What ``max_bytes`` counts: the UTF-8 bytes of a text value, the JSON text of a number, 0 for null."""
    return len(_body(value)[1])


def check_max_bytes(max_bytes: Any, column: str) -> int:
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or not 1 <= max_bytes <= MAX_BYTES_LIMIT:
        raise ConfigError(f"[sensitive.{column}] max_bytes must be an integer in [1, {MAX_BYTES_LIMIT}], got {max_bytes!r}")
    return max_bytes


def check_lengths(values: Iterable[Any], column: str, max_bytes: int) -> None:
    """Refuse values longer than the column's declared maximum, naming the column, never a value."""
    _refuse_long(list(map(value_bytes, values)), column, max_bytes)


def _refuse_long(lengths: list[int], column: str, max_bytes: int) -> None:
    over = [n for n in lengths if n > max_bytes]
    if over:
        raise DataError(
            f"column {column!r}: {len(over)} value(s) longer than its declared maximum of {max_bytes} bytes "
            f"(longest {max(over)}); raise [sensitive.{column}] max_bytes to at least {max(over)} in the policy "
            "(every token of the column is padded to it). Nothing was written")


def _pad(kind: bytes, body: bytes, max_bytes: int) -> bytes:
    return kind + len(body).to_bytes(2, "big") + body + bytes(max_bytes - len(body))


def _unpad(plain: bytes, column: str, rid: str) -> Any:
    kind, n = plain[:1], int.from_bytes(plain[1:_HEADER], "big")
    body, rest = plain[_HEADER:_HEADER + n], plain[_HEADER + n:]
    if len(plain) < _HEADER or len(body) != n or rest.strip(b"\x00") or kind not in (_NULL, _TEXT, _JSON):
        raise SecurityError(f"column {column!r}, row {rid}: decrypted field has a malformed length or padding")
    if kind == _NULL:
        return None
    return body.decode("utf-8") if kind == _TEXT else json.loads(body)


def token_chars(max_bytes: int, key_id: str) -> int:
    """The length every token of a column padded to ``max_bytes`` has under key ``key_id``."""
    raw = _NONCE + _HEADER + max_bytes + _TAG
    return len(TOKEN_PREFIX) + len(key_id) + 2 + 4 * -(-raw // 3)


def encrypt_values(values: Iterable[Any], column: str, row_ids: Sequence[str], keyring: FieldKeyring, *,
                   max_bytes: int = DEFAULT_MAX_BYTES) -> list[str]:
    """Encrypt each value under the active key, padded to ``max_bytes`` (all lengths checked first).

    Null, text, numbers and booleans round-trip with their type.
    """
    check_max_bytes(max_bytes, column)
    bodies = [_body(v) for v in values]
    _refuse_long([len(b) for _, b in bodies], column, max_bytes)
    return _encrypt_bodies(bodies, column, row_ids, keyring, max_bytes)


def _encrypt_bodies(bodies: list[tuple[bytes, bytes]], column: str, row_ids: Sequence[str], keyring: FieldKeyring,
                    max_bytes: int) -> list[str]:
    kid = keyring.active
    aead = AESGCM(keyring.keys[kid])
    if len(bodies) != len(row_ids):
        raise ValueError(f"{len(bodies)} values for {len(row_ids)} row ids")
    nonces = secrets.token_bytes(_NONCE * len(bodies))  # one read of the OS CSPRNG, not one per value
    out = []
    for i, ((kind, body), rid) in enumerate(zip(bodies, row_ids)):
        nonce = nonces[i * _NONCE:(i + 1) * _NONCE]
        ct = aead.encrypt(nonce, _pad(kind, body, max_bytes), _aad(column, rid, kid))
        out.append(f"{TOKEN_PREFIX}.{kid}.{base64.urlsafe_b64encode(nonce + ct).decode()}")
    return out


def unpadded_tokens(values: Iterable[Any], column: str, row_ids: Sequence[str], keyring: FieldKeyring) -> list[str]:
    """The earlier, unpadded format (``gcm1``): kept only so that tests and ``bench/deid.py`` can show
    the token-length attack it allows.  Never used by ``deidentify``."""
    kid = keyring.active
    aead = AESGCM(keyring.keys[kid])
    values = list(values)
    nonces = secrets.token_bytes(_NONCE * len(values))
    out = []
    for i, (value, rid) in enumerate(zip(values, row_ids, strict=True)):
        nonce = nonces[i * _NONCE:(i + 1) * _NONCE]
        plain = json.dumps(_normalize(value), ensure_ascii=False, allow_nan=False).encode()
        ct = aead.encrypt(nonce, plain, _aad(column, rid, kid, LEGACY_PREFIX))
        out.append(f"{LEGACY_PREFIX}.{kid}.{base64.urlsafe_b64encode(nonce + ct).decode()}")
    return out


def _parse(token: Any, column: str, rid: str) -> tuple[str, str, bytes]:
    parts = token.split(".") if isinstance(token, str) else []
    if len(parts) != 3 or parts[0] not in (TOKEN_PREFIX, LEGACY_PREFIX):
        raise SecurityError(f"column {column!r}, row {rid}: not an encrypted field token (tampered or never encrypted)")
    try:
        blob = base64.urlsafe_b64decode(parts[2].encode())
    except ValueError:
        raise SecurityError(f"column {column!r}, row {rid}: token is not valid base64 (tampered)") from None
    if len(blob) < _NONCE + _TAG + (_HEADER if parts[0] == TOKEN_PREFIX else 0):
        raise SecurityError(f"column {column!r}, row {rid}: token too short (tampered)")
    return parts[0], parts[1], blob


def decrypt_values(tokens: Iterable[Any], column: str, row_ids: Sequence[str], keyring: FieldKeyring) -> list[Any]:
    out = []
    ciphers: dict[str, AESGCM] = {}
    for token, rid in zip(tokens, row_ids, strict=True):
        prefix, kid, blob = _parse(token, column, rid)
        if kid not in keyring.keys:
            raise SecurityError(f"column {column!r}, row {rid}: encrypted under key id {kid!r}, which this "
                                f"keyring does not hold (it has {sorted(keyring.keys)})")
        aead = ciphers.setdefault(kid, AESGCM(keyring.keys[kid]))
        try:
            plain = aead.decrypt(blob[:_NONCE], blob[_NONCE:], _aad(column, rid, kid, prefix))
        except InvalidTag:
            raise SecurityError(
                f"column {column!r}, row {rid}: authentication failed for key id {kid!r} — wrong key, or the "
                "value was altered or moved from another row or column") from None
        out.append(_unpad(plain, column, rid) if prefix == TOKEN_PREFIX else json.loads(plain))
    return out


def encrypt_frame(frame: pd.DataFrame, columns: Sequence[str], id_column: str, keyring: FieldKeyring,
                  max_bytes: Mapping[str, int] | None = None) -> pd.DataFrame:
    """Encrypt ``columns``, each padded to ``max_bytes[column]`` (default 64); every column is
    checked before any is encrypted."""
    sizes = {c: check_max_bytes((max_bytes or {}).get(c, DEFAULT_MAX_BYTES), c) for c in columns}
    bodies = {c: [_body(v) for v in frame[c].tolist()] for c in columns}
    for c in columns:
        _refuse_long([len(b) for _, b in bodies[c]], c, sizes[c])
    out = frame.copy()
    rids = frame[id_column].astype(str).tolist()
    for c in columns:
        out[c] = pd.Series(_encrypt_bodies(bodies[c], c, rids, keyring, sizes[c]), index=frame.index, dtype=object)
    return out


def decrypt_frame(frame: pd.DataFrame, columns: Sequence[str], id_column: str, keyring: FieldKeyring) -> pd.DataFrame:
    out = frame.copy()
    rids = frame[id_column].astype(str).tolist()
    for c in columns:
        out[c] = pd.Series(decrypt_values(frame[c].tolist(), c, rids, keyring), index=frame.index, dtype=object)
    return out


def _is_token(v: Any) -> bool:
    return isinstance(v, str) and v.startswith((TOKEN_PREFIX + ".", LEGACY_PREFIX + "."))


def encrypted_columns(frame: pd.DataFrame) -> list[str]:
    """Columns whose every non-null value is a field token (padded or legacy)."""
    cols = []
    for c in frame.columns:
        s = frame[c].dropna()
        if len(s) and s.map(_is_token).all():
            cols.append(c)
    return cols


def padded_sizes(frame: pd.DataFrame, columns: Sequence[str], plain: pd.DataFrame | None = None) -> dict[str, int]:
    """The ``max_bytes`` each column's tokens are padded to: the largest among its padded tokens; for a
    column holding only legacy unpadded tokens, its longest value (in ``plain``; those lengths were
    already visible)."""
    sizes = {}
    for c in columns:
        padded = [len(base64.urlsafe_b64decode(t.split(".")[2])) - _NONCE - _TAG - _HEADER
                  for t in frame[c].dropna() if isinstance(t, str) and t.startswith(TOKEN_PREFIX + ".")]
        if padded:
            sizes[c] = max(padded)
        elif plain is not None:
            sizes[c] = max([1, *map(value_bytes, plain[c].tolist())])
        else:
            sizes[c] = DEFAULT_MAX_BYTES
    return sizes


def rotate_frame(frame: pd.DataFrame, columns: Sequence[str], id_column: str, keyring: FieldKeyring,
                 max_bytes: Mapping[str, int] | None = None) -> pd.DataFrame:
    """Re-encrypt every token of ``columns`` to ``keyring.active``; all are checked before any changes.

    Each column keeps its padded size unless ``max_bytes`` names a new one; legacy unpadded columns
    come out padded to their longest value.
    """
    plain = decrypt_frame(frame, columns, id_column, keyring)
    sizes = {**padded_sizes(frame, columns, plain), **(max_bytes or {})}
    return encrypt_frame(plain, columns, id_column, keyring, sizes)


def token_lengths(frame: pd.DataFrame, columns: Sequence[str]) -> dict[str, list[int]]:
    """The distinct token lengths of each column (one per column in a padded release)."""
    return {c: sorted({len(t) for t in frame[c].dropna()}) for c in columns}


def key_ids_in_use(frame: pd.DataFrame, columns: Sequence[str]) -> set[str]:
    used: set[str] = set()
    for c in columns:
        used |= {t.split(".")[1] for t in frame[c].dropna() if isinstance(t, str) and t.count(".") == 2}
    return used


__all__ = ["DEFAULT_MAX_BYTES", "FieldKeyring", "LEGACY_PREFIX", "TOKEN_PREFIX", "check_lengths", "decrypt_frame",
           "decrypt_values", "encrypt_frame", "encrypt_values", "encrypted_columns", "key_ids_in_use",
           "padded_sizes", "rotate_frame", "token_chars", "token_lengths", "unpadded_tokens", "value_bytes"]
