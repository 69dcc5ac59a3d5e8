"""Hostile wire input: every malformed message is a ProtocolError naming the field, never a crash.

Known cases first (deep nesting, giant shapes, many dimensions, element floods,
ambiguous JSON), then property tests: ``decode`` of arbitrary bytes, of
arbitrary JSON headers behind a valid prefix, and of bit-flipped valid messages
raises nothing but :class:`ProtocolError`.
"""
from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from insitu import strictjson
from insitu.errors import ProtocolError
from insitu.federation.messages import HEADER_LIMITS, MAX_NDIM, MAX_TENSORS, Message, MessageKind, decode, encode


def frame(header: dict | str | bytes, body: bytes = b"") -> bytes:
    raw = header if isinstance(header, bytes) else (header if isinstance(header, str) else json.dumps(header)).encode()
    return struct.pack("<4sBI", b"INSU", 1, len(raw)) + raw + body


def head(meta=None, tensors=None, **extra) -> dict:
    return {"kind": "train", "round": 0, "job": "j", "meta": {} if meta is None else meta, "tensors": tensors or [], **extra}


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def refused(data: bytes, match: str) -> str:
    with pytest.raises(ProtocolError, match=match) as info:
        decode(data)
    return str(info.value)


# -- nesting ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [33, 200, 5_000, 1_000_000])
def test_deeply_nested_meta_is_a_protocol_error(depth):
    # 1_000_000 levels is 2 MB of brackets: json.loads itself raises RecursionError on it
    data = frame('{"kind":"train","round":0,"job":"","tensors":[],"meta":{"x":' + nested(depth) + "}}")
    msg = refused(data, "message header nests deeper than 32 levels")
    if depth < 1000:  # found by the walk after parsing: the path is named
        assert "at meta.x" + "[0]" * 29 in msg


def test_nesting_within_the_limit_round_trips():
    value: list = []
    for _ in range(HEADER_LIMITS.max_depth - 3):  # header object, meta object, key "x": 3 levels used
        value = [value]
    back = decode(encode(Message(MessageKind.TRAIN, meta={"x": value})))
    assert back.meta["x"] == value


def test_deeply_nested_tensor_spec_names_the_field():
    data = frame(head(tensors=[{"name": "x", "dtype": "<f4", "shape": json.loads(nested(40)), "nbytes": 0}]))
    refused(data, r"nests deeper than 32 levels at tensors\[0\]\.shape")


# -- shapes ----------------------------------------------------------------------------------------


def test_giant_shape_is_refused_before_numpy_sees_it():
    data = frame(head(tensors=[{"name": "w", "dtype": "<f4", "shape": [2**40, 2**40], "nbytes": 2**82}]), b"\0" * 16)
    refused(data, r"tensors\[0\] \('w'\)\.shape' = \[1099511627776, 1099511627776\] describes more than the 268435456-byte message limit")


def test_shape_product_beyond_int64_is_refused():
    # np.prod(..., dtype=int64) wraps this to 0, which would have matched nbytes=0
    data = frame(head(tensors=[{"name": "w", "dtype": "|u1", "shape": [2**32, 2**32], "nbytes": 0}]))
    refused(data, r"tensors\[0\] \('w'\)\.shape'")


def test_shape_needing_more_than_the_remaining_bytes():
    data = frame(head(tensors=[{"name": "w", "dtype": "<f8", "shape": [1000, 1000], "nbytes": 8_000_000}]), b"\0" * 64)
    refused(data, r"shape' = \[1000, 1000\] needs 8000000 bytes, but only 64 remain")


def test_empty_tensor_with_huge_other_dimension_is_refused_but_small_one_allowed():
    refused(frame(head(tensors=[{"name": "e", "dtype": "<f4", "shape": [0, 2**62], "nbytes": 0}])), "describes more than")
    back = decode(frame(head(tensors=[{"name": "e", "dtype": "<f4", "shape": [0, 5], "nbytes": 0}])))
    assert back.tensors["e"].shape == (0, 5)


@pytest.mark.parametrize("ndim", [MAX_NDIM + 1, 10_000])
def test_too_many_dimensions(ndim):
    data = frame(head(tensors=[{"name": "w", "dtype": "<f4", "shape": [1] * ndim, "nbytes": 4}]), b"\0" * 4)
    refused(data, rf"tensors\[0\] \('w'\)\.shape' has {ndim} dimensions, over the limit of {MAX_NDIM}")


@pytest.mark.parametrize(
    "shape, match",
    [
        ([-3], r"shape'\[0\] = -3 is not a non-negative integer"),
        ([True], r"shape'\[0\] = True"),
        ([1.5], r"shape'\[0\] = 1.5"),
        ("4", r"shape' = '4' is not a list"),
        ({"0": 4}, r"is not a list"),
    ],
)
def test_malformed_shapes_name_the_field(shape, match):
    refused(frame(head(tensors=[{"name": "w", "dtype": "<f4", "shape": shape, "nbytes": 16}]), b"\0" * 16), match)


def test_boolean_nbytes_is_not_a_count():
    refused(frame(head(tensors=[{"name": "b", "dtype": "|b1", "shape": [1], "nbytes": True}]), b"\1"), r"'tensors\[0\] \('b'\)\.nbytes' declares True")


# -- element counts --------------------------------------------------------------------------------


def test_huge_meta_list_is_refused():
    data = frame(head(meta={"flood": [0] * (HEADER_LIMITS.max_items + 1)}))
    refused(data, r"message header has more than 100000 elements \(limit reached at meta\.flood\[")


def test_huge_meta_object_is_refused():
    data = frame(head(meta={f"k{i}": i for i in range(HEADER_LIMITS.max_items + 1)}))
    refused(data, "more than 100000 elements")


