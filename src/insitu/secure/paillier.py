"""Packed Paillier: many fixed-point values per ciphertext, encrypted fast by the key holder.

Paillier (via ``phe``/``gmpy2``) is additively homomorphic: multiplying
ciphertexts adds plaintexts modulo the public modulus n.  One 2048-bit plaintext
has room for dozens of fixed-point values, so we *pack* them: value vᵢ becomes
the non-negative integer round(vᵢ·2^f) + bound·2^f, laid out in ``slot_bits``
bits each.  ``slot_bits`` leaves headroom for the sum over ``n_max`` parties,
checked when the layout is built, so slots never carry into each other.

Sites hold the private key, so they encrypt with the Chinese remainder theorem
(rⁿ mod p² and mod q² instead of mod n²), about four times faster than the
public-key path, on top of the packing gain.
"""
from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import gmpy2
import numpy as np
from phe import paillier

from insitu.errors import ConfigError, ProtocolError


@dataclass(frozen=True)
class PackedLayout:
    """How values sit in a plaintext; both sides derive it from the same four numbers."""

    key_bits: int
    frac_bits: int
    bound: float
    n_max: int

    def __post_init__(self) -> None:
        if self.n_max < 1 or self.frac_bits < 0 or not (self.bound > 0 and math.isfinite(self.bound)):
            raise ConfigError(f"invalid packed-Paillier layout {self}")
        if self.slot_bytes > 8:
            raise ConfigError(
                f"packed Paillier slots would need {self.slot_bits} bits (> 64) for {self.n_max} sites with bound "
                f"{self.bound:g} and {self.frac_bits} fraction bits; lower the bound or the fraction bits"
            )
        if self.slots < 1:
            raise ConfigError(f"a {self.key_bits}-bit key holds no {self.slot_bits}-bit slot")

    @property
    def offset(self) -> int:
        return int(math.ceil(self.bound * 2**self.frac_bits))

    @property
    def slot_bits(self) -> int:
        """Bits one slot needs so that the sum of n_max values in [0, 2·offset] cannot carry over."""
        return max(1, (self.n_max * 2 * self.offset).bit_length())

    @property
    def slot_bytes(self) -> int:
        return (self.slot_bits + 7) // 8

    @property
    def slots(self) -> int:
        """Values per plaintext: the packed integer stays below 2^(key_bits − 1) < n."""
        return (self.key_bits - 1) // (8 * self.slot_bytes)

    @property
    def ct_bytes(self) -> int:
        return 2 * ((self.key_bits + 7) // 8)

    def n_ciphertexts(self, size: int) -> int:
        return -(-size // self.slots)

    def encode(self, vec: np.ndarray, what: str = "update") -> list[int]:
        """Packed plaintext integers; refuses values beyond ``bound`` instead of clipping them."""
        v = np.asarray(vec, dtype=np.float64)
        if not np.all(np.isfinite(v)):
            raise ProtocolError(f"{what} holds NaN or infinite values")
        peak = float(np.max(np.abs(v))) if v.size else 0.0
        if peak > self.bound:
            raise ProtocolError(f"{what} has a coordinate above the packing bound {self.bound:g} (its size is not named: a site's update "
                                "is what the protection hides); clip updates or raise the bound")
        m, sb = self.slots, self.slot_bytes
        ints = np.rint(v * 2.0**self.frac_bits).astype(np.int64) + self.offset
        ints = np.concatenate([ints, np.full((-len(ints)) % m, self.offset, dtype=np.int64)]).astype(">u8")
        raw = ints.view(np.uint8).reshape(-1, 8)[:, 8 - sb :].reshape(-1, m * sb)
        return [int.from_bytes(row.tobytes(), "big") for row in raw]

    def decode(self, plains: list[int], size: int, count: int) -> np.ndarray:
        """Sum of ``count`` packed vectors back to reals."""
        m, sb = self.slots, self.slot_bytes
        if count < 1 or count > self.n_max:
            raise ProtocolError(f"cannot decode a sum of {count} vectors with a layout for at most {self.n_max}")
        buf = b"".join(int(p).to_bytes(m * sb, "big") for p in plains)
        cols = np.frombuffer(buf, dtype=np.uint8).reshape(-1, sb)
        full = np.zeros((cols.shape[0], 8), dtype=np.uint8)
        full[:, 8 - sb :] = cols
        vals = full.reshape(-1).view(">u8").astype(np.int64)[:size] - count * self.offset
        return vals.astype(np.float64) / 2.0**self.frac_bits


def generate_keypair(key_bits: int = 2048) -> tuple[paillier.PaillierPublicKey, paillier.PaillierPrivateKey]:
    if key_bits < 2048:
        raise ConfigError(f"Paillier key of {key_bits} bits is too short; use at least 2048")
    return paillier.generate_paillier_keypair(n_length=key_bits)


def private_to_bytes(sk: paillier.PaillierPrivateKey) -> bytes:
    p, q = int(sk.p), int(sk.q)
    lp = (p.bit_length() + 7) // 8
    return lp.to_bytes(4, "big") + p.to_bytes(lp, "big") + q.to_bytes((q.bit_length() + 7) // 8, "big")


def private_from_bytes(blob: bytes) -> paillier.PaillierPrivateKey:
    if len(blob) < 8:
        raise ProtocolError("Paillier private key blob is too short")
    lp = int.from_bytes(blob[:4], "big")
    p, q = int.from_bytes(blob[4 : 4 + lp], "big"), int.from_bytes(blob[4 + lp :], "big")
    if p < 3 or q < 3:
        raise ProtocolError("Paillier private key blob is malformed")
    return paillier.PaillierPrivateKey(paillier.PaillierPublicKey(p * q), p, q)


class FastEncryptor:
    """Encryption by the private-key holder: c = (1 + m·n) · rⁿ mod n², with rⁿ by CRT."""

    def __init__(self, sk: paillier.PaillierPrivateKey):
        self.n = gmpy2.mpz(sk.public_key.n)
        self.nsq = self.n * self.n
        p, q = gmpy2.mpz(sk.p), gmpy2.mpz(sk.q)
        self.p2, self.q2 = p * p, q * q
        self.p2_inv_q2 = gmpy2.invert(self.p2, self.q2)

    def _rn(self) -> gmpy2.mpz:
        r = gmpy2.mpz(secrets.randbelow(int(self.n) - 1) + 1)
        a = gmpy2.powmod(r, self.n, self.p2)
        b = gmpy2.powmod(r, self.n, self.q2)
        return a + self.p2 * ((b - a) * self.p2_inv_q2 % self.q2)

    def encrypt(self, m: int) -> gmpy2.mpz:
        return (1 + gmpy2.mpz(m) * self.n) % self.nsq * self._rn() % self.nsq


def ciphertexts_to_array(cts: list, ct_bytes: int) -> np.ndarray:
    return np.frombuffer(b"".join(int(c).to_bytes(ct_bytes, "big") for c in cts), dtype=np.uint8).reshape(len(cts), ct_bytes)


def array_to_ciphertexts(arr: np.ndarray, nsq: int, what: str) -> list[gmpy2.mpz]:
    out = []
    for row in arr:
        c = gmpy2.mpz(int.from_bytes(row.tobytes(), "big"))
        if not 0 < c < nsq:
            raise ProtocolError(f"{what} holds a ciphertext outside Z*_(n²)")
        out.append(c)
    return out


def add_ciphertexts(columns: list[list[gmpy2.mpz]], nsq: int) -> list[gmpy2.mpz]:
    """Homomorphic sum: the product of each position's ciphertexts modulo n²."""
    nsq = gmpy2.mpz(nsq)
    total = list(columns[0])
    for col in columns[1:]:
        total = [a * b % nsq for a, b in zip(total, col)]
    return total


def decrypt_raw(sk: paillier.PaillierPrivateKey, cts: list) -> list[int]:
    return [int(sk.raw_decrypt(int(c))) for c in cts]
