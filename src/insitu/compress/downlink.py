"""Downlink compression: the global model goes to each site as a delta against the model it holds.

A plan's ``downlink`` says how the coordinator sends a model in a TRAIN request:

================  ==================================================================  =============
``downlink``      what a site that holds the base version receives                    bytes/value
================  ==================================================================  =============
``dense``         the float32 model (the default; every site, every round)           4
``delta``         lossless: the XOR of the model's float32 bits with the base's,      ≈ 1.5–3.5
                  byte planes split, zlib-compressed; the site rebuilds the model
                  exactly
``delta:int8``    lossy: ``global − base`` in blockwise symmetric int8 (nearest        ≈ 1.02
                  rounding, one float32 scale per 256 values); the site holds
                  ``base + dequant(quant(global − base))``
================  ==================================================================  =============

**Versions.**  A model version is the SHA-256 of its float32 bytes (:func:`version_of`, first 32 hex
digits).  A delta TRAIN or EVALUATE carries ``meta["downlink"] = {"base": version, "encoding": ...}``
instead of the ``params`` tensor.  A site applies it only to the model it holds with exactly that version; any
other base (a new site, one that restarted or was sent nothing last round) is refused with a
:class:`~insitu.errors.ProtocolError` naming both versions, before any guard or training runs.

**What the coordinator tracks.**  :class:`DownlinkTransport` wraps the coordinator's transport and
keeps, per site, a copy of what that site reconstructed: the same function (:func:`apply_delta`)
runs on both ends, so the coordinator's copy is identical bit for bit to the site's.  Each delta is
taken against that exact copy, so with ``delta:int8`` the quantisation error of one round is part of
the next round's delta (error feedback by construction): the site's model stays within half a
quantisation step of the global model and the error does not accumulate.  A site's copy is kept
only when the site answered the TRAIN request; a site that did not (dropped, refused, timed out),
and any site whose connection count changed (it reconnected, perhaps restarted), gets the dense
model next time.  A site that refuses a delta for an unknown base is sent the dense model at once,
in the same exchange.  When a delta's message would not be smaller than the dense one (a model of a
few dozen values, whose delta costs more in its ``downlink`` field than it saves), the dense model
goes instead: a delta downlink never sends more than dense.

**Evaluation.**  An EVALUATE request's model goes as a *lossless* delta against the model the site
holds, whatever the plan's downlink (an int8 approximation would have the site score a model other
than the one the round names); the site rebuilds it exactly and, once it has scored it, holds it.
So a TRAIN that follows the evaluation of the same model (the new global model, scored before the
next round) costs almost nothing: its lossless delta is all zeros.  Under ``delta:int8`` a TRAIN goes
lossless whenever the site already holds exactly the model, and as int8 otherwise.

A site scores only models it was sent for training (plus at most two others,
:class:`~insitu.federation.site.Site`).  After an int8 delta the site holds an approximation of the
global model, not the model the coordinator asks it to score; :meth:`DownlinkReceiver.vouch` accepts
a model ``P`` if re-encoding ``P`` against the base the site held gives exactly the codes and scales
it was sent (so ``P`` is within half a quantisation step of what it trained), once per reception.

The version identifier, the encodings and their checks are public, deterministic and numpy-only.
"""
from __future__ import annotations

import enum
import hashlib
import zlib
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from insitu.compress.updates import DEFAULT_BLOCK, QMAX
from insitu.errors import ConfigError, ProtocolError
from insitu.federation.messages import Message, MessageKind
from insitu.federation.transport import Exchange, Transport

#: the TRAIN meta key of a delta (a site whose plan says ``dense`` refuses it as undeclared)
DOWNLINK_KEY = "downlink"
#: hex digits of a model version (128 bits of SHA-256)
VERSION_HEX = 32
#: words every refusal of a delta against an unknown base contains; the coordinator then sends the dense model
UNKNOWN_BASE = "cannot apply the downlink delta"
#: lossy receptions a site keeps to vouch for the exact global model it is later asked to score
MAX_VOUCHERS = 2
#: zlib level of the lossless delta (6: zlib's default; 9 saves < 1 % more on model deltas)
ZLIB_LEVEL = 6


