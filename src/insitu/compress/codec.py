"""Wire formats for a compressed update inside a TRAIN_REPLY, and their strict decoders.

A reply names its format in ``meta["encoding"]`` (a member of the closed
:class:`Encoding` registry; a reply without the field is the plain dense float32
``update`` tensor, so the uncompressed path is unchanged).  The transport counts
the bytes of the encoded message, so what is saved here is what a deployment saves.

==============  ==========================================  ====================
encoding        tensors                                     bytes per value
==============  ==========================================  ====================
(none)          update f4[n]                                4
dense_i8        q i1[n], scale f4[⌈n/block⌉]                ≈ 1.016
sparse_f32      gaps u1/u2/u4[nnz], values f4[nnz]          2 + 4 (per kept)
sparse_i8       gaps u1/u2/u4[nnz], q i1[nnz], scale f4[1]  2 + 1 (per kept)
shared_f32      values f4[k]                                4 (per kept)
shared_i8       q i1[k], scale f4[⌈k/block⌉]                ≈ 1 (per kept)
==============  ==========================================  ====================

Indices of a sparse update are *delta-encoded*: sorted, sent as the gaps
between neighbours in the narrowest unsigned type that holds the largest gap
(u2 for any model whose kept coordinates are under 65,536 apart).  Shared-index
updates send no indices at all: both ends derive them from (job, round).

The encoder is deterministic and exact on what :class:`UpdateCompressor`
produces, even after the pipeline multiplies it by the site's weight: every
int8 block's extreme sits exactly at ±127, so re-deriving the scale from the
weighted values recovers the same integers.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from insitu.compress.updates import (
    QMAX,
    CompressionSpec,
    Quantizer,
    Sparsifier,
    dequantize_int8,
    quantize_int8,
    shared_indices,
)
from insitu.errors import ProtocolError, parse_choice


class Encoding(str, enum.Enum):
    DENSE_F32 = "dense_f32"
    DENSE_I8 = "dense_i8"
    SPARSE_F32 = "sparse_f32"
    SPARSE_I8 = "sparse_i8"
    SHARED_F32 = "shared_f32"
    SHARED_I8 = "shared_i8"


_ENCODING = {
    (Sparsifier.NONE, Quantizer.FLOAT32): Encoding.DENSE_F32,
    (Sparsifier.NONE, Quantizer.INT8): Encoding.DENSE_I8,
    (Sparsifier.TOPK, Quantizer.FLOAT32): Encoding.SPARSE_F32,
    (Sparsifier.TOPK, Quantizer.INT8): Encoding.SPARSE_I8,
    (Sparsifier.SHARED, Quantizer.FLOAT32): Encoding.SHARED_F32,
    (Sparsifier.SHARED, Quantizer.INT8): Encoding.SHARED_I8,
}

_GAP_DTYPES = (np.dtype("|u1"), np.dtype("<u2"), np.dtype("<u4"), np.dtype("<u8"))
MAX_BLOCK = 1 << 20


def _gaps(idx: np.ndarray) -> np.ndarray:
    gaps = np.diff(idx.astype(np.int64), prepend=0)
    top = int(gaps.max()) if gaps.size else 0
    for dt in _GAP_DTYPES:
        if top <= np.iinfo(dt).max:
            return gaps.astype(dt)
    raise ProtocolError(f"index gap {top} does not fit 64 bits")  # unreachable for numpy sizes


@dataclass(frozen=True)
class UpdateCodec:
    """Encodes the weighted update a site sends; ``decode_update`` is its inverse."""

    spec: CompressionSpec = CompressionSpec()

    @property
    def encoding(self) -> Encoding:
        return _ENCODING[(self.spec.sparsify, self.spec.quantize)]

    def encode(self, vec: np.ndarray, job: str, round_: int) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        x = np.asarray(vec, dtype=np.float64).reshape(-1)
        enc, n = self.encoding, x.shape[0]
        if enc is Encoding.DENSE_F32:
            return {}, {"update": x.astype(np.float32)}
        if enc is Encoding.DENSE_I8:
            q, s = quantize_int8(x, self.spec.block, None)
            return {"encoding": enc.value, "block": self.spec.block}, {"q": q, "scale": s}
        if enc in (Encoding.SPARSE_F32, Encoding.SPARSE_I8):
            idx = np.flatnonzero(x)
            vals = x[idx]
            if enc is Encoding.SPARSE_F32:
                return {"encoding": enc.value}, {"gaps": _gaps(idx), "values": vals.astype(np.float32)}
            q, s = quantize_int8(vals, max(1, vals.shape[0]), None)
            return {"encoding": enc.value}, {"gaps": _gaps(idx), "q": q, "scale": s[:1] if s.size else np.zeros(1, np.float32)}
        k = self.spec.k(n)
        idx = shared_indices(job, round_, n, k)
        outside = np.count_nonzero(x) - np.count_nonzero(x[idx])
        if outside:
            # the pipeline's compress stage must have used the same shared set; fail closed rather than drop signal
            raise ProtocolError(
                f"update has {outside} nonzero values outside round {round_}'s shared index set; "
                "the site pipeline needs the matching shared:F compress stage"
            )
        vals = x[idx]
        if enc is Encoding.SHARED_F32:
            return {"encoding": enc.value, "k": k}, {"values": vals.astype(np.float32)}
        q, s = quantize_int8(vals, self.spec.block, None)
        return {"encoding": enc.value, "k": k, "block": self.spec.block}, {"q": q, "scale": s}


def _int(meta: Mapping[str, Any], key: str, lo: int, hi: int) -> int:
    v = meta.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise ProtocolError(f"compressed update field {key!r} = {v!r} is not an integer in [{lo}, {hi}]")
    return v


def _tensor(tensors: Mapping[str, np.ndarray], name: str, dtypes: tuple[str, ...], length: int | None = None) -> np.ndarray:
    if name not in tensors:
        raise ProtocolError(f"compressed update lacks tensor {name!r} (has {sorted(tensors)})")
    a = tensors[name]
    if a.ndim != 1 or a.dtype.str not in dtypes:
        raise ProtocolError(f"compressed update tensor {name!r} is {a.dtype.str}{list(a.shape)}, expected 1-D {dtypes}")
    if length is not None and a.shape[0] != length:
        raise ProtocolError(f"compressed update tensor {name!r} has {a.shape[0]} values, expected {length}")
    return a


def _scales(tensors: Mapping[str, np.ndarray], length: int) -> np.ndarray:
    s = _tensor(tensors, "scale", ("<f4",), length)
    if not np.all(np.isfinite(s)) or np.any(s < 0):
        raise ProtocolError("compressed update carries a negative or non-finite quantization scale")
    return s


def _int8(tensors: Mapping[str, np.ndarray], length: int) -> np.ndarray:
    q = _tensor(tensors, "q", ("|i1",), length)
    if np.any(q == -128):
        raise ProtocolError(f"int8 update holds -128; the symmetric range is [-{QMAX}, {QMAX}]")
    return q


def _indices(tensors: Mapping[str, np.ndarray], size: int) -> np.ndarray:
    gaps = _tensor(tensors, "gaps", tuple(dt.str for dt in _GAP_DTYPES))
    if gaps.shape[0] > size:
        raise ProtocolError(f"sparse update lists {gaps.shape[0]} indices for a vector of {size}")
    if gaps.size and (np.any(gaps[1:] == 0) or int(gaps.max()) >= max(1, size)):
        raise ProtocolError("sparse update indices repeat or run past the vector")
    idx = np.cumsum(gaps.astype(np.uint64)).astype(np.int64)
    if idx.size and int(idx[-1]) >= size:
        raise ProtocolError(f"sparse update index {int(idx[-1])} is outside a vector of {size}")
    return idx


def decode_update(meta: Mapping[str, Any], tensors: Mapping[str, np.ndarray], size: int, job: str, round_: int) -> np.ndarray:
    """The dense float64 vector a TRAIN_REPLY carries; every malformation is a ProtocolError."""
    name = meta.get("encoding")
    if name is None:
        return _tensor(tensors, "update", ("<f4",), size).astype(np.float64)
    enc = parse_choice(Encoding, name, "update encoding", ProtocolError)
    out = np.zeros(size, dtype=np.float64)
    if enc is Encoding.DENSE_F32:
        return _tensor(tensors, "update", ("<f4",), size).astype(np.float64)
    if enc is Encoding.DENSE_I8:
        block = _int(meta, "block", 1, MAX_BLOCK)
        nb = max(1, -(-size // block))
        return dequantize_int8(_int8(tensors, size), _scales(tensors, nb), block)
    if enc in (Encoding.SPARSE_F32, Encoding.SPARSE_I8):
        idx = _indices(tensors, size)
        if enc is Encoding.SPARSE_F32:
            out[idx] = _tensor(tensors, "values", ("<f4",), idx.shape[0])
        else:
            q = _int8(tensors, idx.shape[0])
            out[idx] = dequantize_int8(q, _scales(tensors, 1), max(1, q.shape[0]))
        return out
    k = _int(meta, "k", 1, size)
    idx = shared_indices(job, round_, size, k)
    if enc is Encoding.SHARED_F32:
        out[idx] = _tensor(tensors, "values", ("<f4",), k)
    else:
        block = _int(meta, "block", 1, MAX_BLOCK)
        out[idx] = dequantize_int8(_int8(tensors, k), _scales(tensors, max(1, -(-k // block))), block)
    return out


__all__ = ["Encoding", "UpdateCodec", "decode_update"]
