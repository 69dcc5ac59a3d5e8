"""CKKS through TenSEAL: approximate arithmetic on encrypted real vectors, fast.

A site holds the full context (with the secret key); the coordinator gets a
*public* context (``make_context_public``: no secret key) that can only
deserialize and add ciphertexts.  One ciphertext carries poly_modulus_degree/2
values; addition needs no relinearisation or Galois keys, so none are shipped.
"""
from __future__ import annotations

import numpy as np
import tenseal as ts

from insitu.errors import ConfigError, ProtocolError

_MODULI = {8192: [60, 40, 60], 16384: [60, 40, 40, 60]}


def make_context(poly_degree: int = 8192, scale_bits: int = 40) -> ts.Context:
    if poly_degree not in _MODULI:
        raise ConfigError(f"CKKS poly modulus degree {poly_degree} is not supported; use one of {sorted(_MODULI)}")
    if not 20 <= scale_bits <= 40:
        raise ConfigError(f"CKKS scale of 2^{scale_bits} is outside 2^20..2^40")
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=poly_degree, coeff_mod_bit_sizes=_MODULI[poly_degree])
    ctx.global_scale = 2.0**scale_bits
    return ctx


def secret_bytes(ctx: ts.Context) -> bytes:
    return ctx.serialize(save_public_key=True, save_secret_key=True, save_galois_keys=False, save_relin_keys=False)


def public_bytes(ctx: ts.Context) -> bytes:
    pub = ctx.copy()
    pub.make_context_public()
    return pub.serialize(save_public_key=True, save_secret_key=False, save_galois_keys=False, save_relin_keys=False)


def load_context(blob: bytes, *, secret: bool) -> ts.Context:
    try:
        ctx = ts.context_from(blob)
    except Exception as exc:  # TenSEAL raises plain exceptions on malformed input
        raise ProtocolError(f"CKKS context does not deserialize: {exc}") from None
    if secret != ctx.is_private():
        raise ProtocolError("CKKS context " + ("lacks its secret key" if secret else "carries a secret key: the coordinator must not hold one"))
    return ctx


def encrypt(ctx: ts.Context, vec: np.ndarray, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """Ciphertexts of ``vec`` in chunks, flattened into (bytes, lengths) arrays for the wire."""
    v = np.asarray(vec, dtype=np.float64)
    blobs = [ts.ckks_vector(ctx, v[i : i + chunk].tolist()).serialize() for i in range(0, len(v), chunk)]
    return _pack(blobs)


def _pack(blobs: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    return np.frombuffer(b"".join(blobs), dtype=np.uint8), np.array([len(b) for b in blobs], dtype=np.int64)


def _unpack(data: np.ndarray, lengths: np.ndarray, expect: int, what: str) -> list[bytes]:
    if data.dtype != np.uint8 or data.ndim != 1 or lengths.dtype != np.int64 or lengths.ndim != 1:
        raise ProtocolError(f"{what}: CKKS ciphertexts must be a flat uint8 array with int64 lengths")
    if len(lengths) != expect or np.any(lengths <= 0) or int(lengths.sum()) != data.shape[0]:
        raise ProtocolError(f"{what}: {len(lengths)} CKKS ciphertexts totalling {int(lengths.sum())} bytes, expected {expect} in {data.shape[0]}")
    raw = data.tobytes()
    out, off = [], 0
    for n in lengths.tolist():
        out.append(raw[off : off + n])
        off += n
    return out


def add(public: ts.Context, parts: list[tuple[str, np.ndarray, np.ndarray]], expect: int, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """Homomorphic sum of each site's ciphertexts (``parts`` = (site, bytes, lengths))."""
    total: list | None = None
    for site, data, lengths in parts:
        vecs = []
        for i, blob in enumerate(_unpack(data, lengths, expect, f"ciphertexts from {site}")):
            try:
                ct = ts.ckks_vector_from(public, blob)
            except Exception as exc:
                raise ProtocolError(f"ciphertext {i} from {site} does not deserialize: {exc}") from None
            if ct.size() != min(chunk, ct.size()) or ct.size() < 1:
                raise ProtocolError(f"ciphertext {i} from {site} holds {ct.size()} values")
            vecs.append(ct)
        if total is None:
            total = vecs
        else:
            if any(a.size() != b.size() for a, b in zip(total, vecs)):
                raise ProtocolError(f"ciphertexts from {site} have other lengths than the rest")
            total = [a + b for a, b in zip(total, vecs)]
    assert total is not None
    return _pack([c.serialize() for c in total])


def decrypt(secret: ts.Context, data: np.ndarray, lengths: np.ndarray, expect: int, size: int) -> np.ndarray:
    out = []
    for i, blob in enumerate(_unpack(data, lengths, expect, "encrypted sum")):
        try:
            out.extend(ts.ckks_vector_from(secret, blob).decrypt())
        except Exception as exc:
            raise ProtocolError(f"encrypted sum chunk {i} does not decrypt: {exc}") from None
    if len(out) != size:
        raise ProtocolError(f"encrypted sum decrypts to {len(out)} values, expected {size}")
    return np.asarray(out, dtype=np.float64)
