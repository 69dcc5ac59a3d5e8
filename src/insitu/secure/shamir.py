"""Shamir t-of-n secret sharing over the prime field GF(2^521 − 1).

Secrets are integers below 2^512 (X25519 keys and AES seeds fit easily); share
``x``-coordinates are the parties' positive indices.  Reconstruction checks
that *every* share received lies on one polynomial of degree t − 1 and that
the secret passes the caller's check (a commitment or a public key), and
names the parties whose shares do not fit: a forged share cannot silently
change a reconstructed mask.
"""
from __future__ import annotations

import secrets as _secrets
from itertools import islice
from typing import Callable, Mapping

from insitu.errors import ProtocolError

PRIME = (1 << 521) - 1
SHARE_BYTES = 66  # ceil(521 / 8)


def split(secret: int, threshold: int, xs: list[int]) -> dict[int, int]:
    """Shares of ``secret`` at the points ``xs``; any ``threshold`` of them reconstruct it."""
    if not 0 <= secret < PRIME:
        raise ValueError("secret out of field range")
    if threshold < 1 or threshold > len(xs):
        raise ValueError(f"threshold {threshold} impossible with {len(xs)} shares")
    if len(set(xs)) != len(xs) or any(not 0 < x < PRIME for x in xs):
        raise ValueError("share points must be distinct and non-zero")
    coeffs = [secret] + [_secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    out = {}
    for x in xs:
        y = 0
        for c in reversed(coeffs):  # Horner
            y = (y * x + c) % PRIME
        out[x] = y
    return out


class _Basis:
    """Lagrange basis over fixed small-integer points, evaluated anywhere with one inversion.

    Share points are small integers, so numerators and denominators are exact integers
    (no reduction) over one common denominator; the per-point work is O(t).
    """

    def __init__(self, xs: list[int]):
        self.xs = xs
        self.dens = []
        for i, xi in enumerate(xs):
            den = 1
            for j, xj in enumerate(xs):
                if i != j:
                    den *= xi - xj
            self.dens.append(den)
        common = 1
        for d in self.dens:
            common *= d
        self.scales = [common // d for d in self.dens]
        self.inv = pow(common % PRIME, -1, PRIME)

    def evaluate(self, ys: list[int], at: int) -> int:
        if at in self.xs:
            return ys[self.xs.index(at)] % PRIME
        full = 1
        for xj in self.xs:
            full *= at - xj
        total = 0
        for xi, y, scale in zip(self.xs, ys, self.scales):
            total += y * (full // (at - xi)) * scale
        return total % PRIME * self.inv % PRIME


def interpolate(points: Mapping[int, int], at: int = 0) -> int:
    """Value at ``at`` of the unique polynomial of degree len(points) − 1 through ``points``."""
    xs = list(points)
    return _Basis(xs).evaluate([points[x] for x in xs], at)


def reconstruct(
    points: Mapping[int, int],
    threshold: int,
    *,
    check: Callable[[int], bool] | None = None,
    names: Mapping[int, str] | None = None,
    what: str = "secret",
) -> int:
    """The secret behind ``points``, after checking all of them agree.

    With more than ``threshold`` shares, one forged share is located (and named via ``names``)
    by leaving each share out in turn; otherwise the error lists every sender.
    """
    names = names or {}
    label = lambda xs: ", ".join(names.get(x, str(x)) for x in sorted(xs))  # noqa: E731
    if len(points) < threshold:
        raise ProtocolError(f"{what}: {len(points)} share(s) from [{label(points)}], threshold is {threshold}")
    pts = {int(x): int(y) % PRIME for x, y in points.items()}

    def consistent(base: dict[int, int]) -> tuple[int, list[int]] | None:
        basis = _Basis(list(base))
        ys = list(base.values())
        secret = basis.evaluate(ys, 0)
        if check is not None and not check(secret):
            return None
        bad = [x for x in pts if x not in base and basis.evaluate(ys, x) != pts[x]]
        return secret, bad

    first = dict(islice(pts.items(), threshold))
    found = consistent(first)
    if found is not None and not found[1]:
        return found[0]
    if len(pts) > threshold:
        for drop in pts:
            rest = {x: y for x, y in pts.items() if x != drop}
            found = consistent(dict(islice(rest.items(), threshold)))
            if found is not None and found[1]:
                raise ProtocolError(f"{what}: forged or inconsistent share(s) from {label(found[1])}")
    raise ProtocolError(f"{what}: shares from [{label(pts)}] are inconsistent (forged share, could not tell which)")


def to_bytes(y: int) -> bytes:
    return int(y).to_bytes(SHARE_BYTES, "big")


def from_bytes(b: bytes) -> int:
    if len(b) != SHARE_BYTES:
        raise ProtocolError(f"a share is {SHARE_BYTES} bytes, got {len(b)}")
    y = int.from_bytes(b, "big")
    if y >= PRIME:
        raise ProtocolError("share value is outside the field")
    return y
