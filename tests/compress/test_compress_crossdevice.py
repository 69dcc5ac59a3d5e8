"""Cross-device mode: many devices, a fresh sample each round, through the same round engine."""
from __future__ import annotations

import numpy as np

from insitu.compress.crossdevice import CrossDeviceConfig, cross_device, wearable_population


def test_population_is_heterogeneous_and_labelled():
    pop = wearable_population(50, seed=1)
    assert len(pop.sites) == 50 and pop.input_shape == (8,) and pop.info["synthetic"]
    prev = [float(s.y_train.mean()) for s in pop.sites]
    assert 0.05 < np.mean(prev) < 0.5 and np.std(prev) > 0.03  # prevalence differs per person
    assert len({s.n_train for s in pop.sites}) > 5


def test_sampling_offline_and_bytes_per_device():
    cfg = CrossDeviceConfig(devices=80, fraction=0.1, rounds=4, local_steps=3, offline=0.25, eval_devices=40, seed=3)
    dense = cross_device(cfg)
    assert dense["devices_per_round"] == 8
    rounds = dense["rounds"]
    assert all(r["sampled"] == 8 and r["completed"] + r["offline"] == 8 for r in rounds)
    assert sum(r["offline"] for r in rounds) > 0  # some sampled phones did not answer
    small = cross_device(CrossDeviceConfig(**{**cfg.__dict__, "compress": "topk:0.1+int8"}))
    # the model is tiny (321 parameters), so the message header is a large share of each upload
    assert small["final"]["bytes_up_per_device_round"] < 0.5 * dense["final"]["bytes_up_per_device_round"]


def test_cross_device_learns():
    s = cross_device(CrossDeviceConfig(devices=120, fraction=0.25, rounds=8, local_steps=10, lr=0.1, offline=0.0, eval_devices=60, seed=0))
    majority = 1 - np.mean([float(d.y_test.mean()) for d in wearable_population(120, seed=0).sites])
    assert s["final"]["accuracy"] > majority + 0.05, (s["final"]["accuracy"], majority)


def test_devices_are_made_only_when_asked_and_drawn_alike_alone_or_all_at_once():
    from insitu.compress.crossdevice import WearablePopulation

    pop, eager = WearablePopulation(60, seed=2), wearable_population(60, seed=2)
    for d in (0, 17, 59):
        a, b = pop[d], eager.sites[d]
        assert a.name == b.name and np.array_equal(a.X_train.numpy(), b.X_train.numpy()) and np.array_equal(a.y_test.numpy(), b.y_test.numpy())
    # a population far larger than the run asks for: only sampled and evaluated devices ever exist
    s = cross_device(CrossDeviceConfig(devices=200_000, fraction=0.0002, rounds=3, local_steps=2, offline=0.0, eval_devices=15, seed=1))
    assert s["devices_per_round"] == 40 and s["data"]["devices"] == 200_000
    assert s["final"]["devices_made"] == 3 * 40 + 15
    assert s["final"]["setup_seconds"] < 5.0  # nothing per device before the first round


def test_given_data_and_drawn_population_run_the_same_federation():
    """Same devices, same samples, same offline devices; training differs only by each device's own secret."""
    cfg = CrossDeviceConfig(devices=50, fraction=0.2, rounds=3, local_steps=2, offline=0.2, eval_devices=20, seed=4, compress="topk:0.2")
    a = cross_device(cfg)
    b = cross_device(cfg, data=wearable_population(50, seed=4))
    assert [(r["completed"], r["offline"]) for r in a["rounds"]] == [(r["completed"], r["offline"]) for r in b["rounds"]]
    assert a["final"]["eval_records"] == b["final"]["eval_records"] and a["final"]["devices_made"] == b["final"]["devices_made"] == 3 * 10 + 20
