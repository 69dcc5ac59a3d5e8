"""The sparse neighbour graph of SecAgg+ (Bell et al. 2020) and the degree it needs.

Sites are placed on a circle in an order drawn from a per-round seed, and each
is joined to the k/2 sites on either side (a Harary graph H(k, n), which is
k-connected).  A site masks with, and secret-shares to, its k neighbours only,
so the work per site grows with k = O(log n) rather than n.

How large must k be?  The coordinator learns one site's update only if the
honest surviving sites split into two groups with no edge between them.  On
this circle that needs two runs of k/2 consecutive "bad" sites (corrupted or
dropped out).  With a bad fraction β and a uniformly random placement, a union
bound over the ≤ n² pairs of run positions gives

    P[split] ≤ n² · β^k,   so we require   k ≥ (σ + 2·log₂ n) / log₂(1/β)

for a statistical security level of σ bits.  This is our conservative bound
for this construction (Bell et al. prove an O(log n) degree; we do not use
their constants).  When k ≥ n − 1 the graph is complete: plain Bonawitz et al.
"""
from __future__ import annotations

import functools
import hashlib
import math
import random
from types import MappingProxyType
from typing import Mapping

from insitu.errors import ConfigError


def required_degree(n: int, security_bits: int, bad_fraction: float) -> int:
    """Smallest even k that meets the bound above (capped at n − 1: the complete graph)."""
    if n < 2:
        return max(0, n - 1)
    if not 0.0 < bad_fraction < 0.5:
        raise ConfigError(f"bad fraction (corrupted + dropped sites) {bad_fraction} must be in (0, 0.5)")
    if security_bits < 1:
        raise ConfigError(f"security level {security_bits} bits must be positive")
    k = math.ceil((security_bits + 2 * math.log2(n)) / math.log2(1 / bad_fraction))
    k += k % 2
    return min(k, n - 1)


def neighbours(sites: tuple[str, ...] | list[str], degree: int, seed: bytes) -> dict[str, frozenset[str]]:
    """The Harary graph over ``sites`` in the order drawn from ``seed``; complete when degree ≥ n − 1."""
    return dict(neighbour_map(tuple(sorted(sites)), int(degree), bytes(seed)))


@functools.lru_cache(maxsize=64)
def neighbour_map(ordered: tuple[str, ...], degree: int, seed: bytes) -> Mapping[str, frozenset[str]]:
    """:func:`neighbours` for sites already in sorted order, read-only and cached: every party of a
    round (in one process, all of them) derives the same graph once."""
    if list(ordered) != sorted(ordered):
        raise ConfigError("neighbour_map needs the sites in sorted order")
    return MappingProxyType(_build(list(ordered), degree, seed))


def _build(ordered: list[str], degree: int, seed: bytes) -> dict[str, frozenset[str]]:
    n = len(ordered)
    if len(set(ordered)) != n:
        raise ConfigError("site names in a secure-aggregation group must be distinct")
    if degree >= n - 1:
        return {s: frozenset(o for o in ordered if o != s) for s in ordered}
    if degree < 2:
        raise ConfigError(f"graph degree {degree} is too small; at least 2")
    rng = random.Random(int.from_bytes(hashlib.sha256(b"insitu-secagg-graph" + seed).digest(), "big"))
    order = ordered[:]
    rng.shuffle(order)
    half = (degree + 1) // 2
    out: dict[str, set[str]] = {s: set() for s in ordered}
    for i, s in enumerate(order):
        for d in range(1, half + 1):
            for j in (i + d, i - d):
                out[s].add(order[j % n])
    return {s: frozenset(v) for s, v in out.items()}
