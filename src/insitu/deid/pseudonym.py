"""Keyed pseudonyms (HMAC-SHA256) and keyed per-patient date shifts.

Why not ``sha256(patient_id)``, as often proposed: a hash without a key is a public function, and
patient identifiers come from a small, structured space — a 7-digit MRN has 10^7 values, a
national ID about 10^9.  Anyone holding the "anonymized" table hashes every possible ID once
(10^7 SHA-256 take a few seconds on one core; 10^9 take minutes on a GPU) and looks each
pseudonym up in that table: every record is re-identified.  Salting with a salt stored beside the
data changes nothing.  ``tests/deid/test_pseudonym.py`` runs exactly this attack.

A keyed HMAC with a secret that never leaves the site defeats the dictionary: without the key the
attacker cannot compute a single candidate pseudonym, and HMAC-SHA256 is a PRF, so pseudonyms
reveal nothing about IDs.  The same key gives the same pseudonym for the same patient on every run
(records stay linkable inside the site, and across sites only if they share the key on purpose).

One site secret (32 random bytes, file mode 0600) is expanded with HKDF-SHA256 into the HMAC key
(other purposes get other HKDF labels).  One HMAC per patient gives both the pseudonym (bytes
0-15) and the date offset (bytes 24-31): disjoint parts of a PRF output are independent, so the
published pseudonym reveals nothing about the offset.  Work is done per *distinct* ID
(``pd.factorize``) and broadcast back with numpy, so a table with many visits per patient costs
one HMAC per patient.
"""
from __future__ import annotations

import hmac
import os
import secrets
import stat
from hashlib import sha256
from pathlib import Path

import numpy as np
import pandas as pd
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from insitu.errors import ConfigError, SecurityError

SECRET_BYTES = 32
PSEUDONYM_HEX = 32  # 128 bits: collisions negligible for any hospital's patient count


def generate_site_secret(path: str | Path, *, overwrite: bool = False) -> Path:
    """Write a new 32-byte site secret (hex, mode 0600).  Losing it means pseudonyms change."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise ConfigError(f"{path} already exists; refusing to replace a site secret (pseudonyms would change)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, (secrets.token_hex(SECRET_BYTES) + "\n").encode())
    finally:
        os.close(fd)
    return path


def load_site_secret(path: str | Path) -> bytes:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"site secret {path} not found; create one with `insitu deid keygen --secret {path}`")
    if os.name == "posix" and path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SecurityError(f"site secret {path} is readable by group/others; run `chmod 600 {path}`")
    text = path.read_text().strip()
    try:
        secret = bytes.fromhex(text)
    except ValueError:
        raise SecurityError(f"site secret {path} is not hex") from None
    if len(secret) < SECRET_BYTES:
        raise SecurityError(f"site secret {path} has {len(secret)} bytes; at least {SECRET_BYTES} are required")
    return secret


def _subkey(secret: bytes, purpose: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=b"insitu-deid-v1", info=purpose).derive(secret)


def _id_bytes(value: object) -> bytes:
    return str(value).strip().encode("utf-8")


class Pseudonymizer:
    """Keyed pseudonyms and date offsets from one site secret."""

    def __init__(self, secret: bytes) -> None:
        if not isinstance(secret, bytes) or len(secret) < SECRET_BYTES:
            raise SecurityError(f"the site secret must be at least {SECRET_BYTES} random bytes")
        self._k_pseudo = _subkey(secret, b"pseudonym")

    def fingerprint(self) -> str:
        """Identifies the secret in reports (so a changed secret is noticed) without revealing it."""
        return hmac.digest(self._k_pseudo, b"insitu-secret-fingerprint", "sha256").hex()[:12]

    def pseudonym(self, value: object) -> str:
        return hmac.digest(self._k_pseudo, _id_bytes(value), "sha256").hex()[:PSEUDONYM_HEX]

    def pseudonyms(self, ids: pd.Series) -> pd.Series:
        """One HMAC per distinct ID, broadcast to rows; missing IDs stay missing."""
        return self.pseudonyms_and_offsets(ids, 0)[0]

    def pseudonyms_and_offsets(self, ids: pd.Series, max_days: int) -> tuple[pd.Series, np.ndarray]:
        """Both from one HMAC per distinct ID: bytes 0-15 are the pseudonym, bytes 24-31 the offset.

        The offset is a keyed shift in ±[1, max_days] days per patient (0 for missing IDs, and for
        everyone when ``max_days`` < 1).  Every date of one patient moves by the same offset, so
        intervals between that patient's events are exact; across patients the offsets are
        unrelated without the key.

        HMAC-SHA256 is a PRF, so disjoint parts of its output are independent: a pseudonym (which
        leaves the site) says nothing about that patient's date offset.
        """
        codes, uniques = pd.factorize(ids, use_na_sentinel=True)
        key = self._k_pseudo
        texts = pd.Index(uniques, dtype=object).astype(str).str.strip().tolist()  # same as _id_bytes, vectorized
        macs = [hmac.digest(key, t.encode("utf-8"), "sha256") for t in texts]
        table = np.array([m[:PSEUDONYM_HEX // 2].hex() for m in macs] + [None], dtype=object)
        series = pd.Series(table[codes], index=ids.index, dtype="string")  # code -1 -> None
        if max_days < 1:
            return series, np.zeros(len(ids), dtype=np.int64)
        raw = np.frombuffer(b"".join(m[24:32] for m in macs), dtype=">u8").astype(np.uint64)
        magnitude = (raw % np.uint64(max_days)).astype(np.int64) + 1
        sign = np.where((raw >> np.uint64(63)) & np.uint64(1), -1, 1)
        return series, np.append(magnitude * sign, 0)[codes]


def unkeyed_sha256(ids: pd.Series) -> pd.Series:
    """The weak scheme, kept only so tests and the benchmark can show why it fails."""
    return ids.map(lambda v: sha256(_id_bytes(v)).hexdigest())


__all__ = ["Pseudonymizer", "generate_site_secret", "load_site_secret", "unkeyed_sha256"]
