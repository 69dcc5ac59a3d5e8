"""Fixed-point encoding of real vectors into the ring Z_2^k, with the headroom checked.

A value v becomes round(v · 2^f) mod 2^k.  Summing n encoded vectors in the ring
gives the encoding of the exact sum of the rounded values *provided* the true
sum never leaves (−2^(k−1), 2^(k−1)).  That is guaranteed, not hoped for, by
the check ``n · bound · 2^f < 2^(k−1)``: every site refuses a coordinate above
``bound`` and the coordinator refuses a configuration that could wrap.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from insitu.errors import ConfigError, ProtocolError

MIN_FRAC_BITS = 10


@dataclass(frozen=True)
class FixedPoint:
    ring_bits: int  # k: arithmetic modulo 2^k
    frac_bits: int  # f: resolution 2^-f
    bound: float  # every encoded |value| must stay ≤ bound

    def __post_init__(self) -> None:
        if not 16 <= self.ring_bits <= 64:
            raise ConfigError(f"ring size {self.ring_bits} bits is not supported; use 32 or 64 (16–64 allowed)")
        if not (self.bound > 0 and math.isfinite(self.bound)):
            raise ConfigError(f"fixed-point bound {self.bound!r} must be a positive number")
        if self.frac_bits < 0:
            raise ConfigError(f"fixed-point fraction bits {self.frac_bits} must be ≥ 0")

    @classmethod
    def fit(cls, ring_bits: int, bound: float, n_parties: int, frac_bits: int | None = None) -> "FixedPoint":
        """The finest encoding whose sum over ``n_parties`` cannot wrap (or check a given ``frac_bits``)."""
        if n_parties < 1:
            raise ConfigError(f"fixed point needs at least one party, got {n_parties}")
        room = ring_bits - 1 - math.log2(n_parties) - math.log2(bound)
        best = math.floor(room)
        if n_parties * bound * 2.0 ** best >= 2.0 ** (ring_bits - 1):
            best -= 1
        if frac_bits is None:
            frac_bits = min(best, 52)
        fp = cls(ring_bits, frac_bits, bound)
        fp.check_headroom(n_parties)
        return fp

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.uint32 if self.ring_bits <= 32 else np.uint64)

    @property
    def mask(self) -> int:
        return (1 << self.ring_bits) - 1

    @property
    def resolution(self) -> float:
        return 2.0 ** -self.frac_bits

    def check_headroom(self, n_parties: int) -> None:
        """ConfigError unless the sum of ``n_parties`` encoded vectors provably cannot wrap."""
        worst = n_parties * self.bound * 2.0 ** self.frac_bits
        if worst >= 2.0 ** (self.ring_bits - 1):
            raise ConfigError(
                f"fixed point could overflow: {n_parties} sites × bound {self.bound:g} × 2^{self.frac_bits} = {worst:.3g} "
                f"≥ 2^{self.ring_bits - 1}; use a 64-bit ring, fewer fraction bits or a smaller --secagg-bound"
            )
        if self.frac_bits < MIN_FRAC_BITS:
            raise ConfigError(
                f"fixed point keeps only {self.frac_bits} fraction bits (resolution {self.resolution:g}) for {n_parties} sites "
                f"with bound {self.bound:g} in a {self.ring_bits}-bit ring; need ≥ {MIN_FRAC_BITS}: use a 64-bit ring or a smaller bound"
            )

    def encode(self, vec: np.ndarray, what: str = "update", tail: tuple[float, ...] = ()) -> np.ndarray:
        """round(v·2^f) mod 2^k; a value beyond ``bound`` (or NaN) is refused, never clipped silently.

        ``tail`` values (e.g. the weight) are encoded after ``vec`` into the same array, so the
        caller does not copy the vector to append them."""
        v = np.asarray(vec, dtype=np.float64).ravel()
        if tail:
            t = np.asarray(tail, dtype=np.float64)
            lo, hi = (min(float(v.min()), float(t.min())), max(float(v.max()), float(t.max()))) if v.size else (float(t.min()), float(t.max()))
        else:
            lo, hi = (float(v.min()), float(v.max())) if v.size else (0.0, 0.0)
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ProtocolError(f"{what} holds NaN or infinite values; it cannot be encoded")
        peak = max(-lo, hi)
        if peak > self.bound:
            raise ProtocolError(
                f"{what} has a coordinate above the fixed-point bound {self.bound:g} (its size is not named: a site's "
                "update is what the protection hides); clip updates (client-level DP clipping) or raise the bound"
            )
        x = v * 2.0**self.frac_bits
        np.rint(x, out=x)
        # |x| < 2^(k-1) by the headroom check, so the signed cast is exact; its two's complement is x mod 2^k
        signed = np.empty(v.size + len(tail), dtype=np.int32 if self.ring_bits <= 32 else np.int64)
        signed[: v.size] = x
        if tail:
            signed[v.size :] = np.rint(t * 2.0**self.frac_bits)
        out = signed.view(np.uint32 if self.ring_bits <= 32 else np.uint64)
        if self.ring_bits not in (32, 64):
            out = out & self.dtype.type(self.mask)
        return out

    def decode(self, ring: np.ndarray) -> np.ndarray:
        """Ring elements back to reals (two's complement in k bits)."""
        ring = np.asarray(ring)
        if self.ring_bits == 32 and ring.dtype == np.uint32:
            return ring.view(np.int32).astype(np.float64) / 2.0**self.frac_bits
        if self.ring_bits == 64 and ring.dtype == np.uint64:
            return ring.view(np.int64).astype(np.float64) / 2.0**self.frac_bits
        u = ring.astype(np.uint64) & np.uint64(self.mask)
        if self.ring_bits < 64:
            signed = u.astype(np.int64)
            signed = np.where(signed >= (1 << (self.ring_bits - 1)), signed - (1 << self.ring_bits), signed)
        else:
            signed = u.view(np.int64)
        return signed.astype(np.float64) / 2.0 ** self.frac_bits

    def reduce(self, arr: np.ndarray) -> np.ndarray:
        """Bring a uint array accumulated in its dtype back into Z_2^k."""
        if self.ring_bits in (32, 64):
            return arr
        return (arr & self.dtype.type(self.mask)).astype(self.dtype)
