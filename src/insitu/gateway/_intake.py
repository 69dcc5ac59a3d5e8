"""What the gateway accepts from a client, and the audit entry that every request leaves.

Bodies are read by :func:`parse_body` only after the route's guard has
authenticated the caller and asked the policy: routes declare no pydantic body
parameter (FastAPI would parse that before any dependency runs).  A body then
passes four gates, each refusing with a status and a sentence that names the
problem:

======  ==============================================================
413     over :data:`MAX_BODY_BYTES` (checked by :class:`BodyLimit` before the body is read)
415     not ``application/json``
400     not UTF-8, not JSON, a key given twice, nested deeper than
        :data:`BODY_LIMITS` or with more elements
422     a field of the wrong type or range, strictly: ``true`` is not a
        number, ``0`` is not a boolean, ``false`` is not a string
======  ==============================================================

:class:`AuditEveryRequest` is the outermost layer: a request that ends in a
refusal (4xx/5xx) which no decision of the gateway has audited yet (a 413, a
422 on the path or the body, a 404, a 405, a 500) gets a ``stage: outcome``
entry naming the status and the reason, written before the response leaves.
Only ``GET``/``HEAD`` of :data:`UNAUDITED_PATHS` that succeed are not logged.
"""
from __future__ import annotations

import http
from dataclasses import dataclass
from typing import Any, Callable

import anyio
from fastapi import Request
from pydantic import BaseModel, ValidationError

from insitu import strictjson
from insitu.errors import DataError

MAX_BODY_BYTES = 64 * 1024
#: a 64 KiB body cannot hold more than ~32,000 elements; no valid body has more than a few hundred
BODY_LIMITS = strictjson.JSONLimits(max_depth=32, max_items=10_000)
#: liveness and the API description: public, carry no patient data, are not audited when they succeed
UNAUDITED_PATHS = frozenset({"/health", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})
LEDGER_KEY = "insitu_audit_ledger"


@dataclass
class RequestLedger:
    """What one request has written to the audit log so far (kept in ``scope['state']``)."""

    entries: int = 0
    refused: bool = False  # a deny was audited (401/403): the refusal is already explained
    subject: str = "anonymous"
    reason: str | None = None
    field: str | None = None


def ledger_of(scope_or_request: Any) -> RequestLedger | None:
    scope = scope_or_request.scope if isinstance(scope_or_request, Request) else scope_or_request
    ledger = (scope.get("state") or {}).get(LEDGER_KEY)
    return ledger if isinstance(ledger, RequestLedger) else None


def note_refusal(request: Request, reason: str, field: str | None = None) -> None:
    """Tell :class:`AuditEveryRequest` why this request is being refused."""
    ledger = ledger_of(request)
    if ledger is not None:
        ledger.reason, ledger.field = reason, field


class BodyRefused(Exception):
    """A request body refused before it reached a handler; rendered as ``{detail, field, errors}``."""

    def __init__(self, status: int, field: str, message: str, errors: list[dict[str, str]] | None = None):
        super().__init__(f"invalid {field}: {message}")
        self.status = status
        self.field = field
        self.errors = errors or [{"field": field, "message": message}]

    def body(self) -> dict[str, Any]:
        return {"detail": str(self), "field": self.field, "errors": self.errors}


def _is_json(content_type: str | None) -> bool:
    media = (content_type or "").split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


async def parse_body(request: Request, model: type[BaseModel]) -> BaseModel:
    """Read, strictly parse and validate the body as ``model``; any failure is a :class:`BodyRefused`."""
    raw = await request.body()  # BodyLimit has already bounded its size
    if not raw.strip():
        raise BodyRefused(422, "body", f"a JSON object ({model.__name__}) is required")
    if not _is_json(request.headers.get("content-type")):
        raise BodyRefused(415, "body", f"content type {request.headers.get('content-type')!r} is not application/json")
    try:
        strictjson.loads(raw, limits=BODY_LIMITS, error=DataError, what="request body", allow_nan=True)
    except DataError as exc:
        raise BodyRefused(400, "body", str(exc)) from None
    try:
        return model.model_validate_json(raw, strict=True)
    except ValidationError as exc:
        errors = [
            {"field": ".".join(["body", *(str(p) for p in e.get("loc", ()))]), "message": e.get("msg", "invalid")}
            for e in exc.errors(include_url=False, include_input=False)
        ]
        first = errors[0] if errors else {"field": "body", "message": "invalid"}
        raise BodyRefused(422, first["field"], first["message"], errors) from None


