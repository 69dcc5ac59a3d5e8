"""The gateway's HTTP API: authenticate, ask the one policy decision point, audit, answer.

Order of checks for every protected endpoint, fixed here so that no endpoint
can skip one: credentials (401) → policy decision, written to the audit log
whether it permits or denies (403 names the rule) → input validation (422
names the field) → the work.  Authorization runs as a FastAPI dependency so it
happens before the request body is even parsed: a role that may not write
learns nothing from the validator about what a valid write would look like.

Nothing here decides access by itself: :meth:`Gateway.enforce` is the only
caller of :meth:`PolicyDecisionPoint.decide`.
"""
import datetime as dt
import zoneinfo
from dataclasses import dataclass, field
from typing import Annotated, Any, Callable, Mapping, Protocol

from cryptography import x509
from cryptography.x509.oid import NameOID
from fastapi import Depends, FastAPI, HTTPException, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, create_model

from insitu.audit import AuditAction
from insitu.errors import AuthError, DataError, SecurityError
from insitu.gateway.config import MtlsClient
from insitu.gateway.model import ServedModel
from insitu.gateway.policy import AccessRequest, Action, Decision, PolicyDecisionPoint, ResourceType, Role
from insitu.gateway.records import (
    PSEUDONYM_PATTERN, NursingView, Record, RecordBody, RecordPatch, RecordStore, nursing_view,
)
from insitu.gateway.tls import PEER_KEY
from insitu.gateway.tokens import TokenVerifier

Clock = Callable[[], dt.datetime]


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class AuditSink(Protocol):
    """What the gateway needs of an audit log: a thread-safe, durable ``append``.

    ``insitu.audit.AuditLog`` provides it; :class:`insitu.gateway.auditing.GroupCommitAudit` wraps
    one so concurrent requests share a transaction."""

    def append(self, action: AuditAction, subject: str, details: Mapping[str, Any]) -> Any: ...


class RevocationCheck(Protocol):
    def refresh(self) -> bool: ...

    def is_revoked(self, serial: int) -> bool: ...


@dataclass(frozen=True)
class Principal:
    subject: str
    role: Role
    method: str  # "token" | "mtls"
    ward: str | None = None
    shift: str | None = None


class _Unauthenticated(Exception):
    pass


class _Denied(Exception):
    def __init__(self, decision: Decision):
        self.decision = decision


class _AuditUnavailable(Exception):
    pass


@dataclass
class Gateway:
    """Everything a request needs; built once by :func:`build_gateway` or by tests."""

    pdp: PolicyDecisionPoint
    verifier: TokenVerifier
    store: RecordStore
    audit: AuditSink
    model: ServedModel | None = None
    clock: Clock = utc_now
    tz: zoneinfo.ZoneInfo = field(default_factory=lambda: zoneinfo.ZoneInfo("UTC"))
    mtls_clients: Mapping[str, MtlsClient] = field(default_factory=dict)
    revocation: RevocationCheck | None = None

    # -- audit -------------------------------------------------------------------------------------
    def record(self, stage: str, subject: str, details: Mapping[str, Any]) -> None:
        """Append a ``gateway.decision`` entry; if that fails the request fails (no unaudited access).

        ``stage`` is authn (credentials refused), authz (a policy decision) or write (a record changed)."""
        try:
            self.audit.append(AuditAction.GATEWAY_DECISION, subject, {"stage": stage, **details})
        except Exception as exc:  # noqa: BLE001 - any failure to audit must refuse service
            raise _AuditUnavailable(str(exc)) from exc

    # -- authentication ----------------------------------------------------------------------------
    def authenticate(self, request: Request, bearer: HTTPAuthorizationCredentials | None) -> Principal:
        try:
            return self._authenticate(request, bearer)
        except AuthError as exc:
            self.record("authn", "anonymous", {
                "decision": "deny", "reason": str(exc), "method": request.method, "path": request.url.path,
                "client": request.client.host if request.client else None,
            })
            raise _Unauthenticated(str(exc)) from None

    def _authenticate(self, request: Request, bearer: HTTPAuthorizationCredentials | None) -> Principal:
        header = request.headers.get("authorization")
        if header is not None:
            if bearer is None or bearer.scheme.lower() != "bearer":
                raise AuthError("Authorization header must be 'Bearer <token>'")
            c = self.verifier.verify(bearer.credentials, self.clock())
            return Principal(c.subject, c.role, "token", c.ward, c.shift)
        der = (request.scope.get("state") or {}).get(PEER_KEY)
        if der:
            return self._from_certificate(der)
        raise AuthError("no credentials: send 'Authorization: Bearer <token>' or a consortium client certificate")

    def _from_certificate(self, der: bytes) -> Principal:
        cert = x509.load_der_x509_certificate(der)  # already verified against the CA by the TLS layer
        if self.revocation is not None:
            try:
                self.revocation.refresh()
            except SecurityError as exc:  # unreadable or forged CRL: no certificate is trusted then
                raise AuthError(f"cannot check certificate revocation: {exc}") from None
            if self.revocation.is_revoked(cert.serial_number):
                raise AuthError(f"client certificate serial {cert.serial_number} is revoked")
        cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if len(cns) != 1:
            raise AuthError("client certificate must carry exactly one common name")
        cn = str(cns[0].value)
        entry = self.mtls_clients.get(cn)
        if entry is None:
            raise AuthError(f"client certificate {cn!r} is not enrolled at this gateway ([[mtls.clients]])")
        return Principal(cn, entry.role, "mtls", entry.ward, entry.shift)

    # -- authorization -----------------------------------------------------------------------------
    def environment(self, request: Request, who: Principal) -> dict[str, Any]:
        now = self.clock().astimezone(self.tz)
        return {
            "time": now, "hour": now.hour, "weekday": now.strftime("%a").lower(),
            "client_ip": request.client.host if request.client else None, "auth_method": who.method,
            "tls": request.url.scheme == "https",
        }

    def enforce(self, request: Request, who: Principal, action: Action, rtype: ResourceType,
                resource: Mapping[str, Any]) -> Decision:
        """The only place a decision is asked for; every outcome is audited before it takes effect."""
        req = AccessRequest(
            role=who.role, action=action, resource_type=rtype,
            subject={"id": who.subject, "ward": who.ward, "shift": who.shift},
            resource=dict(resource), environment=self.environment(request, who),
        )
        decision = self.pdp.decide(req)
        self.record("authz", who.subject, {
            **decision.as_dict(), "role": who.role.value, "auth": who.method, "action": action.value,
            "resource": rtype.value, **{k: v for k, v in resource.items() if v is not None},
            "method": request.method, "path": request.url.path,
        })
        if not decision.allowed:
            raise _Denied(decision)
        return decision


