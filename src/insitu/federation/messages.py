"""Typed, versioned, size-limited messages between coordinator and sites.

One message is a kind (from the closed :class:`MessageKind` registry), the job
and round it belongs to, a small JSON ``meta`` object and named tensors.  On
the wire::

    b"INSU" | version (u8) | header length (u32 LE) | header (UTF-8 JSON) | tensor bytes

The header lists every tensor's name, dtype, shape and byte count; tensors are
raw little-endian arrays in that order.  There is no pickle and nothing in a
message names code to run: the kind is looked up in the enum, dtypes in an
allow-list, and every length is checked before a byte is trusted.
"""
from __future__ import annotations

import enum
import json
import struct
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from insitu.errors import ProtocolError

MAGIC = b"INSU"
WIRE_VERSION = 1
DEFAULT_MAX_BYTES = 256 * 1024 * 1024
MAX_HEADER_BYTES = 4 * 1024 * 1024
MAX_TENSORS = 1024

_PREFIX = struct.Struct("<4sBI")

#: dtypes that may cross the wire, by their little-endian numpy code.
ALLOWED_DTYPES: dict[str, np.dtype] = {
    code: np.dtype(code)
    for code in ("<f4", "<f8", "<f2", "|i1", "<i2", "<i4", "<i8", "|u1", "<u2", "<u4", "<u8", "|b1")
}


class MessageKind(str, enum.Enum):
    """Every message kind that exists.  A kind not listed here is refused."""

    TRAIN = "train"
    TRAIN_REPLY = "train_reply"
    EVALUATE = "evaluate"
    EVALUATE_REPLY = "evaluate_reply"
    ERROR = "error"
    # secure aggregation phases (Bonawitz et al. 2017 / SecAgg+)
    SECAGG_ADVERTISE = "secagg_advertise"
    SECAGG_ADVERTISE_REPLY = "secagg_advertise_reply"
    SECAGG_SHARE = "secagg_share"
    SECAGG_SHARE_REPLY = "secagg_share_reply"
    SECAGG_UNMASK = "secagg_unmask"
    SECAGG_UNMASK_REPLY = "secagg_unmask_reply"
    # homomorphic aggregation: the coordinator returns the encrypted sum to the sites
    HE_KEYS = "he_keys"
    HE_KEYS_REPLY = "he_keys_reply"
    HE_DECRYPT = "he_decrypt"
    HE_DECRYPT_REPLY = "he_decrypt_reply"
    # deployment control channel
    HELLO = "hello"
    HELLO_REPLY = "hello_reply"
    HEARTBEAT = "heartbeat"
    BYE = "bye"
    # operator control (job submit / cancel / status / list); only operator certificates
    OPERATOR = "operator"
    OPERATOR_REPLY = "operator_reply"


@dataclass(frozen=True)
class Message:
    kind: MessageKind
    round: int = 0
    job: str = ""
    meta: Mapping[str, Any] = field(default_factory=dict)
    tensors: Mapping[str, np.ndarray] = field(default_factory=dict)

    def tensor(self, name: str, *, shape: tuple[int, ...] | None = None, dtype: str | None = None) -> np.ndarray:
        """The tensor ``name``, checked against an expected shape and dtype."""
        if name not in self.tensors:
            raise ProtocolError(f"{self.kind.value} message lacks tensor {name!r} (has {sorted(self.tensors)})")
        arr = self.tensors[name]
        if shape is not None and tuple(arr.shape) != tuple(shape):
            raise ProtocolError(f"{self.kind.value} tensor {name!r} has shape {tuple(arr.shape)}, expected {tuple(shape)}")
        if dtype is not None and arr.dtype != np.dtype(dtype):
            raise ProtocolError(f"{self.kind.value} tensor {name!r} has dtype {arr.dtype}, expected {np.dtype(dtype)}")
        return arr

    def require(self, key: str, kind: type | tuple[type, ...] | None = None) -> Any:
        """The meta value ``key``, checked to be present (and of ``kind``)."""
        if key not in self.meta:
            raise ProtocolError(f"{self.kind.value} message lacks field {key!r}")
        value = self.meta[key]
        if kind is not None and (not isinstance(value, kind) or isinstance(value, bool) and bool not in _as_tuple(kind)):
            raise ProtocolError(f"{self.kind.value} field {key!r} = {value!r} is not {kind}")
        return value


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _le(arr: np.ndarray) -> np.ndarray:
    arr = np.asarray(arr)
    dt = arr.dtype.newbyteorder("<") if arr.dtype.byteorder == ">" else arr.dtype
    arr = np.ascontiguousarray(arr, dtype=dt)
    if arr.dtype.str not in ALLOWED_DTYPES:
        raise ProtocolError(f"dtype {arr.dtype} may not cross the wire (allowed: {sorted(ALLOWED_DTYPES)})")
    return arr


