"""Compression through the real round engine: bytes counted by the transport go down, the
coordinator reconstructs what the sites meant to send, and training still learns."""
from __future__ import annotations

import numpy as np

from insitu.compress import CompressionSpec

from .helpers import federation


def _round_bytes(text: str, rounds: int = 2) -> tuple[int, object]:
    coord, _ = federation(CompressionSpec.parse(text))
    up = 0
    for r in range(1, rounds + 1):
        rec = coord.run_round(r)
        assert not rec.dropped, rec.dropped
        up += sum(rec.bytes_up.values())
    return up // rounds, coord


def test_bytes_on_the_wire_shrink():
    dense, _ = _round_bytes("none")
    ratios = {t: dense / _round_bytes(t)[0] for t in ("int8", "topk:0.01", "topk:0.01+int8", "shared:0.01+int8")}
    assert 3.5 < ratios["int8"] < 4.1
    assert ratios["topk:0.01"] > 10
    assert ratios["topk:0.01+int8"] > 20
    assert ratios["shared:0.01+int8"] > ratios["topk:0.01+int8"]  # no indices on the wire


def test_coordinator_sum_equals_sum_of_site_outputs():
    """The coordinator's aggregate equals what the sites' compressors produced (codec is exact)."""
    spec = CompressionSpec.parse("topk:0.05+int8")
    coord, sites = federation(spec)
    before = coord.params.copy()
    seen = {}
    for sid, site in sites.items():
        stage = site.pipeline.compress
        orig = stage.apply

        def spy(vec, request, info, _orig=orig, _sid=sid):
            out = _orig(vec, request, info)
            seen[_sid] = out * float(sites[_sid].data.n_train)
            return out

        stage.apply = spy
    coord.run_round(1)
    expected = sum(seen.values()) / sum(s.data.n_train for s in sites.values())
    np.testing.assert_allclose(coord.params.astype(np.float64) - before, expected, atol=2e-6)


def _accuracy_after(text: str, rounds: int) -> tuple[float, float]:
    coord, _ = federation(CompressionSpec.parse(text), model="logreg")
    acc0 = float(np.mean([e["accuracy"] for e in coord.evaluate(0).values()]))
    for r in range(1, rounds + 1):
        coord.run_round(r)
    return acc0, float(np.mean([e["accuracy"] for e in coord.evaluate(rounds + 1).values()]))


def test_compressed_training_still_learns():
    """Same seeds, same data: compressed runs end within 8 points of the dense run and well
    above the starting model (random-k with error feedback learns slowest, as expected)."""
    acc0, dense = _accuracy_after("none", 10)
    assert dense > acc0 + 0.1
    for text in ("int8", "topk:0.05+int8", "shared:0.2+int8"):
        _, acc = _accuracy_after(text, 10)
        assert acc > acc0 + 0.1 and acc >= dense - 0.08, (text, acc0, acc, dense)
