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

The degree above covers one event only.  :func:`graph_risk` states all three
that Bell et al. 2020 (CCS, §3–4) bound for a k-regular graph with threshold t,
a fraction γ of sites colluding with the coordinator (fixed before the graph
seed is drawn: commit-and-reveal) and a fraction δ dropping out:

* split (privacy): the honest survivors fall apart; ≤ n²·(γ+δ)^k as above;
* collusion (privacy): some site's k neighbours include ≥ t colluders, who
  with the coordinator rebuild both its self-mask seed and its mask key;
  ≤ n · P[Hypergeometric(n − 1, ⌈γn⌉, k) ≥ t] (union bound over sites);
* abort (correctness): a dropped site's k neighbours keep fewer than t
  survivors to confirm the survivor set (and to rebuild its key in server
  recovery), so the round aborts; ≤ n · P[Binomial(k, δ′) ≥ k − t + 1] with
  δ′ = δ when colluders answer (semi-honest) and γ + δ when they refuse.

Each is reported in bits (−log₂ of the bound).  With the defaults (σ = 40,
γ + δ = 0.2, t the smallest majority) the split is below 2^−40 but the other
two are much weaker at large n (about 2^−15 each at n = 1,000, k = 26, t = 14,
γ = δ = 0.1); :func:`full_parameters` gives the (k, t) that meets σ on both
privacy events and η on the abort, which costs a degree of about 4 log₂ n.
"""
from __future__ import annotations

import functools
import hashlib
import math
import random
from dataclasses import dataclass
from typing import Iterator, Mapping

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
    return HararyGraph(list(ordered), degree, seed)


class HararyGraph(Mapping[str, frozenset[str]]):
    """The graph of a round as a read-only mapping site → neighbours, each neighbourhood computed on
    first use.  Drawing the circular order is the only O(n) step (≈ 0.3 ms for 1,000 sites); a site
    asks for its own neighbourhood and those of its dropped neighbours, k names each, instead of
    building all n of them (≈ 7 ms for 1,000 sites at k = 26)."""

    def __init__(self, ordered: list[str], degree: int, seed: bytes):
        n = len(ordered)
        if len(set(ordered)) != n:
            raise ConfigError("site names in a secure-aggregation group must be distinct")
        self._names = tuple(ordered)
        self._complete = degree >= n - 1
        self._cache: dict[str, frozenset[str]] = {}
        if self._complete:
            self._members = frozenset(ordered)
            return
        if degree < 2:
            raise ConfigError(f"graph degree {degree} is too small; at least 2")
        rng = random.Random(int.from_bytes(hashlib.sha256(b"insitu-secagg-graph" + seed).digest(), "big"))
        order = list(ordered)
        rng.shuffle(order)
        self._order = order
        self._pos = {s: i for i, s in enumerate(order)}
        self._half = (degree + 1) // 2

    def __getitem__(self, site: str) -> frozenset[str]:
        got = self._cache.get(site)
        if got is None:
            if self._complete:
                if site not in self._members:
                    raise KeyError(site)
                got = self._members - {site}
            else:
                i, n, order = self._pos[site], len(self._order), self._order
                got = frozenset(order[(i + d) % n] for d in range(-self._half, self._half + 1) if d)
            self._cache[site] = got
        return got

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def _bits(p: float) -> float:
    """−log₂ p, capped at 1,000 bits (a bound of 0: the event cannot happen)."""
    return 1000.0 if p <= 0.0 else max(0.0, -math.log2(p)) if p < 1.0 else 0.0


def _hypergeom_tail(population: int, marked: int, draws: int, at_least: int) -> float:
    """P[X ≥ at_least] for X the marked items among ``draws`` drawn without replacement."""
    total = math.comb(population, draws)
    hits = sum(math.comb(marked, i) * math.comb(population - marked, draws - i) for i in range(max(at_least, 0), min(marked, draws) + 1))
    return hits / total


def _binom_tail(n: int, p: float, at_least: int) -> float:
    """P[Binomial(n, p) ≥ at_least], summed exactly (n is a graph degree: at most a few hundred)."""
    return float(sum(math.comb(n, i) * p**i * (1.0 - p) ** (n - i) for i in range(max(at_least, 0), n + 1)))


@dataclass(frozen=True)
class GraphRisk:
    """The failure bounds of one (n, k, t) under γ colluding and δ dropped sites, in bits (see module docstring)."""

    n: int
    degree: int
    threshold: int
    corrupt: float
    dropout: float
    split_bits: float  # honest survivors disconnected (privacy)
    collusion_bits: float  # a share group holding ≥ t colluders (privacy)
    abort_bits: float  # a dropped site's group left with < t survivors, colluders answering (correctness)
    abort_refusing_bits: float  # the same when colluders refuse to answer

    def summary(self) -> str:
        return (f"n={self.n} k={self.degree} t={self.threshold} γ={self.corrupt:g} δ={self.dropout:g}: split ≤ 2^-{self.split_bits:.1f}, "
                f"collusion ≤ 2^-{self.collusion_bits:.1f}, abort ≤ 2^-{self.abort_bits:.1f} (2^-{self.abort_refusing_bits:.1f} if colluders refuse)")


def graph_risk(n: int, degree: int, threshold: int, corrupt: float, dropout: float) -> GraphRisk:
    """The three failure bounds of the module docstring for ``n`` sites on this graph."""
    if n < 2:
        raise ConfigError(f"a secure-aggregation group needs at least 2 sites, got {n}")
    for name, v in (("colluding", corrupt), ("drop-out", dropout)):
        if not 0.0 <= v < 1.0:
            raise ConfigError(f"{name} fraction {v} must be in [0, 1)")
    k = min(int(degree), n - 1)
    t = int(threshold)
    if not 1 <= t <= k + 1:
        raise ConfigError(f"threshold {t} must be between 1 and the share group size {k + 1}")
    bad = corrupt + dropout
    split = 0.0 if k >= n - 1 else min(1.0, n * n * bad**k)
    colluders = math.ceil(corrupt * n)
    collusion = min(1.0, n * _hypergeom_tail(n - 1, min(colluders, n - 1), k, t))
    abort = min(1.0, n * _binom_tail(k, dropout, k - t + 1))
    abort_refusing = min(1.0, n * _binom_tail(k, min(bad, 1.0), k - t + 1))
    return GraphRisk(n, k, t, corrupt, dropout, _bits(split), _bits(collusion), _bits(abort), _bits(abort_refusing))


@functools.lru_cache(maxsize=256)
def private_degree(n: int, security_bits: int, bad_fraction: float, colluding: float, threshold: float | None = None) -> int:
    """Smallest even k meeting σ on **both** privacy events: the split (as :func:`required_degree`)
    and the collusion bound, with a fraction ``colluding`` of the ``bad_fraction`` colluding and
    the rest dropping out, at the share threshold (a fraction of the group; None: the smallest
    majority).  Capped at n − 1 (the complete graph, where collusion needs a majority of all)."""
    if not 0.0 <= colluding <= bad_fraction:
        raise ConfigError(f"colluding fraction {colluding} must be in [0, bad fraction {bad_fraction}]")
    k = required_degree(n, security_bits, bad_fraction)
    while k < n - 1:
        group = k + 1
        t = group // 2 + 1 if threshold is None else min(max(math.ceil(threshold * group), 1), group)
        if graph_risk(n, k, t, colluding, bad_fraction - colluding).collusion_bits >= security_bits:
            return k
        k += 2
    return n - 1


def full_parameters(n: int, corrupt: float, dropout: float, security_bits: int = 40, correctness_bits: int = 30) -> tuple[int, int]:
    """The smallest even k (then the smallest majority t) with split and collusion ≤ 2^−σ and abort
    (colluders refusing) ≤ 2^−η: Bell et al.'s parameter choice for this graph.  Capped at the complete graph."""
    for k in range(2, n - 1, 2):
        for t in range(k // 2 + 1, k + 2):
            r = graph_risk(n, k, t, corrupt, dropout)
            if r.abort_refusing_bits < correctness_bits:
                break  # a larger t only aborts more often
            if r.split_bits >= security_bits and r.collusion_bits >= security_bits:
                return k, t
    return n - 1, (n - 1 + 1) // 2 + 1