def encode(msg: Message, *, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """Serialize ``msg``; refuses a message larger than ``max_bytes``."""
    arrays = {name: _le(a) for name, a in msg.tensors.items()}
    header = {
        "kind": msg.kind.value,
        "round": int(msg.round),
        "job": str(msg.job),
        "meta": dict(msg.meta),
        "tensors": [
            {"name": n, "dtype": a.dtype.str, "shape": list(a.shape), "nbytes": int(a.nbytes)} for n, a in arrays.items()
        ],
    }
    try:
        head = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"{msg.kind.value} message meta is not plain JSON: {exc}") from None
    total = _PREFIX.size + len(head) + sum(a.nbytes for a in arrays.values())
    if total > max_bytes:
        raise ProtocolError(f"{msg.kind.value} message is {total} bytes, over the limit of {max_bytes}")
    parts = [_PREFIX.pack(MAGIC, WIRE_VERSION, len(head)), head]
    parts.extend(a.tobytes() for a in arrays.values())
    return b"".join(parts)


def decode(data: bytes | bytearray | memoryview, *, max_bytes: int = DEFAULT_MAX_BYTES) -> Message:
    """Parse and validate one message; every failure is a :class:`ProtocolError`."""
    buf = memoryview(data)
    if len(buf) > max_bytes:
        raise ProtocolError(f"message is {len(buf)} bytes, over the limit of {max_bytes}")
    if len(buf) < _PREFIX.size:
        raise ProtocolError(f"message of {len(buf)} bytes is shorter than the {_PREFIX.size}-byte prefix")
    magic, version, hlen = _PREFIX.unpack_from(buf)
    if magic != MAGIC:
        raise ProtocolError(f"not an insitu message (magic {bytes(magic)!r})")
    if version != WIRE_VERSION:
        raise ProtocolError(f"wire version {version} is not supported (this build speaks {WIRE_VERSION})")
    if hlen > MAX_HEADER_BYTES or _PREFIX.size + hlen > len(buf):
        raise ProtocolError(f"header length {hlen} does not fit a {len(buf)}-byte message")
    try:
        header = json.loads(bytes(buf[_PREFIX.size : _PREFIX.size + hlen]))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"message header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError("message header is not a JSON object")
    try:
        kind = MessageKind(header.get("kind"))
    except ValueError:
        raise ProtocolError(f"unknown message kind {header.get('kind')!r}") from None
    rnd, job, meta, specs = header.get("round"), header.get("job"), header.get("meta"), header.get("tensors")
    if not isinstance(rnd, int) or isinstance(rnd, bool) or rnd < 0:
        raise ProtocolError(f"round {rnd!r} is not a non-negative integer")
    if not isinstance(job, str) or not isinstance(meta, dict) or not isinstance(specs, list):
        raise ProtocolError("message header lacks job, meta or tensors of the right type")
    if len(specs) > MAX_TENSORS:
        raise ProtocolError(f"message carries {len(specs)} tensors, over the limit of {MAX_TENSORS}")
    offset = _PREFIX.size + hlen
    tensors: dict[str, np.ndarray] = {}
    for spec in specs:
        if not isinstance(spec, dict):
            raise ProtocolError("tensor description is not an object")
        name, code, shape, nbytes = spec.get("name"), spec.get("dtype"), spec.get("shape"), spec.get("nbytes")
        if not isinstance(name, str) or name in tensors:
            raise ProtocolError(f"tensor name {name!r} is missing or repeated")
        if code not in ALLOWED_DTYPES:
            raise ProtocolError(f"tensor {name!r} has dtype {code!r}, not one of {sorted(ALLOWED_DTYPES)}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise ProtocolError(f"tensor {name!r} has invalid shape {shape!r}")
        dt = ALLOWED_DTYPES[code]
        expected = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        if nbytes != expected:
            raise ProtocolError(f"tensor {name!r} declares {nbytes} bytes, but shape {shape} of {code} needs {expected}")
        if offset + expected > len(buf):
            raise ProtocolError(f"tensor {name!r} runs past the end of the message ({offset + expected} > {len(buf)})")
        arr = np.frombuffer(buf[offset : offset + expected], dtype=dt).reshape(shape).copy()
        tensors[name] = arr
        offset += expected
    if offset != len(buf):
        raise ProtocolError(f"message has {len(buf) - offset} trailing bytes after its tensors")
    return Message(kind=kind, round=rnd, job=job, meta=meta, tensors=tensors)


def error_reply(request: Message, reason: str, *, code: str = "error") -> Message:
    """The reply a site sends when it will not or cannot answer ``request``."""
    return Message(MessageKind.ERROR, request.round, request.job, {"reason": reason, "code": code, "to": request.kind.value})


__all__ = ["Message", "MessageKind", "encode", "decode", "error_reply", "ALLOWED_DTYPES", "DEFAULT_MAX_BYTES"]