# -- request / response bodies ----------------------------------------------------------------------
class ModelInfo(BaseModel):
    model: str
    task_hash: str
    features: list[str]
    training_sites: list[str]
    rounds: int
    epsilon: float | None
    delta: float | None
    differential_privacy: bool
    strategy: str | None
    mean_site_accuracy: float | None


class Prediction(BaseModel):
    risk: float = Field(description="probability of the positive class (heart disease for the heart task)")
    threshold: float
    positive: bool
    model: ModelInfo


class Problem(BaseModel):
    detail: str


class DeniedBody(BaseModel):
    detail: str
    decision: str
    rule: str
    reason: str


class ValidationBody(BaseModel):
    detail: str
    field: str
    errors: list[dict[str, Any]]


_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": Problem, "description": "no, expired or forged credentials"},
    403: {"model": DeniedBody, "description": "the policy denies this; the body names the rule"},
    422: {"model": ValidationBody, "description": "malformed input; the body names the field"},
}


def _features_model(model: ServedModel | None) -> type[BaseModel]:
    names = model.features if model is not None else ()
    fields: dict[str, Any] = {n: (float, Field(allow_inf_nan=False, ge=-1e6, le=1e6)) for n in names}
    feats = create_model("Features", __config__=ConfigDict(extra="forbid"), **fields)
    return create_model("PredictRequest", __config__=ConfigDict(extra="forbid"), features=(feats, ...))


