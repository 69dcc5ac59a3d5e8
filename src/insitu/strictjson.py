"""Strict JSON for bytes that arrive from outside: wire headers, gateway bodies, audit entries.

Python's :func:`json.loads` accepts what a hostile peer likes to send: nesting
deep enough to raise :class:`RecursionError` inside the parser, millions of
tiny elements, ``NaN`` and ``1e400`` (read as infinity), and objects with a
key given twice (the last one wins, while another reader, such as SQLite's JSON
functions, may take the first).  :func:`loads` refuses all of these and raises
the caller's error class with a sentence naming the problem and, where there is
one, the field (``meta.metrics[2]``)::

    loads(raw, error=ProtocolError, what="message header")

The limits are a :class:`JSONLimits`; the defaults (32 levels, 100,000
elements) are far above anything insitu writes and far below what hurts.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from insitu.errors import DataError, InsituError

__all__ = ["JSONLimits", "DEFAULT_LIMITS", "loads", "check_shape", "describe_path"]


@dataclass(frozen=True)
class JSONLimits:
    """How deep and how large one JSON document may be."""

    max_depth: int = 32
    max_items: int = 100_000

    def __post_init__(self) -> None:
        if self.max_depth < 1 or self.max_items < 1:
            raise ValueError(f"JSON limits must be positive, got depth {self.max_depth}, items {self.max_items}")


DEFAULT_LIMITS = JSONLimits()


class _Refused(Exception):
    """Raised inside the parser's hooks; turned into the caller's error class by :func:`loads`."""


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _Refused(f"key {key!r} appears twice in one object")
        out[key] = value
    return out


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Refused(f"number {text[:40]} is out of the range of a 64-bit float")
    return value


def _no_constant(text: str) -> Any:
    raise _Refused(f"{text} is not JSON (only finite numbers are allowed)")


def describe_path(parts: tuple[str | int, ...]) -> str:
    """``('meta', 'metrics', 2)`` -> ``meta.metrics[2]``; the empty path is ``(top level)``."""
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(top level)"


def loads(
    data: bytes | bytearray | memoryview | str,
    *,
    limits: JSONLimits = DEFAULT_LIMITS,
    error: type[InsituError] = DataError,
    what: str = "JSON document",
    allow_nan: bool = False,
) -> Any:
    """Parse ``data`` (UTF-8 if bytes) within ``limits``; every refusal is an ``error(...)`` naming ``what``.

    ``allow_nan=True`` lets ``NaN``, ``Infinity`` and out-of-range numbers through as floats, for a
    caller whose schema refuses them with the field's name (the gateway's pydantic models).
    """
    if isinstance(data, str):
        text = data
    else:
        raw = bytes(data)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise error(f"{what} is not UTF-8: byte 0x{raw[exc.start]:02x} at offset {exc.start}") from None
    try:
        if allow_nan:
            value = json.loads(text, object_pairs_hook=_no_duplicates)
        else:
            value = json.loads(text, object_pairs_hook=_no_duplicates, parse_float=_finite_float, parse_constant=_no_constant)
    except _Refused as exc:
        raise error(f"{what} refused: {exc}") from None
    except RecursionError:
        raise error(f"{what} nests deeper than {limits.max_depth} levels") from None
    except json.JSONDecodeError as exc:
        raise error(f"{what} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        raise error(f"{what} refused: {exc}") from None
    _check_bounds(value, limits, error, what)
    return value


def _check_bounds(value: Any, limits: JSONLimits, error: type[InsituError], what: str) -> None:
    """Iterative walk: depth and element count, naming the path where a limit is crossed."""
    # (value, depth of the container holding it, path to it)
    stack: list[tuple[Any, int, tuple[str | int, ...]]] = [(value, 0, ())]
    items = 0
    while stack:
        node, depth, path = stack.pop()
        items += 1
        if items > limits.max_items:
            raise error(f"{what} has more than {limits.max_items} elements (limit reached at {describe_path(path)})")
        if isinstance(node, (dict, list)):
            if depth >= limits.max_depth:
                raise error(f"{what} nests deeper than {limits.max_depth} levels at {describe_path(path)}")
            children = node.items() if isinstance(node, dict) else enumerate(node)
            stack.extend((child, depth + 1, path + (key,)) for key, child in children)


def check_shape(
    shape: Any, itemsize: int, available: int, *, limit: int, max_ndim: int, error: type[InsituError], field: str
) -> tuple[tuple[int, ...], int]:
    """Validate a declared array shape; returns (shape, bytes it needs).

    Products are Python integers (no overflow) and are compared with the
    ``limit`` and ``available`` bytes before anything is allocated, so
    ``[2**40, 2**40]`` is refused with a sentence, not by numpy.  Even an empty
    array (a zero dimension) may not declare more than ``limit`` bytes in its
    other dimensions, which numpy would refuse to reshape.
    """
    if not isinstance(shape, list):
        raise error(f"{field} = {_short(shape)} is not a list of dimensions")
    if len(shape) > max_ndim:
        raise error(f"{field} has {len(shape)} dimensions, over the limit of {max_ndim}")
    count, nonzero = 1, itemsize
    for i, d in enumerate(shape):
        if not isinstance(d, int) or isinstance(d, bool) or d < 0:
            raise error(f"{field}[{i}] = {_short(d)} is not a non-negative integer")
        count *= d
        nonzero *= max(d, 1)
        if nonzero > limit:
            raise error(f"{field} = {_short(shape)} describes more than the {limit}-byte message limit")
    needed = count * itemsize
    if needed > available:
        raise error(f"{field} = {_short(shape)} needs {needed} bytes, but only {available} remain")
    return tuple(shape), needed


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
