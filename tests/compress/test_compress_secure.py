"""shared:F composes with secure aggregation: the masked sum over the shared subset equals the
plain sum of the sparse updates, and the masked payload shrinks by about F."""
from __future__ import annotations

import numpy as np
import pytest

from insitu.compress import CompressionSpec, UpdateCompressor
from insitu.compress.secure import SharedSubsetProtocol, compose_with_secure
from insitu.errors import ConfigError
from insitu.federation.coordinator import Coordinator
from insitu.federation.pipeline import SitePipeline
from insitu.federation.protocol import PlainProtocol
from insitu.federation.site import Site
from insitu.federation.strategies import Strategy
from insitu.federation.task import TaskSpec
from insitu.federation.transport import InProcessTransport
from insitu.learn.models import build_model, get_flat

from .helpers import DIM, synthetic_sites

secure = pytest.importorskip("insitu.secure")


def _fed(protocol, spec: CompressionSpec | None):
    task = TaskSpec(model="mlp", input_shape=(DIM,), num_outputs=1, schema=tuple(f"f{i}" for i in range(DIM)), lr=0.05, local_steps=3, batch_size=16)
    sites = {}
    for i, sd in enumerate(synthetic_sites(3)):
        stage = None if spec is None else UpdateCompressor(spec, seed=i + 1)
        sites[sd.name] = Site(sd.name, sd, task, pipeline=SitePipeline(compress=stage, protection=protocol.site_protection(sd.name)), seed=i + 1)
    init = get_flat(build_model("mlp", (DIM,), 1, seed=0))
    return Coordinator(job="job-secure", task=task, params=init, strategy=Strategy(), transport=InProcessTransport(sites), protocol=protocol, min_sites=3)


def test_shared_subset_secagg_matches_plain_and_shrinks_bytes():
    spec = CompressionSpec.parse("shared:0.05")
    dense = _fed(secure.secure_protocol(True), None)
    masked = _fed(compose_with_secure(secure.secure_protocol(True), spec), spec)
    plain = _fed(PlainProtocol(spec), spec)
    r_dense, r_masked, r_plain = dense.run_round(1), masked.run_round(1), plain.run_round(1)
    # same sites, seeds and compressor: secure aggregation over the subset gives the plain result
    np.testing.assert_allclose(masked.params, plain.params, atol=1e-5)
    support = np.flatnonzero(masked.params != _fed(PlainProtocol(), None).params)
    assert len(support) <= spec.k(masked.params.shape[0])
    up_dense, up_masked = sum(r_dense.bytes_up.values()), sum(r_masked.bytes_up.values())
    assert up_masked * 5 < up_dense, (up_masked, up_dense)


def test_what_does_not_compose_is_refused():
    with pytest.raises(ConfigError, match="shared:0.01"):
        compose_with_secure(secure.secure_protocol(True), CompressionSpec.parse("topk:0.01"))
    with pytest.raises(ConfigError, match="int8"):
        compose_with_secure(secure.secure_protocol(True), CompressionSpec.parse("int8"))
    p = secure.secure_protocol(True)
    assert compose_with_secure(p, CompressionSpec()) is p
    assert isinstance(compose_with_secure(p, CompressionSpec.parse("shared:0.1+int8")), SharedSubsetProtocol)
