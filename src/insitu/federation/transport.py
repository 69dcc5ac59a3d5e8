"""How the round engine talks to sites: one call, ``exchange``.

The coordinator's round logic is written once against :class:`Transport`; the
in-process transport (simulation) and the mTLS transport (deployment) differ
only in how a request reaches a site and its reply comes back.  A site that
does not answer in time, fails, or answers with an ERROR message is *dropped*
from that exchange; the caller decides whether enough remain.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol

import numpy as np

from insitu.errors import InsituError, ProtocolError
from insitu.federation.messages import Message, MessageKind, decode, encode, error_reply


def sort_reply(sid: str, reply: Message, elapsed: float, timeout: float, replies: dict, dropped: dict,
               refused: dict | None = None) -> None:
    """File one site's decoded reply: too late or a refusal drops the site (with the reason), else it is
    kept; a refusal's code goes into ``refused`` (see :func:`refusal_code`)."""
    if elapsed > timeout:
        dropped[sid] = f"timed out ({elapsed:.1f} s > {timeout:.1f} s)"
    elif reply.kind is MessageKind.ERROR:
        dropped[sid] = f"refused: {error_reason(reply)}"
        if refused is not None:
            refused[sid] = refusal_code(reply)
    else:
        replies[sid] = reply


def answer(handle: Callable[[Message], Message], req: Message, max_bytes: int | None) -> tuple[bytes, float]:
    """A simulated site's encoded reply to ``req`` and the seconds its handler took, as a deployed site
    answers: a refusal or a crash becomes an ERROR reply naming it, and so does a reply that cannot be
    encoded (NaN in its meta, too large), so one site never takes the simulation down."""
    start = time.perf_counter()
    try:
        reply = handle(req)
    except InsituError as exc:
        reply = error_reply(req, str(exc), code=type(exc).__name__)
    except Exception as exc:  # a site crashing must not crash the coordinator
        reply = error_reply(req, f"site crashed: {type(exc).__name__}: {exc}", code="crash")
    elapsed = time.perf_counter() - start
    try:
        return encode(reply, max_bytes=max_bytes), elapsed
    except ProtocolError as exc:
        return encode(error_reply(req, f"reply cannot be sent: {exc}", code="ProtocolError"), max_bytes=max_bytes), elapsed


@dataclass(frozen=True)
class Exchange:
    """What came back from one broadcast: replies, and why the others are missing."""

    replies: dict[str, Message]
    dropped: dict[str, str]
    bytes_sent: dict[str, int] = field(default_factory=dict)
    bytes_received: dict[str, int] = field(default_factory=dict)
    #: the code of each refusal among ``dropped`` (a site's ERROR reply): what a caller acts on, never the wording
    refused: dict[str, str] = field(default_factory=dict)


class Transport(Protocol):
    def sites(self) -> list[str]:
        """Identities of the sites currently reachable."""
        ...

    def exchange(self, requests: Mapping[str, Message], timeout: float) -> Exchange:
        """Send each site its request; gather the replies that arrive within ``timeout`` seconds."""
        ...


class SiteHandler(Protocol):
    site_id: str

    def handle(self, msg: Message) -> Message: ...


#: decides, per (site, round, request kind), whether that site fails now; for drop-out tests.
FailurePlan = Callable[[str, int, MessageKind], bool]


class InProcessTransport:
    """Sites living in this process.  Every message is encoded and decoded, exactly as on the wire,
    so that simulation exercises the codec and counts the bytes a deployment would send."""

    def __init__(self, sites: Mapping[str, SiteHandler], *, fail: FailurePlan | None = None, max_bytes: int | None = None):
        self._sites = dict(sites)
        self._fail = fail
        self._max = max_bytes or 256 * 1024 * 1024

    def sites(self) -> list[str]:
        return list(self._sites)

    def exchange(self, requests: Mapping[str, Message], timeout: float) -> Exchange:
        replies: dict[str, Message] = {}
        dropped: dict[str, str] = {}
        sent: dict[str, int] = {}
        recv: dict[str, int] = {}
        refused: dict[str, str] = {}
        for sid, req in requests.items():
            site = self._sites.get(sid)
            if site is None:
                dropped[sid] = f"unknown site {sid!r}"
                continue
            if self._fail is not None and self._fail(sid, req.round, req.kind):
                dropped[sid] = "site failed (injected drop-out)"
                continue
            wire = encode(req, max_bytes=self._max)
            sent[sid] = len(wire)
            back, elapsed = answer(site.handle, decode(wire, max_bytes=self._max), self._max)
            recv[sid] = len(back)
            reply = decode(back, max_bytes=self._max)
            sort_reply(sid, reply, elapsed, timeout, replies, dropped, refused)
        return Exchange(replies, dropped, sent, recv, refused)


