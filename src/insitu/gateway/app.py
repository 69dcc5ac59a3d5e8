"""The gateway's HTTP API: authenticate, ask the one policy decision point, audit, answer.

Order of checks for every protected endpoint, fixed here so that no endpoint
can skip one: body size (413, before the body is read) → credentials (401) →
policy decision, written to the audit log whether it permits or denies (403
names the rule) → the body, read and parsed only now (415/400/422 name the
problem and the field, see :mod:`._intake`) → the work.  Routes declare no
pydantic body parameter, because FastAPI parses those before any dependency
runs: a caller without credentials, or a role that may not write, learns
nothing from the parser about what a valid write would look like.  Types are
strict: ``true`` is not a number, ``0`` is not a boolean.

Every request that is refused leaves an audit entry (401 and 403 as
``authn``/``authz`` decisions; 413, 415, 400, 422, 404, 405 and 5xx as an
``outcome`` entry written by :class:`._intake.AuditEveryRequest`).

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
from fastapi.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, create_model

from insitu.audit import AuditAction
from insitu.errors import AuthError, DataError, SecurityError
from insitu.gateway._intake import (
    BODY_LIMITS, MAX_BODY_BYTES, AuditEveryRequest, BodyLimit, BodyRefused, ledger_of, note_refusal, parse_body,
)
from insitu.gateway.config import MtlsClient
from insitu.gateway.model import ServedModel
from insitu.gateway.policy import AccessRequest, Action, Decision, PolicyDecisionPoint, ResourceType, Role
from insitu.gateway.records import PSEUDONYM_PATTERN, RecordStore
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
    def record(self, stage: str, subject: str, details: Mapping[str, Any], request: Request | None = None) -> None:
        """Append a ``gateway.decision`` entry; if that fails the request fails (no unaudited access).

        ``stage`` is authn (credentials refused), authz (a policy decision), write (a record changed)
        or outcome (a refusal no decision explains: 413, 400, 422, 404, ...)."""
        try:
            self.audit.append(AuditAction.GATEWAY_DECISION, subject, {"stage": stage, **details})
        except Exception as exc:  # noqa: BLE001 - any failure to audit must refuse service
            raise _AuditUnavailable(str(exc)) from exc
        ledger = ledger_of(request) if request is not None else None
        if ledger is not None:
            ledger.entries += 1
            ledger.refused = ledger.refused or details.get("decision") == "deny"

    # -- authentication ----------------------------------------------------------------------------
    def authenticate(self, request: Request, bearer: HTTPAuthorizationCredentials | None) -> Principal:
        try:
            return self._authenticate(request, bearer)
        except AuthError as exc:
            self.record("authn", "anonymous", {
                "decision": "deny", "reason": str(exc), "method": request.method, "path": request.url.path,
                "client": request.client.host if request.client else None,
            }, request)
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
        }, request)
        if not decision.allowed:
            raise _Denied(decision)
        return decision


# -- request / response bodies ----------------------------------------------------------------------
class ModelInfo(BaseModel):
    model: str
    input: str = Field(description="what /predict takes: tabular (features by name), physionet2012 (a 48-hour "
                                   "series of observations), image or sequence (insitu.gateway.inputs)")
    threshold: float = Field(0.5, description="risk at which a prediction is positive: chosen on the training sites' "
                                              "validation data where the run made that choice (physionet2012), else 0.5")
    task_hash: str
    plan_hash: str | None = Field(None, description="content hash of the plan the training sites approved (what `insitu site "
                                                    "pending` and each site's approvals name), when the run recorded it")
    features: list[str]
    training_sites: list[str]
    rounds: int
    epsilon: float | None
    delta: float | None
    differential_privacy: bool
    strategy: str | None
    mean_site_accuracy: float | None


class Prediction(BaseModel):
    risk: float = Field(description="probability of the positive class (heart disease for the heart task, "
                                    "in-hospital death for physionet2012)")
    threshold: float
    positive: bool
    ignored: dict[str, int] = Field(default_factory=dict, description="values dropped as physiologically impossible, "
                                                                      "per parameter (as in training)")
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


_LIMITS = (f"Limits: a request body of at most {MAX_BODY_BYTES} bytes (413 beyond, refused before it is read), "
           f"UTF-8 JSON nested at most {BODY_LIMITS.max_depth} levels with at most {BODY_LIMITS.max_items} elements "
           f"and no key given twice (400 otherwise); strict types: `true` is not a number, `0`/`false` is not a "
           f"string or boolean (422).")

_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": Problem, "description": "no, expired or forged credentials (audited)"},
    403: {"model": DeniedBody, "description": "the policy denies this; the body names the rule (audited)"},
    413: {"model": Problem, "description": f"request body over {MAX_BODY_BYTES} bytes, refused before it is read (audited)"},
    422: {"model": ValidationBody, "description": "malformed input; the body names the field (audited)"},
    503: {"model": Problem, "description": "the audit log cannot take the entry, so the request is refused"},
}
_BODY_ERRORS: dict[int | str, dict[str, Any]] = {
    **_ERRORS,
    400: {"model": ValidationBody, "description": f"the body is not UTF-8 JSON, gives a key twice, nests deeper than "
                                                  f"{BODY_LIMITS.max_depth} levels or has more than "
                                                  f"{BODY_LIMITS.max_items} elements; the detail says which (audited)"},
    415: {"model": ValidationBody, "description": "the body is not `application/json` (audited)"},
}


def _predict_model(model: ServedModel | None) -> type[BaseModel]:
    """The /predict body for the served model's task (:mod:`.inputs`); with no model, an empty feature table."""
    if model is not None:
        return model.input.request_model()
    feats = create_model("Features", __config__=ConfigDict(extra="forbid"))
    return create_model("PredictRequest", __config__=ConfigDict(extra="forbid"), features=(feats, ...))


