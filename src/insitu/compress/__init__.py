"""Fewer bytes on the wire, and models small enough for devices.

Update compression (the ``compress`` stage of the site pipeline, and the wire
formats the plain protocol decodes) lives here; model compression and ONNX
export are in :mod:`insitu.compress.model` and :mod:`insitu.compress.export`,
the cross-device mode in :mod:`insitu.compress.crossdevice` (imported on use:
they pull in torch and the round engine, this namespace stays a leaf).
"""
from insitu.compress.codec import Encoding, UpdateCodec, decode_update
from insitu.compress.updates import (
    CompressionSpec,
    Quantizer,
    Sparsifier,
    UpdateCompressor,
    dequantize_int8,
    quantize_int8,
    shared_indices,
    stochastic_round,
    topk_indices,
)

__all__ = [
    "CompressionSpec",
    "Encoding",
    "Quantizer",
    "Sparsifier",
    "UpdateCodec",
    "UpdateCompressor",
    "decode_update",
    "dequantize_int8",
    "quantize_int8",
    "shared_indices",
    "stochastic_round",
    "topk_indices",
]