def check_reply(reply: Message, kind: MessageKind, round_: int, job: str) -> None:
    """A reply must be of the expected kind and belong to this job and round (no replays)."""
    if reply.kind is not kind:
        raise ProtocolError(f"expected {kind.value}, got {reply.kind.value}")
    if reply.round != round_ or reply.job != job:
        raise ProtocolError(f"reply is for job {reply.job!r} round {reply.round}, expected {job!r} round {round_}")


def finite_vector(arr: np.ndarray, size: int, what: str) -> np.ndarray:
    """Refuse a vector of the wrong length or with NaN/inf (a poisoned or broken update)."""
    if arr.ndim != 1 or arr.shape[0] != size:
        raise ProtocolError(f"{what} has shape {tuple(arr.shape)}, expected ({size},)")
    if not np.all(np.isfinite(arr)):
        bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
        raise ProtocolError(f"{what} holds {bad} NaN or infinite values")
    return arr


#: the most metrics one reply may carry, and the longest text value
MAX_METRICS = 64
MAX_METRIC_TEXT = 200


def reply_metrics(rep: Message) -> dict[str, Any]:
    """The ``metrics`` object of a site's reply, checked: a flat object of at most MAX_METRICS
    numbers, booleans or short strings.  Anything else is a ProtocolError (the site is dropped)."""
    m = rep.meta.get("metrics", {})
    if not isinstance(m, dict) or len(m) > MAX_METRICS:
        raise ProtocolError(f"{rep.kind.value} metrics must be an object of at most {MAX_METRICS} entries, got {type(m).__name__}")
    for k, v in m.items():
        if isinstance(v, str):
            if len(v) > MAX_METRIC_TEXT:
                raise ProtocolError(f"metric {k!r} is a string of {len(v)} characters (limit {MAX_METRIC_TEXT})")
        elif not isinstance(v, (int, float, bool)) or isinstance(v, float) and not np.isfinite(v):
            raise ProtocolError(f"metric {k!r} = {v!r} is not a finite number, boolean or short string")
    return dict(m)


#: the most test records one site may report scoring (far above any hospital's test split)
MAX_EVAL_RECORDS = 10**9
#: the keys every EVALUATE_REPLY holds (what insitu.learn.train.evaluate returns)
EVALUATION_KEYS = frozenset({"loss", "correct", "n", "accuracy"})
#: keys it may hold besides (``evaluate(..., by_class=True)``): per-class counts, and AUROC for a binary task
EVALUATION_EXTRA = frozenset({"n_by_class", "correct_by_class", "auc", "threshold"})
#: the most classes per-class counts may list
MAX_EVAL_CLASSES = 1000


