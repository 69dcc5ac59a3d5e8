"""Secure protocols inside the real round engine: heart-disease hospitals, Coordinator, Site, pipeline."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from insitu.data.heart import load_heart
from insitu.apps.simulate import SimulationConfig
from insitu.builder import build_federation, build_protocol
from insitu.errors import ConfigError, RoundAborted
from insitu.federation.messages import MessageKind
from insitu.federation.protocol import PlainProtocol
from insitu.federation.task import TaskSpec
from insitu.plan import Plan, Protection, ProtectionSpec
from insitu.secure import HEConfig, HEProtocol, HEScheme, SecAggConfig, SecAggProtocol

SECRETS = {s: bytes([i + 1]) * 32 for i, s in enumerate(("cleveland", "hungary", "switzerland", "va-long-beach"))}


@pytest.fixture(scope="module")
def heart():
    return load_heart()


class Faulty:
    """A built site whose replies of one kind pass through ``self.fault`` (None: behave)."""

    fault = None

    def __init__(self, site):
        self.site, self.site_id = site, site.site_id

    def handle(self, msg):
        reply = self.site.handle(msg)
        return self.fault(reply) if self.fault and reply.kind is not MessageKind.ERROR else reply


def _setup(heart, protocol, fail=None):
    task = TaskSpec("logreg", heart.input_shape, 1, heart.schema, lr=0.05, local_steps=5, batch_size=4)
    kind = Protection.PLAIN if isinstance(protocol, PlainProtocol) else Protection.SECAGG if isinstance(protocol, SecAggProtocol) else Protection(protocol.config.scheme.value)
    plan = Plan(task, protection=ProtectionSpec(kind), min_sites=3)
    faulty: dict[str, Faulty] = {}

    def wrap(site):
        faulty[site.site_id] = Faulty(site)
        return faulty[site.site_id]

    coord, _ = build_federation(plan, heart.sites, fail=fail, wrap=wrap, protocol=protocol, secrets=SECRETS)
    return coord, faulty


@pytest.mark.parametrize("recovery", ["server", "survivors"])
def test_secagg_round_matches_plain_round_within_fixed_point(heart, recovery):
    plain, _ = _setup(heart, PlainProtocol())
    secure, _ = _setup(heart, SecAggProtocol(SecAggConfig(recovery=recovery)))
    for r in (1, 2):
        plain.run_round(r)
        secure.run_round(r)
    assert np.max(np.abs(plain.params - secure.params)) < 1e-6


@pytest.mark.parametrize(
    "fault, match",
    [
        (lambda m: replace(m, tensors={"masked": m.tensors["masked"][:5]}) if m.kind is MessageKind.TRAIN_REPLY else m, "masked vector has shape"),
        (lambda m: replace(m, round=0) if m.kind is MessageKind.SECAGG_ADVERTISE_REPLY else m, "replayed"),
        (lambda m: replace(m, meta={**m.meta, "b": {}}) if m.kind is MessageKind.SECAGG_UNMASK_REPLY else m, "unmask reply"),
    ],
)
def test_bad_site_aborts_round_model_unchanged_next_round_runs(heart, fault, match):
    coord, sites = _setup(heart, SecAggProtocol())
    coord.run_round(1)
    before = coord.params.copy()
    sites["hungary"].fault = fault
    with pytest.raises(RoundAborted, match=f"site hungary: .*{match}.*global model is unchanged"):
        coord.run_round(2)
    np.testing.assert_array_equal(before, coord.params)
    sites["hungary"].fault = None
    rec = coord.run_round(3)
    assert len(rec.participants) == 4 and not np.array_equal(before, coord.params)


def test_drop_out_after_masking_is_recovered_in_the_engine(heart):
    coord, _ = _setup(heart, SecAggProtocol(), fail=lambda s, r, k: s == "switzerland" and k is MessageKind.TRAIN)
    plain, _ = _setup(heart, PlainProtocol(), fail=lambda s, r, k: s == "switzerland" and k is MessageKind.TRAIN)
    rec = coord.run_round(1)
    plain.run_round(1)
    assert "switzerland" not in rec.participants and "train" in rec.dropped["switzerland"]
    assert np.max(np.abs(plain.params - coord.params)) < 1e-6


def test_too_few_survivors_through_the_engine(heart):
    coord, _ = _setup(heart, SecAggProtocol(), fail=lambda s, r, k: r == 1 and s in {"hungary", "cleveland"} and k is MessageKind.TRAIN)
    before = coord.params.copy()
    with pytest.raises(RoundAborted, match="only 2 of 4"):
        coord.run_round(1)
    np.testing.assert_array_equal(before, coord.params)
    coord.run_round(2)


@pytest.mark.parametrize("scheme", [HEScheme.PAILLIER, HEScheme.CKKS])
def test_homomorphic_round_matches_plain_and_bad_ciphertext_aborts(heart, scheme):
    plain, _ = _setup(heart, PlainProtocol())
    he, sites = _setup(heart, HEProtocol(HEConfig(scheme=scheme)))
    plain.run_round(1)
    he.run_round(1)
    assert np.max(np.abs(plain.params - he.params)) < 1e-5
    before = he.params.copy()
    sites["va-long-beach"].fault = lambda m: replace(m, tensors={k: v[:-1] for k, v in m.tensors.items()}) if m.kind is MessageKind.TRAIN_REPLY else m
    with pytest.raises(RoundAborted, match="site va-long-beach"):
        he.run_round(2)
    np.testing.assert_array_equal(before, he.params)
    sites["va-long-beach"].fault = None
    he.run_round(3)
    assert not np.array_equal(before, he.params)


def test_cli_option_combinations():
    def protocol(**kw):
        cfg = SimulationConfig(**kw).resolved()
        return build_protocol(cfg.plan_for((13,), 1, tuple("abcdefghijklm")))

    assert isinstance(protocol(), PlainProtocol)
    assert isinstance(protocol(secure_aggregation=True), SecAggProtocol)
    assert protocol(homomorphic="ckks").config.scheme is HEScheme.CKKS
    with pytest.raises(ConfigError, match="choose one"):
        protocol(secure_aggregation=True, homomorphic="paillier")
    with pytest.raises(ConfigError, match="--homomorphic: unknown value 'rsa'"):
        protocol(homomorphic="rsa")
    assert protocol(secure_aggregation=True, secagg_recovery="survivors").config.recovery.value == "survivors"
    with pytest.raises(ConfigError, match="secagg_recovery: unknown value 'peers'"):
        protocol(secure_aggregation=True, secagg_recovery="peers")
    with pytest.raises(ConfigError, match="only applies with secure aggregation"):
        protocol(secagg_recovery="survivors")