def create_app(gw: Gateway) -> FastAPI:
    """The FastAPI application over a :class:`Gateway`; serve it with :func:`insitu.gateway.tls.serve`."""
    app = FastAPI(
        title="insitu medical-agent gateway",
        version="1",
        description="Role-based access to a site's records and to the federated model. "
                    "Doctors read and update records; nurses read the de-identified nursing view; "
                    "AI agents run inference on anonymized feature vectors and never see a record. "
                    "Every refused request is audited. " + _LIMITS,
    )
    app.add_middleware(BodyLimit)
    # outermost: sees every response, writes an `outcome` entry for a refusal nothing else audited
    app.add_middleware(AuditEveryRequest, record=lambda subject, details: gw.record("outcome", subject, details))
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

    @app.exception_handler(BodyRefused)
    async def _body(request: Request, exc: BodyRefused) -> JSONResponse:
        note_refusal(request, str(exc), exc.field)
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(exc.headers or {})
        if exc.status_code == 405:  # every method of every route on this path, not only the first route's
            allowed = sorted({m for r in app.router.routes if r.matches(request.scope)[0] is not Match.NONE
                              for m in getattr(r, "methods", None) or ()})
            headers["Allow"] = ", ".join(allowed)
        note_refusal(request, str(exc.detail))
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _422(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"field": ".".join(str(p) for p in e.get("loc", ())), "message": e.get("msg", "")} for e in exc.errors()]
        first = errors[0] if errors else {"field": "body", "message": "invalid"}
        note_refusal(request, f"invalid {first['field']}: {first['message']}", first["field"])
        return JSONResponse(
            {"detail": f"invalid {first['field']}: {first['message']}", "field": first["field"], "errors": errors},
            status_code=422,
        )

    def principal(request: Request, bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)]) -> Principal:
        who = gw.authenticate(request, bearer)
        ledger = ledger_of(request)
        if ledger is not None:
            ledger.subject = who.subject
        return who

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

    def json_body(model: type[BaseModel], guard: Callable[..., Principal]) -> Callable[..., Any]:
        """The body as ``model``, read only once ``guard`` (authentication, then the policy) has let the caller in."""
        async def body(request: Request, who: Annotated[Principal, Depends(guard)]) -> BaseModel:
            return await parse_body(request, model)
        return body

    def body_doc(model: type[BaseModel]) -> dict[str, Any]:
        """OpenAPI for a body the route reads itself (FastAPI documents only declared body parameters)."""
        bodies[model.__name__] = model
        return {"requestBody": {"required": True, "description": _LIMITS, "content": {
            "application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}

    bodies: dict[str, type[BaseModel]] = {}

    # the record format: the consortium schema's ([records] schema) or the built-in one (insitu.gateway.record_schema)
    M = gw.store.models
    Record, RecordBody, RecordPatch, NursingView = M.record, M.body, M.patch, M.nursing

    def need(pseudonym: str) -> BaseModel:
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
    def read_record(pseudonym: PseudonymPath, who: Annotated[Principal, Depends(record_guard(Action.READ, ResourceType.RECORD))]) -> Any:
        """The full medical record (doctors)."""
        return need(pseudonym)

    update_guard = record_guard(Action.UPDATE, ResourceType.RECORD)

    @app.put("/records/{pseudonym}", response_model=Record, tags=["records"], responses=_BODY_ERRORS,
             openapi_extra=body_doc(RecordBody))
    def replace_record(request: Request, pseudonym: PseudonymPath, who: Annotated[Principal, Depends(update_guard)],
                       body: Annotated[BaseModel, Depends(json_body(RecordBody, update_guard))]) -> Any:
        """Create or replace a record (doctors)."""
        rec = gw.store.put(pseudonym, body, gw.clock())
        gw.record("write", who.subject, {"pseudonym": pseudonym, "version": rec.version, "fields": sorted(RecordBody.model_fields)}, request)
        return rec

    @app.patch("/records/{pseudonym}", response_model=Record, tags=["records"],
               responses={**_BODY_ERRORS, 404: {"model": Problem}, 409: {"model": Problem}}, openapi_extra=body_doc(RecordPatch))
    def update_record(request: Request, pseudonym: PseudonymPath, who: Annotated[Principal, Depends(update_guard)],
                      body: Annotated[BaseModel, Depends(json_body(RecordPatch, update_guard))]) -> Any:
        """Change some fields of a record (doctors)."""
        changes = body.changes()  # type: ignore[attr-defined]
        if not changes:
            raise BodyRefused(422, "body", "a PATCH must change at least one field")
        try:
            rec = gw.store.patch(pseudonym, body, gw.clock())
        except DataError as exc:
            raise HTTPException(409, str(exc)) from None
        if rec is None:
            raise HTTPException(404, f"no record with pseudonym {pseudonym}")
        gw.record("write", who.subject, {"pseudonym": pseudonym, "version": rec.version, "fields": sorted(changes)}, request)
        return rec

    @app.get("/nursing/{pseudonym}", response_model=NursingView, tags=["records"],
             responses={**_ERRORS, 404: {"model": Problem}})
    def read_nursing(pseudonym: PseudonymPath, who: Annotated[Principal, Depends(record_guard(Action.READ, ResourceType.NURSING_VIEW))]) -> Any:
        """The de-identified nursing subset of a record (nurses, doctors)."""
        return M.view(need(pseudonym), gw.clock().astimezone(gw.tz).date())

    PredictRequest = _predict_model(gw.model)

    infer_guard = model_guard(Action.INFER)

    @app.post("/predict", response_model=Prediction, tags=["model"], responses={**_BODY_ERRORS, 503: {"model": Problem}},
              openapi_extra=body_doc(PredictRequest))
    def predict(who: Annotated[Principal, Depends(infer_guard)],
                body: Annotated[BaseModel, Depends(json_body(PredictRequest, infer_guard))]) -> Prediction:
        """Risk score from the federated model for one patient's anonymized input in the task's form (AI agents):
        a standardized feature vector, a 48-hour ICU series or an image (see the model card's ``input``)."""
        m = served()
        x, ignored = m.input.tensor(body)
        risk = m.risk(x)
        thr = m.card.threshold
        return Prediction(risk=risk, threshold=thr, positive=risk >= thr, ignored=ignored, model=ModelInfo(**m.card.as_dict()))

    @app.get("/model", response_model=ModelInfo, tags=["model"], responses={**_ERRORS, 503: {"model": Problem}})
    def model_card(who: Annotated[Principal, Depends(model_guard(Action.READ))]) -> ModelInfo:
        """The model card: training sites, rounds, ε and δ, the feature schema /predict expects."""
        return ModelInfo(**served().card.as_dict())

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            spec = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            schemas = spec.setdefault("components", {}).setdefault("schemas", {})
            for name, model in bodies.items():
                doc = model.model_json_schema(ref_template="#/components/schemas/{model}", mode="validation")
                schemas.update(doc.pop("$defs", {}))
                schemas[name] = doc
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


__all__ = ["Gateway", "Principal", "AuditSink", "create_app", "utc_now"]