def test_too_many_tensors():
    specs = [{"name": f"t{i}", "dtype": "|u1", "shape": [0], "nbytes": 0} for i in range(MAX_TENSORS + 1)]
    refused(frame(head(tensors=specs)), rf"'tensors' lists {MAX_TENSORS + 1} tensors, over the limit of {MAX_TENSORS}")


def test_header_over_the_header_limit_is_refused():
    refused(struct.pack("<4sBI", b"INSU", 1, 2**31) + b"{}", "header length 2147483648 does not fit")


# -- ambiguous or non-JSON headers ------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, match",
    [
        (b'{"kind":"train","kind":"evaluate","round":0,"job":"","meta":{},"tensors":[]}', "key 'kind' appears twice"),
        (b'{"kind":"train","round":0,"job":"","meta":{"a":1,"a":2},"tensors":[]}', "key 'a' appears twice"),
        (b'{"kind":"train","round":0,"job":"","meta":{"x":NaN},"tensors":[]}', "NaN is not JSON"),
        (b'{"kind":"train","round":0,"job":"","meta":{"x":-Infinity},"tensors":[]}', "-Infinity is not JSON"),
        (b'{"kind":"train","round":0,"job":"","meta":{"x":1e400},"tensors":[]}', "number 1e400 is out of the range"),
        (b'{"kind":"train","round":0,"job":"","meta":{"x":' + b"9" * 5000 + b"},\"tensors\":[]}", "message header refused"),
        (b'{"kind":"train","round":0,"job":"\xff\xfe","meta":{},"tensors":[]}', "not UTF-8: byte 0xff at offset 33"),
        (b'{"kind":"train",', "not valid JSON"),
        (b"[1, 2]", "header is a JSON list, not an object"),
        (b'{"kind":"train","round":0,"job":"","meta":{},"tensors":[],"exec":"rm"}', r"unknown field\(s\) \['exec'\]"),
        (b'{"kind":["train"],"round":0,"job":"","meta":{},"tensors":[]}', "'kind': unknown message kind"),
        (b'{"kind":"train","round":true,"job":"","meta":{},"tensors":[]}', "'round': round True"),
        (b'{"kind":"train","round":18446744073709551616,"job":"","meta":{},"tensors":[]}', "'round': round 18446744073709551616"),
        (b'{"kind":"train","round":0,"job":5,"meta":{},"tensors":[]}', "'job' = 5 is not a string"),
        (b'{"kind":"train","round":0,"job":"","meta":[],"tensors":[]}', "'meta' = \\[\\] is not an object"),
        (b'{"kind":"train","round":0,"job":"","meta":{},"tensors":{}}', "'tensors' = {} is not a list"),
        (b'{"kind":"train","round":0,"job":"","meta":{},"tensors":[7]}', r"'tensors\[0\]' is not an object"),
        (b'{"kind":"train","round":0,"job":"","meta":{},"tensors":[{"name":1}]}', r"'tensors\[0\]\.name' = 1"),
        (b'{"kind":"train","round":0,"job":"","meta":{},"tensors":[{"name":"x","dtype":["<f4"]}]}', r"\.dtype' = \['<f4'\] is not one of"),
    ],
)
def test_ambiguous_or_malformed_headers(raw, match):
    refused(frame(raw), match)


# -- properties ------------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=40,
)
tensor_specs = st.fixed_dictionaries(
    {
        "name": st.text(max_size=4) | st.integers(),
        "dtype": st.sampled_from(["<f4", "<f8", "|u1", "<i8", "|O", ">f4", "f4"]) | json_values,
        "shape": st.lists(st.integers(min_value=-2, max_value=2**70), max_size=5) | json_values,
        "nbytes": st.integers(min_value=-1, max_value=2**70) | json_values,
    }
)
headers = st.fixed_dictionaries(
    {
        "kind": st.sampled_from([k.value for k in MessageKind]) | json_values,
        "round": st.integers(min_value=-1, max_value=2**64) | json_values,
        "job": st.text(max_size=8) | json_values,
        "meta": st.dictionaries(st.text(max_size=6), json_values, max_size=4) | json_values,
        "tensors": st.lists(tensor_specs, max_size=3) | json_values,
    }
)

_FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def decodes_or_protocol_error(data: bytes) -> None:
    try:
        msg = decode(data)
    except ProtocolError:
        return
    assert isinstance(msg, Message)  # a message that decodes is a well-formed one: it re-encodes
    decode(encode(msg))


@_FAST
@given(st.binary(max_size=512))
def test_arbitrary_bytes_only_raise_protocol_error(data):
    decodes_or_protocol_error(data)


@_FAST
@given(st.binary(max_size=256), st.binary(max_size=64))
def test_arbitrary_header_bytes_behind_a_valid_prefix(raw, body):
    decodes_or_protocol_error(frame(raw, body))


@_FAST
@given(headers, st.binary(max_size=128))
def test_arbitrary_json_headers_only_raise_protocol_error(header, body):
    decodes_or_protocol_error(frame(header, body))


_VALID = encode(Message(MessageKind.TRAIN_REPLY, 4, "job-1", {"n": 12, "metrics": {"loss": 0.5}}, {"u": np.arange(6, dtype=np.float32).reshape(2, 3)}))


@_FAST
@given(st.lists(st.tuples(st.integers(min_value=0, max_value=len(_VALID) - 1), st.integers(min_value=0, max_value=255)), min_size=1, max_size=6))
def test_mutated_valid_messages_only_raise_protocol_error(edits):
    data = bytearray(_VALID)
    for pos, byte in edits:
        data[pos] = byte
    decodes_or_protocol_error(bytes(data))


def test_strictjson_limits_are_validated():
    with pytest.raises(ValueError):
        strictjson.JSONLimits(max_depth=0)