class BodyLimit:
    """Refuse request bodies over ``limit`` bytes with 413 before the app reads them into memory."""

    def __init__(self, app: Any, limit: int = MAX_BODY_BYTES):
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers", [])).get(b"content-length")
        if length is not None:  # the HTTP layer delivers exactly this many bytes
            if not length.isdigit() or int(length) > self.limit:
                return await self._too_large(scope, send, f"Content-Length {length.decode('latin-1')[:20]!r}")
            return await self.app(scope, receive, send)
        # chunked or no body: read at most `limit` bytes here, then replay them to the app
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":
                return  # client went away
            chunks.append(msg.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await self._too_large(scope, send, f"{size} bytes streamed so far")
            if not msg.get("more_body", False):
                break
        body, sent = b"".join(chunks), False

        async def replay() -> dict:
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _too_large(self, scope: dict, send: Callable, what: str) -> None:
        detail = f"request body larger than {self.limit} bytes ({what})"
        ledger = ledger_of(scope)
        if ledger is not None:
            ledger.reason, ledger.field = detail, "body"
        body = ('{"detail":"request body larger than %d bytes"}' % self.limit).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


#: writes one audit entry: (subject, details); raises if the log cannot take it
RecordOutcome = Callable[[str, dict[str, Any]], None]


class AuditEveryRequest:
    """Outermost ASGI layer: no request ends in a refusal that the audit log does not hold."""

    def __init__(self, app: Any, record: RecordOutcome):
        self.app, self.record = app, record

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        ledger = RequestLedger()
        scope.setdefault("state", {})[LEDGER_KEY] = ledger
        started = swallowed = False

        async def audited_send(message: dict) -> None:
            nonlocal started, swallowed
            if swallowed:
                return
            if message["type"] == "http.response.start" and not started:
                started = True
                try:
                    await self._account(scope, ledger, int(message["status"]))
                except Exception as exc:  # noqa: BLE001 - an outcome that cannot be audited is not sent
                    swallowed = True
                    await _send_json(send, 503, {"detail": f"audit log unavailable, request refused: {exc}"})
                    return
            await send(message)

        try:
            await self.app(scope, receive, audited_send)
        except Exception:
            if not started:  # the server answers 500; the log says so first
                ledger.reason = ledger.reason or "internal error"
                try:
                    await self._account(scope, ledger, 500)
                except Exception:  # noqa: BLE001 - the original error is the one to raise
                    pass
            raise

    async def _account(self, scope: dict, ledger: RequestLedger, status: int) -> None:
        method, path = scope.get("method", "?"), scope.get("path", "?")
        if status < 400 and (ledger.entries or (method in ("GET", "HEAD") and path in UNAUDITED_PATHS)):
            return
        if status >= 400 and ledger.refused:
            return
        client = scope.get("client")
        try:
            phrase = http.HTTPStatus(status).phrase
        except ValueError:
            phrase = "unknown status"
        details: dict[str, Any] = {
            "stage": "outcome", "decision": "refuse" if status >= 400 else "permit", "status": status,
            "reason": ledger.reason or phrase, "method": method, "path": path, "client": client[0] if client else None,
        }
        if ledger.field:
            details["field"] = ledger.field
        await anyio.to_thread.run_sync(self.record, ledger.subject, details)
        ledger.entries += 1


async def _send_json(send: Callable, status: int, payload: dict[str, Any]) -> None:
    import json

    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


__all__ = ["MAX_BODY_BYTES", "BODY_LIMITS", "BodyLimit", "BodyRefused", "AuditEveryRequest", "parse_body", "note_refusal"]
