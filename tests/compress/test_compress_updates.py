"""Update compression: unbiased rounding, error feedback, shared index sets, exact wire codec."""
from __future__ import annotations

import numpy as np
import pytest

from insitu import compress
from insitu.compress import (
    CompressionSpec,
    Quantizer,
    Sparsifier,
    UpdateCodec,
    UpdateCompressor,
    decode_update,
    quantize_int8,
    dequantize_int8,
    shared_indices,
    stochastic_round,
)
from insitu.errors import ConfigError, ProtocolError
from insitu.federation.messages import Message, MessageKind


def _req(job: str = "job", rnd: int = 1) -> Message:
    return Message(MessageKind.TRAIN, rnd, job)


def test_public_namespace_matches_all():
    for name in compress.__all__:
        assert hasattr(compress, name), name
    public = {n for n in vars(compress) if not n.startswith("_") and not isinstance(getattr(compress, n), type(compress))}
    assert public == set(compress.__all__)


@pytest.mark.parametrize(
    "text,sp,frac,q",
    [
        ("none", Sparsifier.NONE, 1.0, Quantizer.FLOAT32),
        ("int8", Sparsifier.NONE, 1.0, Quantizer.INT8),
        ("topk:0.01", Sparsifier.TOPK, 0.01, Quantizer.FLOAT32),
        ("topk:0.01+int8", Sparsifier.TOPK, 0.01, Quantizer.INT8),
        ("int8+shared:0.05", Sparsifier.SHARED, 0.05, Quantizer.INT8),
    ],
)
def test_parse_roundtrip(text, sp, frac, q):
    spec = CompressionSpec.parse(text)
    assert (spec.sparsify, spec.fraction, spec.quantize) == (sp, frac, q)
    assert CompressionSpec.parse(str(spec)) == spec


@pytest.mark.parametrize("bad", ["topk", "topk:0", "topk:1.5", "int4", "int8+int8", "topk:0.1+shared:0.1", "topk:nan"])
def test_parse_refuses(bad):
    with pytest.raises(ConfigError):
        CompressionSpec.parse(bad)


def test_stochastic_rounding_is_unbiased():
    """Mean of 20,000 roundings of each value sits within 5 standard errors of the value;
    nearest rounding of the same values is off by up to 0.5."""
    rng = np.random.default_rng(7)
    x = np.array([0.1, 0.5, 0.9, -0.3, -2.75, 3.01])
    draws = np.stack([stochastic_round(x, rng) for _ in range(20_000)])
    assert set(np.unique(draws - np.floor(x))) <= {0.0, 1.0}
    frac = x - np.floor(x)
    se = np.sqrt(frac * (1 - frac) / draws.shape[0])
    assert np.all(np.abs(draws.mean(0) - x) < 5 * se + 1e-12)
    assert np.max(np.abs(np.rint(x) - x)) >= 0.49  # what a biased rounding would do


def test_int8_quantizer_unbiased_and_bounded():
    rng = np.random.default_rng(3)
    x = rng.normal(size=512) * 0.01
    runs = []
    for _ in range(2000):
        q, s = quantize_int8(x, 64, rng)
        assert q.dtype == np.int8 and np.all(np.abs(q.astype(int)) <= 127)
        runs.append(dequantize_int8(q, s, 64))
    runs = np.array(runs)
    step = np.repeat(s, 64)
    assert np.all(np.abs(runs - x).max(0) <= step + 1e-15)  # one grid step at most
    se = step / 2 / np.sqrt(len(runs))
    z = (runs.mean(0) - x) / np.maximum(se, 1e-30)
    assert np.mean(np.abs(z) < 4) > 0.99


def test_topk_error_feedback_keeps_residual_and_releases_it():
    spec = CompressionSpec.parse("topk:0.1")
    comp = UpdateCompressor(spec)
    rng = np.random.default_rng(0)
    x = rng.normal(size=100)
    out1 = comp.apply(x, _req(rnd=1), {})
    assert np.count_nonzero(out1) == 10
    r1 = comp.residual("job")
    np.testing.assert_allclose(out1 + r1, x)  # nothing lost: sent + kept = update
    # with zero new signal, the residual keeps leaving until all of it has been sent
    sent = out1.copy()
    for rnd in range(2, 12):
        sent += comp.apply(np.zeros(100), _req(rnd=rnd), {})
    np.testing.assert_allclose(sent, x, atol=1e-12)
    assert np.allclose(comp.residual("job"), 0)
    # residuals are per job
    assert comp.residual("other") is None