class DownlinkMode(str, enum.Enum):
    """How a plan sends the global model to the sites (plan field and simulate option ``downlink``)."""

    DENSE = "dense"
    DELTA = "delta"
    DELTA_INT8 = "delta:int8"

    @classmethod
    def parse(cls, value: Any) -> "DownlinkMode":
        if isinstance(value, cls):
            return value
        text = str(value).strip().lower() if isinstance(value, str) else value
        try:
            return cls(text)
        except ValueError:
            raise ConfigError(f"downlink = {value!r} is not one of {[m.value for m in cls]} "
                              "(dense: the whole model every round; delta: lossless against what each site holds; "
                              "delta:int8: int8-quantised delta)") from None


class Encoding(str, enum.Enum):
    """The wire format of one delta TRAIN (``meta["downlink"]["encoding"]``)."""

    XOR_ZLIB = "xor_zlib"  # tensors: blob u1[m]
    DELTA_I8 = "delta_i8"  # tensors: q i1[n], scale f4[⌈n/256⌉]


_ENCODING = {DownlinkMode.DELTA: Encoding.XOR_ZLIB, DownlinkMode.DELTA_INT8: Encoding.DELTA_I8}
#: the encodings a site of each mode accepts: never lossier than its plan says
_ACCEPTS = {DownlinkMode.DELTA: (Encoding.XOR_ZLIB,), DownlinkMode.DELTA_INT8: (Encoding.XOR_ZLIB, Encoding.DELTA_I8)}
_TENSORS = {Encoding.XOR_ZLIB: ("blob",), Encoding.DELTA_I8: ("q", "scale")}


def version_of(params: np.ndarray) -> str:
    """The version of a model: the first 32 hex digits of SHA-256 over its little-endian float32 bytes."""
    return hashlib.sha256(np.ascontiguousarray(params, dtype="<f4").tobytes()).hexdigest()[:VERSION_HEX]


def _f32(params: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(params).reshape(-1), dtype="<f4")


