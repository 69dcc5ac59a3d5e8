"""shared:F composes with secure aggregation: the masked sum over the shared subset equals the
plain sum of the sparse updates, and the masked payload shrinks by about F."""
from __future__ import annotations

import numpy as np
import pytest

from insitu.builder import build_federation
from insitu.compress import CompressionSpec
from insitu.compress.secure import SharedSubsetProtocol, compose_with_secure
from insitu.errors import ConfigError, ProtocolError
from insitu.federation.messages import Message, MessageKind
from insitu.federation.protocol import PlainSiteProtection
from insitu.federation.task import TaskSpec
from insitu.plan import Plan, ProtectionSpec

from .helpers import DIM, synthetic_sites

secure = pytest.importorskip("insitu.secure")
SECRETS = {f"site-{i}": bytes([i + 1]) * 32 for i in range(3)}


def _fed(protection: str, compression: str = "none"):
    task = TaskSpec(model="mlp", input_shape=(DIM,), num_outputs=1, schema=tuple(f"f{i}" for i in range(DIM)), lr=0.05, local_steps=3, batch_size=16)
    plan = Plan(task, protection=ProtectionSpec(protection), compression=compression, min_sites=3)
    return build_federation(plan, synthetic_sites(3), secrets=SECRETS)[0]


def test_shared_subset_secagg_matches_plain_and_shrinks_bytes():
    spec = CompressionSpec.parse("shared:0.05")
    dense = _fed("secagg")
    masked = _fed("secagg", "shared:0.05")
    plain = _fed("plain", "shared:0.05")
    r_dense, r_masked, r_plain = dense.run_round(1), masked.run_round(1), plain.run_round(1)
    # same sites, secrets and compressor: secure aggregation over the subset gives the plain result
    np.testing.assert_allclose(masked.params, plain.params, atol=1e-5)
    support = np.flatnonzero(masked.params != _fed("plain").params)
    assert len(support) <= spec.k(masked.params.shape[0])
    up_dense, up_masked = sum(r_dense.bytes_up.values()), sum(r_masked.bytes_up.values())
    assert up_masked * 5 < up_dense, (up_masked, up_dense)


def test_what_does_not_compose_is_refused():
    with pytest.raises(ConfigError, match="shared:0.01"):
        compose_with_secure(secure.SecAggProtocol(), CompressionSpec.parse("topk:0.01"))
    with pytest.raises(ConfigError, match="int8"):
        compose_with_secure(secure.SecAggProtocol(), CompressionSpec.parse("int8"))
    p = secure.SecAggProtocol()
    assert compose_with_secure(p, CompressionSpec()) is p
    assert isinstance(compose_with_secure(p, CompressionSpec.parse("shared:0.1+int8")), SharedSubsetProtocol)


def test_a_dense_update_under_a_shared_subset_is_a_protocol_fault():
    """At run time, an update with values outside the round's shared set is refused (fail closed, never
    silently dropped) as a ProtocolError: the site's reply becomes an error, the round goes on without it."""
    half = SharedSubsetProtocol.site_half(PlainSiteProtection(), CompressionSpec.parse("shared:0.1"))
    with pytest.raises(ProtocolError, match="outside round 3's shared index set"):
        half.protect(Message(MessageKind.TRAIN, 3, "job"), np.ones(100), 1.0)