def reply_evaluation(rep: Message) -> dict[str, Any]:
    """The scores of a site's EVALUATE_REPLY, checked against their schema: ``loss`` (a finite
    number >= 0), ``n`` (an integer from 1 to MAX_EVAL_RECORDS), ``correct`` (an integer from 0 to n)
    and ``accuracy`` (= correct / n); optionally ``n_by_class`` and ``correct_by_class`` (together:
    lists of 2 to MAX_EVAL_CLASSES integers summing to n and correct, each correct count at most its
    class count), ``auc`` (a number in [0, 1], or None when the split holds one class) and
    ``threshold`` (a risk in [0, 1], or None).
    Anything else is a ProtocolError naming the field."""
    meta = rep.meta
    if not EVALUATION_KEYS <= set(meta) <= EVALUATION_KEYS | EVALUATION_EXTRA:
        extra, missing = sorted(set(meta) - EVALUATION_KEYS - EVALUATION_EXTRA), sorted(EVALUATION_KEYS - set(meta))
        raise ProtocolError(f"evaluate reply must hold {sorted(EVALUATION_KEYS)} (and may hold {sorted(EVALUATION_EXTRA)})"
                            + (f"; unknown {_clip(extra)}" if extra else "") + (f"; missing {missing}" if missing else ""))

    def integer(key: str, low: int, high: int) -> int:
        v = meta[key]
        if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
            raise ProtocolError(f"evaluate reply field {key!r} = {_clip(v)} is not an integer from {low} to {high}")
        return v

    def number(key: str) -> float:
        v = meta[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ProtocolError(f"evaluate reply field {key!r} = {_clip(v)} is not a finite number >= 0")
        return float(v)

    n = integer("n", 1, MAX_EVAL_RECORDS)
    correct = integer("correct", 0, n)
    loss, acc = number("loss"), number("accuracy")
    if abs(acc - correct / n) > 1e-9:
        raise ProtocolError(f"evaluate reply accuracy {acc!r} is not correct / n = {correct}/{n}")
    out: dict[str, Any] = {"loss": loss, "correct": correct, "n": n, "accuracy": acc}
    if ("n_by_class" in meta) != ("correct_by_class" in meta):
        raise ProtocolError("evaluate reply must hold n_by_class and correct_by_class together, or neither")
    if "n_by_class" in meta:
        counts, hits = meta["n_by_class"], meta["correct_by_class"]
        for key, v in (("n_by_class", counts), ("correct_by_class", hits)):
            if not isinstance(v, list) or not 2 <= len(v) <= MAX_EVAL_CLASSES or not all(
                    isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= n for x in v):
                raise ProtocolError(f"evaluate reply field {key!r} = {_clip(v)} is not a list of 2 to {MAX_EVAL_CLASSES} counts from 0 to n")
        if len(counts) != len(hits) or sum(counts) != n or sum(hits) != correct or any(h > c for h, c in zip(hits, counts)):
            raise ProtocolError(f"evaluate reply per-class counts {_clip(counts)} / correct {_clip(hits)} do not add up to n = {n}, correct = {correct}")
        out["n_by_class"], out["correct_by_class"] = list(counts), list(hits)
    if "auc" in meta:
        a = meta["auc"]
        if a is not None and (isinstance(a, bool) or not isinstance(a, (int, float)) or not 0.0 <= a <= 1.0):
            raise ProtocolError(f"evaluate reply field 'auc' = {_clip(a)} is not a number in [0, 1] (or null)")
        out["auc"] = None if a is None else float(a)
    if "threshold" in meta:  # validation split of a binary task: the site's Score 1 threshold, a risk
        v = meta["threshold"]
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0):
            raise ProtocolError(f"evaluate reply field 'threshold' = {_clip(v)} is not a risk in [0, 1] (or null)")
        out["threshold"] = None if v is None else float(v)
    return out


#: the longest refusal reason kept from a site's ERROR reply (the rest is cut)
MAX_REASON = 500


def refusal_code(reply: Message) -> str:
    """The code of a site's ERROR reply (its error class name, e.g. ``UnknownPlanError``), checked: a
    short identifier, else ``"malformed"`` (a hostile site's code is never echoed or acted on as given)."""
    code = reply.meta.get("code")
    if isinstance(code, str) and 0 < len(code) <= 64 and code.isidentifier():
        return code
    return "malformed"


def error_reason(reply: Message) -> str:
    """The reason of a site's ERROR reply as text for the operator: a string, cut to MAX_REASON
    characters; anything else (a site's malformed refusal) is named as such."""
    reason = reply.meta.get("reason")
    if not isinstance(reason, str):
        return f"(malformed refusal: reason is {type(reason).__name__}, not text)"
    return _clip(reason, MAX_REASON, text=True)


def _clip(value: Any, limit: int = 80, *, text: bool = False) -> str:
    s = value if text else repr(value)
    return s if len(s) <= limit else s[: limit - 3] + "..."
