"""Secure protocols inside the real round engine: heart-disease hospitals, Coordinator, Site, pipeline."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from insitu.data.heart import load_heart
from insitu.errors import ConfigError, RoundAborted
from insitu.federation.coordinator import Coordinator
from insitu.federation.messages import MessageKind
from insitu.federation.pipeline import SitePipeline
from insitu.federation.protocol import PlainProtocol
from insitu.federation.site import Site
from insitu.federation.strategies import make_strategy
from insitu.federation.task import TaskSpec
from insitu.federation.transport import InProcessTransport
from insitu.learn.models import build_model, get_flat
from insitu.secure import HEConfig, HEProtocol, HEScheme, SecAggConfig, SecAggProtocol, secure_protocol


@pytest.fixture(scope="module")
def heart():
    return load_heart()


class Faulty(Site):
    """A site whose replies of one kind pass through ``self.fault`` (None: behave)."""

    fault = None

    def handle(self, msg):
        reply = super().handle(msg)
        return self.fault(reply) if self.fault and reply.kind is not MessageKind.ERROR else reply


def _setup(heart, protocol, fail=None):
    task = TaskSpec("logreg", heart.input_shape, 1, heart.schema, lr=0.05, local_steps=5, batch_size=4)
    sites = {s.name: Faulty(s.name, s, task, pipeline=SitePipeline(protection=protocol.site_protection(s.name)), seed=i) for i, s in enumerate(heart.sites)}
    coord = Coordinator("job", task, get_flat(build_model("logreg", (13,), 1)), make_strategy("fedavg"), InProcessTransport(sites, fail=fail), protocol=protocol, min_sites=3)
    return coord, sites


@pytest.mark.parametrize("recovery", ["server", "survivors"])
def test_secagg_round_matches_plain_round_within_fixed_point(heart, recovery):
    plain, _ = _setup(heart, PlainProtocol())
    secure, _ = _setup(heart, secure_protocol(True, secagg_recovery=recovery))
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
    assert secure_protocol() is None
    assert isinstance(secure_protocol(secure_aggregation=True), SecAggProtocol)
    assert secure_protocol(homomorphic="ckks").config.scheme is HEScheme.CKKS
    with pytest.raises(ConfigError, match="choose one"):
        secure_protocol(True, "paillier")
    with pytest.raises(ConfigError, match="unknown --homomorphic"):
        secure_protocol(False, "rsa")
    assert secure_protocol(True, secagg_recovery="survivors").config.recovery.value == "survivors"
    with pytest.raises(ConfigError, match="unknown --secagg-recovery 'peers'"):
        secure_protocol(True, secagg_recovery="peers")
    with pytest.raises(ConfigError, match="only applies with --secure-aggregation"):
        secure_protocol(False, secagg_recovery="survivors")
