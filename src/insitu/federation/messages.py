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

from insitu import strictjson
from insitu.errors import ProtocolError

MAGIC = b"INSU"
WIRE_VERSION = 1
DEFAULT_MAX_BYTES = 256 * 1024 * 1024
MAX_HEADER_BYTES = 4 * 1024 * 1024
MAX_TENSORS = 1024
MAX_NDIM = 32  # numpy's own limit is 64; no insitu tensor has more than 4
MAX_ROUND = 2**63 - 1
#: depth and element count of a header (meta included); far above what insitu writes
HEADER_LIMITS = strictjson.JSONLimits(max_depth=32, max_items=100_000)
_HEADER_FIELDS = frozenset({"kind", "round", "job", "meta", "tensors"})

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
    PERSONALIZE = "personalize"  # after federation: a site fine-tunes the global model on its own records
    PERSONALIZE_REPLY = "personalize_reply"  # only that model's scores on the site's own test split
    ERROR = "error"
    # secure aggregation phases (Bonawitz et al. 2017 / SecAgg+)
    SECAGG_ADVERTISE = "secagg_advertise"
    SECAGG_ADVERTISE_REPLY = "secagg_advertise_reply"
    SECAGG_REVEAL = "secagg_reveal"  # graph-seed shares, revealed once all are committed
    SECAGG_REVEAL_REPLY = "secagg_reveal_reply"
    SECAGG_SHARE = "secagg_share"
    SECAGG_SHARE_REPLY = "secagg_share_reply"
    SECAGG_CHECK = "secagg_check"  # consistency check: survivors sign the survivor set
    SECAGG_CHECK_REPLY = "secagg_check_reply"
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
    # onboarding: may this site run the task?  Answered from its approvals and rules, without training
    TASK_CHECK = "task_check"
    TASK_CHECK_REPLY = "task_check_reply"
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
    """Parse and validate one message; every failure is a :class:`ProtocolError` naming the field.

    The header is strict JSON (:mod:`insitu.strictjson`): at most
    :data:`HEADER_LIMITS` deep and large, no duplicate keys, no NaN; tensor
    shapes are checked with exact integer arithmetic against the bytes that
    remain before numpy sees them.
    """
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
    header = strictjson.loads(buf[_PREFIX.size : _PREFIX.size + hlen], limits=HEADER_LIMITS, error=ProtocolError, what="message header")
    if not isinstance(header, dict):
        raise ProtocolError(f"message header is a JSON {type(header).__name__}, not an object")
    unknown = sorted(set(header) - _HEADER_FIELDS)
    if unknown:
        raise ProtocolError(f"message header has unknown field(s) {unknown} (allowed: {sorted(_HEADER_FIELDS)})")
    kind_value = header.get("kind")
    try:
        kind = MessageKind(kind_value)
    except (ValueError, TypeError):
        raise ProtocolError(f"header field 'kind': unknown message kind {_short(kind_value)}") from None
    rnd, job, meta, specs = header.get("round"), header.get("job"), header.get("meta"), header.get("tensors")
    if not isinstance(rnd, int) or isinstance(rnd, bool) or not 0 <= rnd <= MAX_ROUND:
        raise ProtocolError(f"header field 'round': round {_short(rnd)} is not an integer in [0, {MAX_ROUND}]")
    if not isinstance(job, str):
        raise ProtocolError(f"header field 'job' = {_short(job)} is not a string")
    if not isinstance(meta, dict):
        raise ProtocolError(f"header field 'meta' = {_short(meta)} is not an object")
    if not isinstance(specs, list):
        raise ProtocolError(f"header field 'tensors' = {_short(specs)} is not a list")
    if len(specs) > MAX_TENSORS:
        raise ProtocolError(f"header field 'tensors' lists {len(specs)} tensors, over the limit of {MAX_TENSORS}")
    offset = _PREFIX.size + hlen
    tensors: dict[str, np.ndarray] = {}
    for i, spec in enumerate(specs):
        where = f"tensors[{i}]"
        if not isinstance(spec, dict):
            raise ProtocolError(f"header field '{where}' is not an object")
        name, code, shape, nbytes = spec.get("name"), spec.get("dtype"), spec.get("shape"), spec.get("nbytes")
        if not isinstance(name, str) or name in tensors:
            raise ProtocolError(f"header field '{where}.name' = {_short(name)} is missing, not a string or repeated")
        where = f"tensors[{i}] ({name!r})"
        if not isinstance(code, str) or code not in ALLOWED_DTYPES:
            raise ProtocolError(f"header field '{where}.dtype' = {_short(code)} is not one of {sorted(ALLOWED_DTYPES)}")
        dt = ALLOWED_DTYPES[code]
        dims, expected = strictjson.check_shape(
            shape, dt.itemsize, len(buf) - offset, limit=max_bytes, max_ndim=MAX_NDIM, error=ProtocolError, field=f"header field '{where}.shape'"
        )
        if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes != expected:
            raise ProtocolError(f"header field '{where}.nbytes' declares {_short(nbytes)} bytes, but shape {list(dims)} of {code} needs {expected}")
        arr = np.frombuffer(buf[offset : offset + expected], dtype=dt).reshape(dims).copy()
        tensors[name] = arr
        offset += expected
    if offset != len(buf):
        raise ProtocolError(f"message has {len(buf) - offset} trailing bytes after its tensors")
    return Message(kind=kind, round=rnd, job=job, meta=meta, tensors=tensors)


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def error_reply(request: Message, reason: str, *, code: str = "error") -> Message:
    """The reply a site sends when it will not or cannot answer ``request``."""
    return Message(MessageKind.ERROR, request.round, request.job, {"reason": reason, "code": code, "to": request.kind.value})


__all__ = ["Message", "MessageKind", "encode", "decode", "error_reply", "ALLOWED_DTYPES", "DEFAULT_MAX_BYTES"]