MAX_BODY_BYTES = 64 * 1024


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
                return await self._too_large(send)
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
                return await self._too_large(send)
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

    async def _too_large(self, send: Callable) -> None:
        body = ('{"detail":"request body larger than %d bytes"}' % self.limit).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def create_app(gw: Gateway) -> FastAPI:
    """The FastAPI application over a :class:`Gateway`; serve it with :func:`insitu.gateway.tls.serve`."""
    app = FastAPI(
        title="insitu medical-agent gateway",
        version="1",
        description="Role-based access to a site's records and to the federated model. "
                    "Doctors read and update records; nurses read the de-identified nursing view; "
                    "AI agents run inference on anonymized feature vectors and never see a record.",
    )
    app.add_middleware(BodyLimit)
    bearer_scheme = HTTPBearer(auto_error=False, description="token from `insitu gateway token`")

    @app.exception_handler(_Unauthenticated)
    async def _401(_r: Request, exc: _Unauthenticated) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=401, headers={"WWW-Authenticate": "Bearer"})

    @app.exception_handler(_Denied)
    async def _403(_r: Request, exc: _Denied) -> JSONResponse:
        d = exc.decision
        return JSONResponse({"detail": f"denied by rule {d.rule}: {d.reason}", **d.as_dict()}, status_code=403)

    @app.exception_handler(_AuditUnavailable)
    async def _503(_r: Request, exc: _AuditUnavailable) -> JSONResponse:
        return JSONResponse({"detail": f"audit log unavailable, request refused: {exc}"}, status_code=503)

    @app.exception_handler(RequestValidationError)
    async def _422(_r: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"field": ".".join(str(p) for p in e.get("loc", ())), "message": e.get("msg", "")} for e in exc.errors()]
        first = errors[0] if errors else {"field": "body", "message": "invalid"}
        return JSONResponse(
            {"detail": f"invalid {first['field']}: {first['message']}", "field": first["field"], "errors": errors},
            status_code=422,
        )

    def principal(request: Request, bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)]) -> Principal:
        return gw.authenticate(request, bearer)

    Who = Annotated[Principal, Depends(principal)]
    PseudonymPath = Annotated[str, Path(pattern=PSEUDONYM_PATTERN, description="the patient's pseudonym at this site")]

    def record_guard(action: Action, rtype: ResourceType) -> Callable[..., Principal]:
        def guard(request: Request, pseudonym: PseudonymPath, who: Who) -> Principal:
            gw.enforce(request, who, action, rtype, {"pseudonym": pseudonym, "ward": gw.store.ward_of(pseudonym)})
            return who
        return guard

    def model_guard(action: Action) -> Callable[..., Principal]:
        def guard(request: Request, who: Who) -> Principal:
            gw.enforce(request, who, action, ResourceType.MODEL, {"model": gw.model.card.task_hash if gw.model else None})
            return who
        return guard

    def need(pseudonym: str) -> Record:
        rec = gw.store.get(pseudonym)
        if rec is None:
            raise HTTPException(404, f"no record with pseudonym {pseudonym}")
        return rec

    def served() -> ServedModel:
        if gw.model is None:
            raise HTTPException(503, "no model loaded: set [model] run_dir in gateway.toml")
        return gw.model

    @app.get("/health", tags=["service"])
    def health() -> dict[str, Any]:
        """Liveness without credentials; tells nothing about patients."""
        return {"status": "ok", "model_loaded": gw.model is not None}

    @app.get("/records/{pseudonym}", response_model=Record, tags=["records"],
             responses={**_ERRORS, 404: {"model": Problem}})
    def read_record(pseudonym: PseudonymPath, who: Annotated[Principal, Depends(record_guard(Action.READ, ResourceType.RECORD))]) -> Record:
        """The full medical record (doctors)."""
        return need(pseudonym)

    @app.put("/records/{pseudonym}", response_model=Record, tags=["records"], responses=_ERRORS)
    def replace_record(request: Request, pseudonym: PseudonymPath, body: RecordBody,
                       who: Annotated[Principal, Depends(record_guard(Action.UPDATE, ResourceType.RECORD))]) -> Record:
        """Create or replace a record (doctors)."""
        rec = gw.store.put(pseudonym, body, gw.clock())
        gw.record("write", who.subject, {"pseudonym": pseudonym, "version": rec.version, "fields": sorted(RecordBody.model_fields)})
        return rec

    @app.patch("/records/{pseudonym}", response_model=Record, tags=["records"],
               responses={**_ERRORS, 404: {"model": Problem}, 409: {"model": Problem}})
    def update_record(pseudonym: PseudonymPath, body: RecordPatch,
                      who: Annotated[Principal, Depends(record_guard(Action.UPDATE, ResourceType.RECORD))]) -> Record:
        """Change some fields of a record (doctors)."""
        changes = body.changes()
        if not changes:
            raise RequestValidationError([{"loc": ("body",), "msg": "a PATCH must change at least one field", "type": "value_error"}])
        try:
            rec = gw.store.patch(pseudonym, body, gw.clock())
        except DataError as exc:
            raise HTTPException(409, str(exc)) from None
        if rec is None:
            raise HTTPException(404, f"no record with pseudonym {pseudonym}")
        gw.record("write", who.subject, {"pseudonym": pseudonym, "version": rec.version, "fields": sorted(changes)})
        return rec

    @app.get("/nursing/{pseudonym}", response_model=NursingView, tags=["records"],
             responses={**_ERRORS, 404: {"model": Problem}})
    def read_nursing(pseudonym: PseudonymPath, who: Annotated[Principal, Depends(record_guard(Action.READ, ResourceType.NURSING_VIEW))]) -> NursingView:
        """The de-identified nursing subset of a record (nurses, doctors)."""
        return nursing_view(need(pseudonym), gw.clock().astimezone(gw.tz).date())

    PredictRequest = _features_model(gw.model)

    @app.post("/predict", response_model=Prediction, tags=["model"], responses={**_ERRORS, 503: {"model": Problem}})
    def predict(body: PredictRequest, who: Annotated[Principal, Depends(model_guard(Action.INFER))]) -> Prediction:  # type: ignore[valid-type]
        """Risk score from the federated model for one anonymized, standardized feature vector (AI agents)."""
        m = served()
        x = m.vector(body.features.model_dump())  # type: ignore[attr-defined]
        risk = m.risk(x)
        return Prediction(risk=risk, threshold=0.5, positive=risk >= 0.5, model=ModelInfo(**m.card.as_dict()))

    @app.get("/model", response_model=ModelInfo, tags=["model"], responses={**_ERRORS, 503: {"model": Problem}})
    def model_card(who: Annotated[Principal, Depends(model_guard(Action.READ))]) -> ModelInfo:
        """The model card: training sites, rounds, ε and δ, the feature schema /predict expects."""
        return ModelInfo(**served().card.as_dict())

    return app


__all__ = ["Gateway", "Principal", "AuditSink", "create_app", "utc_now"]
