"""The degree formula and the failure bounds of the sparse graph (Bell et al. 2020), checked against
independent arithmetic and against graphs actually drawn by ``neighbour_map``: a bound that is
too small (a dropped union factor, a wrong tail) is beaten by the simulated frequency."""
from __future__ import annotations

import math
import random
from collections import deque

import pytest

from insitu.errors import ConfigError
from insitu.secure import SecAggConfig
from insitu.secure.graph import full_parameters, graph_risk, neighbour_map, required_degree


def test_degree_formula_is_the_split_union_bound():
    """k is the smallest even number with n²·β^k ≤ 2^−σ; graph_risk reports that same bound."""
    for n, sigma, beta in ((1000, 40, 0.2), (300, 40, 0.2), (10_000, 40, 0.15), (1000, 30, 0.3)):
        k = required_degree(n, sigma, beta)
        assert k % 2 == 0 and n * n * beta**k <= 2.0**-sigma < n * n * beta ** (k - 2)
        r = graph_risk(n, k, k // 2 + 1, beta / 2, beta / 2)
        assert r.split_bits == pytest.approx(-math.log2(n * n * beta**k))
    assert required_degree(1000, 40, 0.2) == 26


def test_the_split_degree_alone_leaves_the_collusion_event_weak_at_1000_sites():
    """Why the default degree is not the split's: at k = 26 a share group holds a threshold of colluders far too often."""
    k, t = 26, 14
    r = graph_risk(1000, k, t, 0.1, 0.1)
    assert r.split_bits >= 40
    assert 15 < r.collusion_bits < 17  # 1,000 · P[Hypergeometric(999, 100, 26) ≥ 14]
    expected = 1000 * sum(math.comb(100, i) * math.comb(899, 26 - i) for i in range(14, 27)) / math.comb(999, 26)
    assert r.collusion_bits == pytest.approx(-math.log2(expected))
    assert 11 < r.abort_bits < 13  # 1,000 · P[Binomial(26, 0.1) ≥ 13]
    assert r.abort_refusing_bits < 2  # colluders that refuse to answer can abort a 1,000-site round


def test_the_default_degree_meets_both_privacy_events_and_is_minimal():
    """Secure by default: k is the least even degree with split and collusion ≤ 2^−40 at 10 % colluding + 10 % dropping."""
    cfg = SecAggConfig()
    for n, want in ((100, 24), (300, 42), (1000, 54), (10_000, 64)):
        k = cfg.degree_for(n)
        t = cfg.threshold_for(k + 1)
        r = graph_risk(n, k, t, 0.1, 0.1)
        assert k == want and r.split_bits >= 40 and r.collusion_bits >= 40, r.summary()
        if k - 2 >= required_degree(n, 40, 0.2):
            assert graph_risk(n, k - 2, cfg.threshold_for(k - 1), 0.1, 0.1).collusion_bits < 40  # two fewer neighbours fail
    assert cfg.degree_for(20) == 19  # small consortia: the complete graph
    with pytest.raises(ConfigError, match="too sparse for 1000 sites"):
        SecAggConfig(degree=26).degree_for(1000)


def test_full_parameters_meet_both_privacy_targets_and_the_abort_target_and_are_minimal():
    for n, g, d in ((1000, 0.05, 0.1), (300, 0.1, 0.1)):
        k, t = full_parameters(n, g, d)
        r = graph_risk(n, k, t, g, d)
        assert r.split_bits >= 40 and r.collusion_bits >= 40 and r.abort_refusing_bits >= 30 and 2 * t > k + 1
        for tt in range((k - 2) // 2 + 1, k):  # two fewer neighbours: no threshold meets all three
            s = graph_risk(n, k - 2, tt, g, d)
            assert not (s.split_bits >= 40 and s.collusion_bits >= 40 and s.abort_refusing_bits >= 30)
    assert full_parameters(1000, 0.05, 0.1) == (76, 39)
    assert full_parameters(50, 0.1, 0.1)[0] == 49  # small groups: the complete graph


def _connected(nodes: set[str], graph) -> bool:
    if not nodes:
        return True
    start = next(iter(nodes))
    seen, todo = {start}, deque([start])
    while todo:
        for w in graph[todo.popleft()]:
            if w in nodes and w not in seen:
                seen.add(w)
                todo.append(w)
    return seen == nodes


def test_bounds_hold_on_graphs_drawn_by_the_protocol():
    """Draw graphs the way a round does (fresh seed, colluders and drop-outs fixed independently of
    it) and count each event; its frequency must stay below the bound.  Parameters are chosen so that
    the events do happen: a bound off by the union factor n would be beaten."""
    rng = random.Random(7)
    sites = tuple(f"s{i:03d}" for i in range(60))
    trials = 400
    k, t, g = 8, 5, 0.2
    risk = graph_risk(60, k, t, g, 0.1)
    abort_k, abort_t, abort_d = 10, 6, 0.15
    abort_risk = graph_risk(60, abort_k, abort_t, g, abort_d)
    split_k, split_beta = 4, 0.1
    split_risk = graph_risk(60, split_k, split_k // 2 + 1, split_beta, 0.0)
    collusion = abort = split = 0
    for i in range(trials):
        seed = rng.randbytes(16)
        graph = neighbour_map(sites, k, seed)
        bad = set(rng.sample(sites, math.ceil(g * 60)))
        collusion += any(len(graph[s] & bad) >= t for s in sites if s not in bad)
        gone = {s for s in sites if rng.random() < abort_d}
        wide = neighbour_map(sites, abort_k, seed)
        abort += any(len(wide[v] & gone) >= abort_k - abort_t + 1 for v in gone)
        sparse = neighbour_map(sites, split_k, seed)
        bad_split = set(rng.sample(sites, int(split_beta * 60)))
        split += not _connected(set(sites) - bad_split, sparse)
    for name, count, bits in (("collusion", collusion, risk.collusion_bits), ("abort", abort, abort_risk.abort_bits), ("split", split, split_risk.split_bits)):
        freq, bound = count / trials, 2.0**-bits
        assert bits > 0.5, f"{name}: a vacuous bound checks nothing"
        assert count > 0, f"{name}: the parameters must make the event happen for the check to mean anything"
        assert freq <= bound + 3 * math.sqrt(bound * (1 - min(bound, 1.0)) / trials), f"{name}: frequency {freq} above the bound {bound}"


def test_bad_risk_parameters_are_refused_with_the_value():
    with pytest.raises(ConfigError, match="colluding fraction 1.5"):
        graph_risk(100, 10, 6, 1.5, 0.1)
    with pytest.raises(ConfigError, match="threshold 30"):
        graph_risk(100, 10, 30, 0.1, 0.1)


def test_the_graph_is_symmetric_and_k_regular_computed_lazily_per_site():
    """Neighbourhoods are computed on first use (a site needs its own and its dropped neighbours'),
    and they form the same symmetric k-regular graph for every party of the round."""
    sites = tuple(f"s{i:04d}" for i in range(1000))
    g = neighbour_map(sites, 26, b"round seed")
    first = g["s0007"]
    assert len(first) == 26 and "s0007" not in first and g["s0007"] is first  # cached
    assert all(len(g[s]) == 26 and all(s in g[v] for v in g[s]) for s in sites)
    assert list(g) == list(sites) and len(g) == 1000
    with pytest.raises(KeyError):
        g["nobody"]
    small = neighbour_map(sites[:5], 26, b"round seed")  # complete
    assert small["s0002"] == frozenset(sites[:5]) - {"s0002"}
