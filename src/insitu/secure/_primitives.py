"""Thin wrappers over `cryptography`: X25519, HKDF-SHA256, AES-GCM sealing, AES-CTR mask expansion.

Nothing here is home-made cryptography; these helpers only fix the parameters
(key sizes, domain-separation labels) that the protocols in this package use,
so that every party derives the same keys from the same transcript.
"""
from __future__ import annotations

import hashlib
import os
import threading

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from insitu.errors import ProtocolError

_RAW = serialization.Encoding.Raw


def x25519_keypair() -> tuple[bytes, bytes]:
    """A fresh (private, public) X25519 pair as 32-byte strings."""
    sk = X25519PrivateKey.generate()
    return (
        sk.private_bytes(_RAW, serialization.PrivateFormat.Raw, serialization.NoEncryption()),
        sk.public_key().public_bytes(_RAW, serialization.PublicFormat.Raw),
    )


def x25519_public(sk: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(sk).public_key().public_bytes(_RAW, serialization.PublicFormat.Raw)


def private_key(sk: bytes) -> X25519PrivateKey:
    """Parse a raw private key once (parsing costs as much as an agreement)."""
    return X25519PrivateKey.from_private_bytes(sk)


def agree(sk: bytes | X25519PrivateKey, pk: bytes) -> bytes:
    """Raw X25519 shared secret; refuses a malformed or low-order public key."""
    key = sk if isinstance(sk, X25519PrivateKey) else X25519PrivateKey.from_private_bytes(sk)
    try:
        return key.exchange(X25519PublicKey.from_public_bytes(pk))
    except ValueError as exc:
        raise ProtocolError(f"X25519 key agreement failed: {exc}") from None


def hkdf(secret: bytes, info: bytes, length: int = 32) -> bytes:
    """HKDF-SHA256 with no salt; ``info`` carries the domain label and the transcript context."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(secret)


def context(*parts: object) -> bytes:
    """Unambiguous byte encoding of a tuple of labels (length-prefixed), for HKDF info and AAD."""
    out = bytearray()
    for p in parts:
        b = p if isinstance(p, bytes) else str(p).encode()
        out += len(b).to_bytes(4, "big") + b
    return bytes(out)


def seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """AES-GCM encrypt with a random 96-bit nonce; returns nonce ‖ ciphertext ‖ tag."""
    nonce = os.urandom(12)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def open_sealed(key: bytes, blob: bytes, aad: bytes, what: str) -> bytes:
    """Decrypt a :func:`seal` blob; any tampering or wrong context is a :class:`ProtocolError`."""
    if len(blob) < 12 + 16:
        raise ProtocolError(f"{what}: sealed blob of {len(blob)} bytes is too short")
    try:
        return AESGCM(key).decrypt(blob[:12], blob[12:], aad)
    except InvalidTag:
        raise ProtocolError(f"{what}: authentication failed (forged, corrupted or addressed to someone else)") from None


def commitment(*parts: object) -> str:
    """SHA-256 hex digest of ``parts``: binds a party to a secret revealed later."""
    return hashlib.sha256(context(b"insitu-commit", *parts)).hexdigest()


_LOCAL = threading.local()


class MaskExpander:
    """Expands 16-byte seeds into uniform vectors of Z_2^k with AES-128-CTR and adds them in place.

    The keystream is written into one reusable buffer (``update_into``), so expanding a mask
    costs one AES pass and one numpy add, without allocating: this is what keeps the server's
    unmasking within its time budget.
    """

    def __init__(self, size: int, dtype: np.dtype):
        self.size = int(size)
        self.dtype = np.dtype(dtype)
        nbytes = self.size * self.dtype.itemsize
        self._zeros = bytes(nbytes)
        self._buf = bytearray(nbytes + 16)
        self._view = np.frombuffer(self._buf, dtype=self.dtype, count=self.size)

    @classmethod
    def reused(cls, size: int, dtype: np.dtype) -> "MaskExpander":
        """An expander of this thread, kept for the next call with the same size and dtype: a site
        masking one vector per round does not allocate (and page-fault) two fresh buffers each time."""
        key = (int(size), np.dtype(dtype).str)
        cache = _LOCAL.__dict__.setdefault("expanders", {})
        exp = cache.get(key)
        if exp is None:
            cache.clear()  # one size at a time: a thread masks one model's vectors
            exp = cache[key] = cls(size, dtype)
        return exp

    def expand(self, seed: bytes) -> np.ndarray:
        """The mask for ``seed`` (a view into the shared buffer: copy it to keep it)."""
        if len(seed) != 16:
            raise ValueError("mask seeds are 16 bytes (AES-128 keys)")
        enc = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
        enc.update_into(self._zeros, self._buf)
        return self._view

    def add(self, acc: np.ndarray, seed: bytes, sign: int = 1) -> None:
        """acc ← acc ± mask(seed), wrapping modulo 2^(8·itemsize)."""
        m = self.expand(seed)
        if sign >= 0:
            np.add(acc, m, out=acc)
        else:
            np.subtract(acc, m, out=acc)