# -- int8 ----------------------------------------------------------------------------------------
def quantize_delta(delta: np.ndarray, block: int = DEFAULT_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """Blockwise symmetric int8 of ``delta`` with nearest rounding and float32 scales (max |x| / 127).

    Deterministic: the coordinator and a site checking a model to score compute the same bytes."""
    d = np.asarray(delta, dtype=np.float64).reshape(-1)
    n = d.shape[0]
    nb = max(1, -(-n // block))
    padded = np.zeros(nb * block)
    padded[:n] = np.abs(d)
    scales = (padded.reshape(nb, block).max(axis=1) / QMAX).astype("<f4")
    per = np.repeat(scales.astype(np.float64), block)[:n]
    q = np.where(per > 0, np.rint(d / np.where(per > 0, per, 1.0)), 0.0)
    return np.clip(q, -QMAX, QMAX).astype("|i1"), scales


def _dequantize(q: np.ndarray, scales: np.ndarray, block: int) -> np.ndarray:
    return q.astype(np.float64) * np.repeat(scales.astype(np.float64), block)[: q.shape[0]]


# -- lossless ------------------------------------------------------------------------------------
def _xor_blob(base: np.ndarray, target: np.ndarray) -> np.ndarray:
    x = base.view("<u4") ^ target.view("<u4")
    planes = x.view("|u1").reshape(-1, 4).T  # byte planes: the high bytes of nearby floats XOR to zero
    return np.frombuffer(zlib.compress(planes.tobytes(), ZLIB_LEVEL), dtype="|u1")


def _unxor(base: np.ndarray, blob: np.ndarray) -> np.ndarray:
    n = base.shape[0]
    d = zlib.decompressobj()
    try:
        raw = d.decompress(blob.tobytes(), 4 * n)  # never inflates past the model's size
    except zlib.error as exc:
        raise ProtocolError(f"downlink delta is not valid zlib data: {exc}") from None
    if len(raw) != 4 * n or d.unconsumed_tail or not d.eof or d.unused_data:
        raise ProtocolError(f"downlink delta does not inflate to exactly {4 * n} bytes (a model of {n} float32 values)")
    x = np.frombuffer(raw, dtype="|u1").reshape(4, n).T.copy().view("<u4").reshape(-1)
    return (base.view("<u4") ^ x).view("<f4")


# -- both ends -----------------------------------------------------------------------------------
def encode_delta(mode: DownlinkMode, base: np.ndarray, target: np.ndarray) -> tuple[dict[str, Any], dict[str, np.ndarray], np.ndarray]:
    """``(meta, tensors, reconstruction)``: the delta of ``target`` against ``base``, and exactly what a
    site that holds ``base`` rebuilds from it (:func:`apply_delta` on the same bytes)."""
    base, target = _f32(base), _f32(target)
    enc = _ENCODING[mode]
    meta = {"base": version_of(base), "encoding": enc.value}
    if enc is Encoding.XOR_ZLIB:
        tensors = {"blob": _xor_blob(base, target)}
    else:
        q, s = quantize_delta(target.astype(np.float64) - base.astype(np.float64))
        tensors = {"q": q, "scale": s}
    return meta, tensors, apply_delta(mode, base, meta, tensors)


def apply_delta(mode: DownlinkMode, base: np.ndarray, meta: Mapping[str, Any], tensors: Mapping[str, np.ndarray], *,
                lossless: bool = False) -> np.ndarray:
    """The model a site rebuilds from a delta against ``base``; every malformation is a ProtocolError.

    ``mode`` is the plan's downlink (``delta:int8`` also accepts the lossless encoding); ``lossless``:
    only the lossless encoding is accepted (an evaluation names one exact model)."""
    base = _f32(base)
    n = base.shape[0]
    accepted = (Encoding.XOR_ZLIB,) if lossless else _ACCEPTS[mode]
    enc = next((e for e in accepted if meta.get("encoding") == e.value), None)
    if enc is None:
        raise ProtocolError(f"downlink encoding {meta.get('encoding')!r} is not one this {'evaluation' if lossless else 'request'} "
                            f"may carry under the plan's downlink = {mode.value!r} ({[e.value for e in accepted]})")
    if enc is Encoding.XOR_ZLIB:
        blob = _tensor(tensors, "blob", "|u1")
        if blob.shape[0] > 8 * n + 64:  # zlib never needs more than ~n + 5 % for incompressible data
            raise ProtocolError(f"downlink delta of {blob.shape[0]} bytes is larger than any delta of a {n}-value model")
        out = _unxor(base, blob)
    else:
        q = _tensor(tensors, "q", "|i1", n)
        if np.any(q == -128):
            raise ProtocolError(f"downlink int8 delta holds -128; the symmetric range is [-{QMAX}, {QMAX}]")
        s = _tensor(tensors, "scale", "<f4", max(1, -(-n // DEFAULT_BLOCK)))
        if not np.all(np.isfinite(s)) or np.any(s < 0):
            raise ProtocolError("downlink int8 delta carries a negative or non-finite scale")
        with np.errstate(over="ignore"):  # a value past float32's range becomes inf, refused below
            out = (base.astype(np.float64) + _dequantize(q, s, DEFAULT_BLOCK)).astype("<f4")
    if not np.all(np.isfinite(out)):
        raise ProtocolError("downlink delta rebuilds a model with NaN or infinite values")
    return out


def _tensor(tensors: Mapping[str, np.ndarray], name: str, dtype: str, length: int | None = None) -> np.ndarray:
    a = tensors.get(name)
    if a is None:
        raise ProtocolError(f"downlink delta lacks tensor {name!r} (has {sorted(tensors)})")
    if a.ndim != 1 or a.dtype != np.dtype(dtype) or (length is not None and a.shape[0] != length):
        raise ProtocolError(f"downlink delta tensor {name!r} is {a.dtype.str}{list(a.shape)}, expected {dtype}[{length if length is not None else 'm'}]")
    return a


def _parse_meta(raw: Any) -> tuple[str, str]:
    if not isinstance(raw, Mapping) or set(raw) != {"base", "encoding"}:
        raise ProtocolError(f"downlink field must be exactly {{'base', 'encoding'}}, got {sorted(raw) if isinstance(raw, Mapping) else type(raw).__name__}")
    base, enc = raw["base"], raw["encoding"]
    if not isinstance(base, str) or len(base) != VERSION_HEX or any(c not in "0123456789abcdef" for c in base):
        raise ProtocolError(f"downlink base {base!r} is not a model version ({VERSION_HEX} lower-case hex digits)")
    if not isinstance(enc, str):
        raise ProtocolError(f"downlink encoding {enc!r} is not a string")
    return base, enc


# -- the site half -------------------------------------------------------------------------------
@dataclass
class _Voucher:
    """One int8 reception: the base it was applied to and the codes received (to re-encode a model against)."""

    base: np.ndarray
    q: np.ndarray
    scale: np.ndarray


@dataclass
class DownlinkReceiver:
    """The site half: rebuilds the global model of a TRAIN request, dense or delta, and remembers the one
    version it holds.  Made by :func:`insitu.builder.build_site` when the plan's downlink is not dense."""

    mode: DownlinkMode
    site_id: str
    held: np.ndarray | None = field(default=None, init=False)  # the model this site rebuilt from the last TRAIN it accepted
    held_version: str | None = field(default=None, init=False)
    vouched: set[str] = field(default_factory=set, init=False)  # full SHA-256 hashes of models a reception vouched for
    _vouchers: list[_Voucher] = field(default_factory=list, init=False, repr=False)
    _candidates: dict[str, np.ndarray] = field(default_factory=dict, init=False, repr=False)  # scored before a reception vouched
    _pending: tuple[np.ndarray, _Voucher | None] | None = field(default=None, init=False, repr=False)  # received, not yet answered

    @property
    def request_keys(self) -> frozenset[str]:
        return frozenset({DOWNLINK_KEY}) if self.mode is not DownlinkMode.DENSE else frozenset()

    def receive(self, msg: Message, size: int) -> np.ndarray:
        """The model ``msg`` (a TRAIN) carries, checked.  Nothing changes until :meth:`accept`: the site
        calls it once it has answered the TRAIN, and only then holds the model and may vouch with it (a
        refused TRAIN would otherwise buy a free evaluation of any model: tests/attacks)."""
        raw = msg.meta.get(DOWNLINK_KEY)
        self._pending = None
        if raw is None:
            params = _f32(msg.tensor("params", shape=(size,), dtype="float32")).copy()
            if not np.all(np.isfinite(params)):
                raise ProtocolError("global parameters hold NaN or infinite values")
            self._pending = (params, None)
            return params.copy()
        base, _ = _parse_meta(raw)
        if "params" in msg.tensors:
            raise ProtocolError("a TRAIN request carries both the dense model and a downlink delta")
        self._check_base(base)
        recon = apply_delta(self.mode, self.held, raw, msg.tensors)  # type: ignore[arg-type]  (held_version matched)
        v = None
        if raw["encoding"] == Encoding.DELTA_I8.value:  # lossy: the site holds an approximation of the model
            v = _Voucher(self.held, np.array(msg.tensors["q"]), np.array(msg.tensors["scale"]))
        self._pending = (recon, v)
        return recon.copy()

    def accept(self) -> None:
        """The TRAIN last received was answered: its model becomes the version this site holds, and an int8
        reception vouches for the exact global model it approximated (one scored before, or one asked later)."""
        if self._pending is None:
            return
        recon, v = self._pending
        self._pending = None
        if v is not None:
            matched = next((h for h, p in self._candidates.items() if _matches(v, p)), None)
            if matched is not None:  # the model it scored before this round is the one this delta approximates
                self.vouched.add(matched)
                del self._candidates[matched]
            else:
                self._vouchers = (self._vouchers + [v])[-MAX_VOUCHERS:]
        self._hold(recon)

    def rebuild(self, msg: Message, size: int) -> np.ndarray:
        """The model an EVALUATE request ``msg`` asks to score, exactly: dense, or a lossless delta against the
        model this site holds.  Nothing changes here: the site holds the model (:meth:`hold`) once it scores it."""
        raw = msg.meta.get(DOWNLINK_KEY)
        if raw is None:
            return _f32(msg.tensor("params", shape=(size,), dtype="float32")).copy()
        base, _ = _parse_meta(raw)
        if "params" in msg.tensors:
            raise ProtocolError("an EVALUATE request carries both the dense model and a downlink delta")
        self._check_base(base)
        return apply_delta(self.mode, self.held, raw, msg.tensors, lossless=True)  # type: ignore[arg-type]

    def hold(self, params: np.ndarray) -> None:
        """``params`` (a model this site scored, exactly as the coordinator sent it) becomes the version it holds."""
        self._hold(_f32(params).copy())

    def _check_base(self, base: str) -> None:
        if self.held_version != base:
            holds = f"model {self.held_version}" if self.held is not None else "no model of this job (it is new, restarted, or missed the last round)"
            raise ProtocolError(f"site {self.site_id} {UNKNOWN_BASE}: it is against model {base}, and this site holds {holds}; "
                                "the coordinator sends the dense model instead")

    def vouch(self, model_hash: str, params: np.ndarray) -> bool:
        """True if ``params`` is the global model an int8 reception approximated (it re-encodes against that
        reception's base to exactly the bytes received); each reception vouches for one model only."""
        if self.mode is not DownlinkMode.DELTA_INT8:
            return False  # dense and lossless deltas rebuild the exact model: its hash is what the site holds
        p = _f32(params)
        for i, v in enumerate(self._vouchers):
            if _matches(v, p):
                del self._vouchers[i]
                self.vouched.add(model_hash)
                return True
        return False

    def remember(self, model_hash: str, params: np.ndarray) -> None:
        """A model scored without a reception to vouch for it (the new global model, scored before the next
        round): kept (at most MAX_VOUCHERS) so that the next int8 reception approximating it vouches for it."""
        if self.mode is not DownlinkMode.DELTA_INT8:
            return
        self._candidates[model_hash] = _f32(params).copy()
        while len(self._candidates) > MAX_VOUCHERS:
            self._candidates.pop(next(iter(self._candidates)))

    def _hold(self, params: np.ndarray) -> None:
        self.held = params
        self.held_version = version_of(params)


def _matches(v: _Voucher, params: np.ndarray) -> bool:
    if params.shape != v.base.shape:
        return False
    q, s = quantize_delta(params.astype(np.float64) - v.base.astype(np.float64))
    return bool(np.array_equal(q, v.q) and np.array_equal(s.view("<u4"), v.scale.view("<u4")))


# -- the coordinator half ------------------------------------------------------------------------
@dataclass
class _Held:
    version: str
    params: np.ndarray
    epoch: Any


class DownlinkTransport:
    """The coordinator half: wraps a :class:`~insitu.federation.transport.Transport` so that the dense
    ``params`` of each TRAIN and EVALUATE request go to each site as a delta against the model that site holds.

    Everything else passes through unchanged.  Byte counts are those of the messages actually sent (a
    dense retry after a refusal counts both).  ``held`` is the coordinator's copy of every site's model,
    identical bit for bit to the site's own (tests compare them).  ``stats`` counts requests sent each
    way: TRAIN as ``delta``/``dense``, EVALUATE as ``evaluate_delta``/``evaluate_dense``; ``retried``
    counts deltas refused for an unknown base and sent again dense."""

    def __init__(self, inner: Transport, mode: DownlinkMode):
        if mode is DownlinkMode.DENSE:
            raise ConfigError("DownlinkTransport is for delta downlinks; a dense plan uses its transport as it is")
        self.inner = inner
        self.mode = mode
        self.held: dict[str, _Held] = {}
        self.stats = {"delta": 0, "dense": 0, "evaluate_delta": 0, "evaluate_dense": 0, "retried": 0}

    def sites(self) -> list[str]:
        return self.inner.sites()

    def __getattr__(self, name: str) -> Any:  # site_status, wait_for, connections of a network transport
        if name == "inner":  # not yet set (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)

    def _encoding(self, req: Message, held: _Held, target_version: str) -> DownlinkMode:
        """An evaluation's model goes lossless (the site scores exactly it); so does a TRAIN's when the site
        already holds exactly that model (its lossless delta is all zeros); otherwise the plan's encoding."""
        if req.kind is MessageKind.EVALUATE or held.version == target_version:
            return DownlinkMode.DELTA
        return self.mode

    def _smaller(self, req: Message, mode: DownlinkMode, base: np.ndarray, target: np.ndarray) -> tuple[dict[str, Any], dict[str, np.ndarray], np.ndarray] | None:
        """The delta of ``target`` against ``base`` if its message is smaller than the dense one's, else None."""
        from insitu.federation.messages import encode

        meta, tensors, recon = encode_delta(mode, base, target)
        recon.flags.writeable = False
        as_delta = encode(Message(req.kind, req.round, req.job, {DOWNLINK_KEY: meta}, tensors))
        as_dense = encode(Message(req.kind, req.round, req.job, {}, {"params": target}))
        return (meta, tensors, recon) if len(as_delta) < len(as_dense) else None

    def exchange(self, requests: Mapping[str, Message], timeout: float) -> Exchange:
        from insitu.federation.planref import connection_epochs, merge_retry

        epochs = connection_epochs(self.inner)
        # one read-only copy per distinct model, shared by every site that holds it (memory: one model per version)
        copies: dict[int, tuple[np.ndarray, str]] = {}

        def frozen(arr: np.ndarray) -> tuple[np.ndarray, str]:
            if id(arr) not in copies:
                c = _f32(arr).copy()
                c.flags.writeable = False
                copies[id(arr)] = (c, version_of(c))
            return copies[id(arr)]

        sent: dict[str, Message] = {}
        rebuilt: dict[str, tuple[np.ndarray, bool]] = {}  # site → (what it will hold if it answers, delta?)
        cache: dict[tuple[str, DownlinkMode, str], tuple[dict[str, Any], dict[str, np.ndarray], np.ndarray] | None] = {}
        for sid, req in requests.items():
            if req.kind not in _ANSWER or "params" not in req.tensors or DOWNLINK_KEY in req.meta:
                sent[sid] = req
                continue
            target, version = frozen(req.tensors["params"])
            held = self.held.get(sid)
            delta = None
            if held is not None and held.epoch == epochs.get(sid) and held.params.shape == target.shape:
                mode = self._encoding(req, held, version)
                key = (held.version, mode, version)
                if key not in cache:
                    found = self._smaller(req, mode, held.params, target)
                    if found is not None and mode is DownlinkMode.DELTA:  # lossless: the site rebuilds exactly the model
                        found = (found[0], found[1], target)  # so it shares the model's one read-only copy
                    cache[key] = found
                delta = cache[key]
            if delta is None:  # nothing held, a reconnected site, or the delta would not be smaller (a tiny model)
                sent[sid] = req
                rebuilt[sid] = (target, False)
                continue
            meta, tensors, recon = delta
            others = {k: v for k, v in req.tensors.items() if k != "params"}
            sent[sid] = Message(req.kind, req.round, req.job, {**req.meta, DOWNLINK_KEY: meta}, {**others, **tensors})
            rebuilt[sid] = (recon, True)
        t0 = _now()
        ex = self.inner.exchange(sent, timeout)
        retry = [s for s in rebuilt if rebuilt[s][1] and UNKNOWN_BASE in ex.dropped.get(s, "")]
        if retry:  # the site does not hold the base (its Site was rebuilt): the dense model, at once
            again = self.inner.exchange({s: requests[s] for s in retry}, max(1.0, timeout - (_now() - t0)))
            ex = merge_retry(ex, again, retry)
            for s in retry:
                rebuilt[s] = (frozen(requests[s].tensors["params"])[0], False)
            self.stats["retried"] += len(retry)
        versions = {id(c): v for c, v in copies.values()}  # ids of live arrays only: the copies and the cached reconstructions
        for sid, (model, delta) in rebuilt.items():
            kind = requests[sid].kind
            self.stats[("" if kind is MessageKind.TRAIN else "evaluate_") + ("delta" if delta else "dense")] += 1
            rep = ex.replies.get(sid)
            if rep is not None and rep.kind is _ANSWER[kind]:
                if id(model) not in versions:
                    versions[id(model)] = version_of(model)
                self.held[sid] = _Held(versions[id(model)], model, epochs.get(sid))
            else:
                self.held.pop(sid, None)  # whatever it holds now, it gets the dense model next time
        return ex


#: requests whose model goes as a delta, and the reply that shows the site took it
_ANSWER = {MessageKind.TRAIN: MessageKind.TRAIN_REPLY, MessageKind.EVALUATE: MessageKind.EVALUATE_REPLY}


def _now() -> float:
    import time

    return time.monotonic()


__all__ = ["DownlinkMode", "DownlinkReceiver", "DownlinkTransport", "encode_delta", "apply_delta", "quantize_delta", "version_of",
           "DOWNLINK_KEY", "UNKNOWN_BASE"]
