"""Aggregation maths against values computed by hand."""
from __future__ import annotations

import numpy as np
import pytest

from insitu.errors import ConfigError
from insitu.federation.protocol import AggregateResult
from insitu.federation.strategies import make_strategy


def test_weighted_mean_is_sample_weighted():
    # site A: 3 samples, update [1, 2]; site B: 1 sample, update [5, -2]
    total = 3 * np.array([1.0, 2.0]) + 1 * np.array([5.0, -2.0])
    res = AggregateResult(total, 4.0, ("a", "b"), {}, {})
    np.testing.assert_allclose(res.mean, [2.0, 1.0])


def test_fedavg_moves_by_mean_update():
    s = make_strategy("fedavg")
    out = s.apply(np.array([1.0, 1.0], dtype=np.float32), np.array([0.5, -0.25]))
    np.testing.assert_allclose(out, [1.5, 0.75])


def test_fedadam_two_steps_by_hand():
    s = make_strategy("fedadam", server_lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    x = np.zeros(1, dtype=np.float32)
    d1, d2 = 0.5, -0.2
    m1 = 0.1 * d1
    v1 = 0.99 * 1e-6 + 0.01 * d1**2
    x1 = 0.1 * m1 / (np.sqrt(v1) + 1e-3)
    m2 = 0.9 * m1 + 0.1 * d2
    v2 = 0.99 * v1 + 0.01 * d2**2
    x2 = x1 + 0.1 * m2 / (np.sqrt(v2) + 1e-3)
    x = s.apply(x, np.array([d1]))
    np.testing.assert_allclose(x, [x1], rtol=1e-5)
    x = s.apply(x, np.array([d2]))
    np.testing.assert_allclose(x, [x2], rtol=1e-5)


def test_fedyogi_and_fedadagrad_second_moment_by_hand():
    d = 0.5
    v0 = 1e-6
    yogi = make_strategy("fedyogi", server_lr=1.0, beta1=0.0, beta2=0.99, tau=1e-3)
    v_yogi = v0 - 0.01 * d**2 * np.sign(v0 - d**2)
    np.testing.assert_allclose(yogi.apply(np.zeros(1, np.float32), np.array([d])), [d / (np.sqrt(v_yogi) + 1e-3)], rtol=1e-5)
    ada = make_strategy("fedadagrad", server_lr=1.0, beta1=0.0, tau=1e-3)
    v_ada = v0 + d**2
    np.testing.assert_allclose(ada.apply(np.zeros(1, np.float32), np.array([d])), [d / (np.sqrt(v_ada) + 1e-3)], rtol=1e-5)


def test_scaffold_updates_control_by_fraction():
    s = make_strategy("scaffold")
    tensors = s.configure(1, np.zeros(2, np.float32))
    assert set(tensors) == {"control"} and tensors["control"].shape == (2,)
    out = s.apply(np.zeros(2, np.float32), np.array([1.0, 2.0, 4.0, 8.0]), fraction=0.5)
    np.testing.assert_allclose(out, [1.0, 2.0])
    np.testing.assert_allclose(s.control, [2.0, 4.0])


def test_unknown_strategy_and_option_are_named():
    with pytest.raises(ConfigError, match="'fedmagic'"):
        make_strategy("fedmagic")
    with pytest.raises(ConfigError, match="beta9"):
        make_strategy("fedadam", beta9=1)