def test_without_error_feedback_signal_is_lost():
    comp = UpdateCompressor(CompressionSpec(Sparsifier.TOPK, 0.1, error_feedback=False))
    x = np.random.default_rng(0).normal(size=100)
    comp.apply(x, _req(rnd=1), {})
    assert comp.residual("job") is None
    assert not np.any(comp.apply(np.zeros(100), _req(rnd=2), {}))


def test_shared_index_set_identical_across_sites_and_varies_by_round():
    spec = CompressionSpec.parse("shared:0.05")
    rng = np.random.default_rng(1)
    outs = [UpdateCompressor(spec, seed=s).apply(rng.normal(size=1000), _req("job-a", 4), {}) for s in range(5)]
    supports = {tuple(np.flatnonzero(o)) for o in outs}
    assert len(supports) == 1 and len(next(iter(supports))) == 50
    assert np.array_equal(np.flatnonzero(outs[0]), shared_indices("job-a", 4, 1000, 50))
    assert not np.array_equal(shared_indices("job-a", 4, 1000, 50), shared_indices("job-a", 5, 1000, 50))
    assert not np.array_equal(shared_indices("job-a", 4, 1000, 50), shared_indices("job-b", 4, 1000, 50))
    idx = shared_indices("job-a", 4, 1000, 50)
    assert len(np.unique(idx)) == 50 and idx.min() >= 0 and idx.max() < 1000


def test_shared_indices_known_answer():
    """Pinned output: a change to the derivation would desynchronise sites of different versions."""
    assert shared_indices("job", 1, 20, 3).tolist() == [6, 7, 12]


@pytest.mark.parametrize("text", ["none", "int8", "topk:0.02", "topk:0.02+int8", "shared:0.02", "shared:0.02+int8"])
def test_codec_is_exact_on_compressor_output_after_weighting(text):
    spec = CompressionSpec.parse(text)
    x = np.random.default_rng(2).standard_t(3, size=5000) * 1e-3
    out = UpdateCompressor(spec, seed=9).apply(x, _req("j", 2), {})
    weighted = 137.0 * out
    meta, tensors = UpdateCodec(spec).encode(weighted, "j", 2)
    dec = decode_update(meta, tensors, 5000, "j", 2)
    np.testing.assert_allclose(dec, weighted, rtol=1e-6, atol=1e-9 * np.abs(weighted).max())
    assert np.array_equal(np.flatnonzero(dec), np.flatnonzero(weighted))


def test_shared_codec_refuses_values_outside_the_set():
    spec = CompressionSpec.parse("shared:0.01")
    with pytest.raises(ProtocolError, match="outside"):
        UpdateCodec(spec).encode(np.ones(1000), "j", 1)


def test_decoder_refuses_malformed():
    spec = CompressionSpec.parse("topk:0.1")
    meta, t = UpdateCodec(spec).encode(UpdateCompressor(spec).apply(np.arange(1.0, 101.0), _req(), {}), "job", 1)
    decode_update(meta, t, 100, "job", 1)
    with pytest.raises(ProtocolError):
        decode_update(meta, t, 50, "job", 1)  # indices past the vector
    bad = dict(t, gaps=np.concatenate([t["gaps"][:1], np.zeros(1, t["gaps"].dtype), t["gaps"][2:]]))
    with pytest.raises(ProtocolError, match="repeat"):
        decode_update(meta, bad, 100, "job", 1)
    with pytest.raises(ProtocolError, match="update encoding: unknown value"):
        decode_update({"encoding": "pickle"}, t, 100, "job", 1)
    qm, qt = UpdateCodec(CompressionSpec.parse("int8")).encode(np.ones(10), "job", 1)
    with pytest.raises(ProtocolError, match="scale"):
        decode_update(qm, dict(qt, scale=np.array([-1.0], np.float32)), 10, "job", 1)
    with pytest.raises(ProtocolError, match="-128"):
        decode_update(qm, dict(qt, q=np.full(10, -128, np.int8)), 10, "job", 1)
    with pytest.raises(ProtocolError, match="block"):
        decode_update(dict(qm, block=0), qt, 10, "job", 1)
