from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from insitu.errors import ProtocolError
from insitu.federation.messages import Message, MessageKind, decode, encode


def test_roundtrip_keeps_tensors_and_meta():
    msg = Message(MessageKind.TRAIN, 3, "job", {"a": 1, "b": [1, 2]}, {"x": np.arange(6, dtype=np.float32).reshape(2, 3), "i": np.array([1, 2], dtype=np.int64)})
    back = decode(encode(msg))
    assert back.kind is MessageKind.TRAIN and back.round == 3 and back.job == "job" and back.meta == {"a": 1, "b": [1, 2]}
    np.testing.assert_array_equal(back.tensors["x"], msg.tensors["x"])
    assert back.tensors["i"].dtype == np.int64


def test_big_endian_input_is_sent_little_endian():
    arr = np.arange(4, dtype=">f4")
    back = decode(encode(Message(MessageKind.TRAIN, tensors={"x": arr})))
    np.testing.assert_array_equal(back.tensors["x"], arr.astype("<f4"))


def _frame(header: dict, body: bytes = b"") -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<4sBI", b"INSU", 1, len(h)) + h + body


@pytest.mark.parametrize(
    "data, match",
    [
        (b"xx", "shorter"),
        (b"NOPE" + b"\x01" + b"\x00\x00\x00\x00", "not an insitu message"),
        (_frame({"kind": "run_code", "round": 0, "job": "", "meta": {}, "tensors": []}), "unknown message kind 'run_code'"),
        (_frame({"kind": "train", "round": -1, "job": "", "meta": {}, "tensors": []}), "round -1"),
        (_frame({"kind": "train", "round": 0, "job": "", "meta": {}, "tensors": [{"name": "x", "dtype": "|O", "shape": [1], "nbytes": 8}]}), "dtype '|O'"),
        (_frame({"kind": "train", "round": 0, "job": "", "meta": {}, "tensors": [{"name": "x", "dtype": "<f4", "shape": [4], "nbytes": 16}]}, b"\0" * 8), r"tensors\[0\] \('x'\)\.shape' = \[4\] needs 16 bytes, but only 8 remain"),
        (_frame({"kind": "train", "round": 0, "job": "", "meta": {}, "tensors": [{"name": "x", "dtype": "<f4", "shape": [4], "nbytes": 12}]}, b"\0" * 16), "declares 12 bytes"),
        (_frame({"kind": "train", "round": 0, "job": "", "meta": {}, "tensors": []}, b"junk"), "trailing"),
    ],
)
def test_malformed_messages_are_refused_with_reason(data, match):
    with pytest.raises(ProtocolError, match=match):
        decode(data)


def test_size_limit_enforced_both_ways():
    msg = Message(MessageKind.TRAIN, tensors={"x": np.zeros(1000, np.float32)})
    with pytest.raises(ProtocolError, match="over the limit"):
        encode(msg, max_bytes=1000)
    wire = encode(msg)
    with pytest.raises(ProtocolError, match="over the limit"):
        decode(wire, max_bytes=1000)


def test_nan_in_meta_refused():
    with pytest.raises(ProtocolError, match="not plain JSON"):
        encode(Message(MessageKind.TRAIN, meta={"x": float("nan")}))
