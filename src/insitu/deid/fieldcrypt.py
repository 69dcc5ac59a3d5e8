"""Field-level encryption at rest for sensitive columns: AES-256-GCM with key ids and rotation.

Each value becomes a token ``gcm1.<key id>.<base64url(nonce ‖ ciphertext ‖ tag)>``.  The
associated data binds the token to its column, to its row's pseudonym and to the key id, so a
token copied into another column or another patient's row fails to decrypt, exactly like a
tampered one — a database administrator cannot move a diagnosis between patients unnoticed.
(Two rows of the *same* patient share a pseudonym; a swap between them is not detected.)

Wrong key, unknown key id, edited token, moved token: one ``SecurityError`` naming the column
and the row pseudonym, never the plaintext.

The keyring is a JSON file (mode 0600) of 256-bit keys by id plus the active id.  Rotation adds a
key, makes it active and re-encrypts tokens to it; old keys stay until ``retire`` removes them
once no token uses them.
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

from insitu.errors import ConfigError, SecurityError

TOKEN_PREFIX = "gcm1"
_KEYRING_FORMAT = "insitu-field-keyring-v1"
_KEY_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
_NONCE = 12


def _aad(column: str, row_id: str, key_id: str) -> bytes:
    return b"\x00".join([b"insitu-field-v1", column.encode(), str(row_id).encode(), key_id.encode()])


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


def _to_json(value: Any) -> bytes:
    if value is None or (not isinstance(value, (str, bytes)) and pd.isna(value)):
        value = None
    elif isinstance(value, np.generic):
        value = value.item()
    elif isinstance(value, pd.Timestamp):
        value = value.date().isoformat() if value == value.normalize() else value.isoformat()
    return json.dumps(value, ensure_ascii=False, allow_nan=False).encode()


def encrypt_values(values: Iterable[Any], column: str, row_ids: Sequence[str], keyring: FieldKeyring) -> list[str]:
    """Encrypt each value (as JSON, so null and numbers round-trip) under the active key."""
    kid = keyring.active
    aead = AESGCM(keyring.keys[kid])
    out = []
    for value, rid in zip(values, row_ids, strict=True):
        nonce = secrets.token_bytes(_NONCE)
        ct = aead.encrypt(nonce, _to_json(value), _aad(column, rid, kid))
        out.append(f"{TOKEN_PREFIX}.{kid}.{base64.urlsafe_b64encode(nonce + ct).decode()}")
    return out


def _parse(token: Any, column: str, rid: str) -> tuple[str, bytes]:
    parts = token.split(".") if isinstance(token, str) else []
    if len(parts) != 3 or parts[0] != TOKEN_PREFIX:
        raise SecurityError(f"column {column!r}, row {rid}: not an encrypted field token (tampered or never encrypted)")
    try:
        blob = base64.urlsafe_b64decode(parts[2].encode())
    except ValueError:
        raise SecurityError(f"column {column!r}, row {rid}: token is not valid base64 (tampered)") from None
    if len(blob) < _NONCE + 16:
        raise SecurityError(f"column {column!r}, row {rid}: token too short (tampered)")
    return parts[1], blob


def decrypt_values(tokens: Iterable[Any], column: str, row_ids: Sequence[str], keyring: FieldKeyring) -> list[Any]:
    out = []
    ciphers: dict[str, AESGCM] = {}
    for token, rid in zip(tokens, row_ids, strict=True):
        kid, blob = _parse(token, column, rid)
        if kid not in keyring.keys:
            raise SecurityError(f"column {column!r}, row {rid}: encrypted under key id {kid!r}, which this "
                                f"keyring does not hold (it has {sorted(keyring.keys)})")
        aead = ciphers.setdefault(kid, AESGCM(keyring.keys[kid]))
        try:
            plain = aead.decrypt(blob[:_NONCE], blob[_NONCE:], _aad(column, rid, kid))
        except InvalidTag:
            raise SecurityError(
                f"column {column!r}, row {rid}: authentication failed for key id {kid!r} — wrong key, or the "
                "value was altered or moved from another row or column") from None
        out.append(json.loads(plain))
    return out


def encrypt_frame(frame: pd.DataFrame, columns: Sequence[str], id_column: str, keyring: FieldKeyring) -> pd.DataFrame:
    out = frame.copy()
    rids = frame[id_column].astype(str).tolist()
    for c in columns:
        out[c] = pd.Series(encrypt_values(frame[c].tolist(), c, rids, keyring), index=frame.index, dtype=object)
    return out


def decrypt_frame(frame: pd.DataFrame, columns: Sequence[str], id_column: str, keyring: FieldKeyring) -> pd.DataFrame:
    out = frame.copy()
    rids = frame[id_column].astype(str).tolist()
    for c in columns:
        out[c] = pd.Series(decrypt_values(frame[c].tolist(), c, rids, keyring), index=frame.index, dtype=object)
    return out


def encrypted_columns(frame: pd.DataFrame) -> list[str]:
    """Columns whose every non-null value is a field token."""
    cols = []
    for c in frame.columns:
        s = frame[c].dropna()
        if len(s) and s.map(lambda v: isinstance(v, str) and v.startswith(TOKEN_PREFIX + ".")).all():
            cols.append(c)
    return cols


def rotate_frame(frame: pd.DataFrame, columns: Sequence[str], id_column: str, keyring: FieldKeyring) -> pd.DataFrame:
    """Re-encrypt every token of ``columns`` to ``keyring.active``; all are checked before any changes."""
    plain = decrypt_frame(frame, columns, id_column, keyring)
    return encrypt_frame(plain, columns, id_column, keyring)


def key_ids_in_use(frame: pd.DataFrame, columns: Sequence[str]) -> set[str]:
    used: set[str] = set()
    for c in columns:
        used |= {t.split(".")[1] for t in frame[c].dropna() if isinstance(t, str) and t.count(".") == 2}
    return used


__all__ = ["FieldKeyring", "TOKEN_PREFIX", "decrypt_frame", "decrypt_values", "encrypt_frame", "encrypt_values",
           "encrypted_columns", "key_ids_in_use", "rotate_frame"]
