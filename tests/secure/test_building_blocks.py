"""Shamir sharing, fixed point, the SecAgg+ graph and parameter refusals."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from insitu.errors import ConfigError, ProtocolError
from insitu.secure import shamir
from insitu.secure.fixedpoint import FixedPoint
from insitu.secure.graph import neighbours, required_degree
from insitu.secure.secagg import SecAggConfig


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**256 - 1), st.integers(2, 9), st.data())
def test_any_threshold_subset_reconstructs(secret, n, data):
    t = data.draw(st.integers(1, n))
    shares = shamir.split(secret, t, list(range(1, n + 1)))
    subset = data.draw(st.lists(st.sampled_from(sorted(shares)), min_size=t, max_size=n, unique=True))
    assert shamir.reconstruct({x: shares[x] for x in subset}, t) == secret


def test_fewer_than_threshold_shares_refused_and_reveal_nothing_useful():
    shares = shamir.split(42, 3, [1, 2, 3, 4])
    with pytest.raises(ProtocolError, match="2 share"):
        shamir.reconstruct({1: shares[1], 2: shares[2]}, 3)
    # two shares are consistent with every secret: interpolating them gives an arbitrary value
    assert shamir.interpolate({1: shares[1], 2: shares[2]}) != 42


def test_forged_share_is_detected_and_its_sender_named():
    shares = shamir.split(123456789, 3, [1, 2, 3, 4, 5])
    forged = dict(shares)
    forged[4] = (forged[4] + 1) % shamir.PRIME
    names = {i: f"site{i}" for i in shares}
    with pytest.raises(ProtocolError, match="site4"):
        shamir.reconstruct(forged, 3, check=lambda s: s == 123456789, names=names)
    # without a check and with only t shares a forgery cannot be seen; with more it still can
    with pytest.raises(ProtocolError, match="inconsistent|forged"):
        shamir.reconstruct(forged, 3, names=names)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 300), st.integers(1, 100), st.sampled_from([32, 64]), st.integers(0, 2**32 - 1))
def test_fixed_point_sum_exact_in_ring(size, n, bits, seed):
    rng = np.random.default_rng(seed)
    fp = FixedPoint.fit(bits, 8.0, n) if bits == 64 else FixedPoint.fit(bits, 1.0, min(n, 64))
    n = n if bits == 64 else min(n, 64)
    vecs = [rng.uniform(-fp.bound, fp.bound, size) for _ in range(n)]
    acc = np.zeros(size, dtype=fp.dtype)
    for v in vecs:
        acc += fp.encode(v)
    exact = sum(np.rint(v * 2.0**fp.frac_bits).astype(np.int64) for v in vecs)
    np.testing.assert_array_equal(fp.decode(acc) * 2.0**fp.frac_bits, exact.astype(np.float64))
    assert np.max(np.abs(fp.decode(acc) - sum(vecs))) <= n * fp.resolution / 2 + 1e-12


def test_fixed_point_refuses_overflow_and_out_of_bound_values():
    with pytest.raises(ConfigError, match="could overflow"):
        FixedPoint(32, 20, 1000.0).check_headroom(100)
    with pytest.raises(ConfigError, match="fraction bits"):
        FixedPoint.fit(32, 2.0**16, 100)
    fp = FixedPoint.fit(64, 10.0, 4)
    with pytest.raises(ProtocolError, match="above the fixed-point bound"):
        fp.encode(np.array([0.0, 11.0]))
    with pytest.raises(ProtocolError, match="NaN"):
        fp.encode(np.array([np.nan]))


def test_graph_is_regular_symmetric_and_complete_when_small():
    sites = [f"s{i}" for i in range(50)]
    g = neighbours(sites, 10, b"seed")
    assert all(len(v) == 10 and s not in v for s, v in g.items())
    assert all(s in g[v] for s, vs in g.items() for v in vs)
    assert neighbours(sites, 10, b"seed") == g and neighbours(sites, 10, b"other") != g
    small = neighbours(sites[:5], 10, b"seed")
    assert all(len(v) == 4 for v in small.values())


def test_required_degree_follows_the_union_bound():
    k = required_degree(100, 40, 0.2)
    assert 100**2 * 0.2**k <= 2.0**-40 and k % 2 == 0
    assert 100**2 * 0.2 ** (k - 2) > 2.0**-40
    assert required_degree(10, 40, 0.2) == 9  # small groups: the complete graph


def test_unsafe_parameters_are_refused_with_reasons():
    with pytest.raises(ConfigError, match="not a majority"):
        SecAggConfig(threshold=0.5)
    with pytest.raises(ConfigError, match="too sparse"):
        SecAggConfig(degree=4).degree_for(100)
    with pytest.raises(ConfigError, match="minimum group"):
        SecAggConfig(min_group=1)
    with pytest.raises(ConfigError, match="ring size"):
        SecAggConfig(ring_bits=128)
    assert SecAggConfig().threshold_for(10) == 6
