"""From ``gateway.toml`` to a running gateway: the library functions the CLI calls."""
from __future__ import annotations

import datetime as dt
from pathlib import Path

from insitu.audit import AuditLog
from insitu.errors import ConfigError
from insitu.gateway.auditing import GroupCommitAudit
from insitu.gateway.app import Clock, Gateway, create_app, utc_now
from insitu.gateway.config import ClientCertMode, GatewayConfig
from insitu.gateway.model import ServedModel
from insitu.gateway.policy import PolicyDecisionPoint
from insitu.gateway.records import RecordStore
from insitu.gateway.tls import serve, server_context
from insitu.gateway.tokens import TokenIssuer, TokenVerifier, generate_keypair, load_private_key, load_public_key


def build_gateway(cfg: GatewayConfig, clock: Clock = utc_now) -> Gateway:
    """Open every resource the config names; fails before serving if any is missing."""
    if cfg.token_public_key is None:
        raise ConfigError("[tokens] public_key is not set; create a pair with `insitu gateway keygen`")
    if cfg.audit_key is None:
        raise ConfigError("[audit] key is not set; create one with `insitu audit keygen` (every decision is audited)")
    revocation = None
    if cfg.crl is not None:
        from insitu.net.pki import RevocationList

        if cfg.ca is None:
            raise ConfigError("server.crl is set but server.ca is not")
        revocation = RevocationList(cfg.crl, cfg.ca)
    return Gateway(
        pdp=PolicyDecisionPoint(cfg.rules),
        verifier=TokenVerifier(load_public_key(cfg.token_public_key), cfg.issuer, cfg.max_ttl),
        store=RecordStore(cfg.records_url, cfg.records_table, cfg.record_models()),
        audit=GroupCommitAudit(AuditLog.open(cfg.audit_path, cfg.audit_key, writer=cfg.audit_writer)),
        model=ServedModel.load(cfg.model_run_dir) if cfg.model_run_dir is not None else None,
        clock=clock,
        tz=cfg.timezone,
        mtls_clients={c.cn: c for c in cfg.mtls_clients},
        revocation=revocation,
    )


def serve_config(cfg: GatewayConfig, *, port: int | None = None) -> None:
    """Serve over HTTPS, TLS 1.3 only.  There is no plain-HTTP mode."""
    if cfg.cert is None or cfg.key is None:
        raise ConfigError("[server] cert and key are required: the gateway only speaks TLS 1.3 "
                          "(issue a certificate from the consortium CA with `insitu pki issue`)")
    ctx = server_context(cfg.cert, cfg.key, cfg.ca, cfg.client_certs)
    app = create_app(build_gateway(cfg))
    serve(app, cfg.host, cfg.port if port is None else port, ctx)


def issue_token(cfg: GatewayConfig, subject: str, role: str, ttl: dt.timedelta, *, ward: str | None = None,
                shift: str | None = None) -> str:
    if cfg.token_private_key is None:
        raise ConfigError("[tokens] private_key is not set; only the token issuer's copy of the config has it")
    return TokenIssuer(load_private_key(cfg.token_private_key), cfg.issuer, cfg.max_ttl).issue(
        subject, role, ttl, ward=ward, shift=shift)


def import_records(cfg: GatewayConfig, source: str, table: str | None = None, clock: Clock = utc_now) -> int:
    """Load records from a site source into the gateway's store (all rows validated first), audited."""
    from insitu.audit import AuditAction
    from insitu.data.sources import redact_url
    from insitu.gateway.records import bodies_from_source

    if cfg.audit_key is None:
        raise ConfigError("[audit] key is not set; record imports are audited")
    models = cfg.record_models()
    rows = bodies_from_source(source, table, models)
    store = RecordStore(cfg.records_url, cfg.records_table, models)
    now = clock()
    for pseudonym, body in rows:
        store.put(pseudonym, body, now)
    with AuditLog.open(cfg.audit_path, cfg.audit_key, writer=cfg.audit_writer) as log:
        log.append(AuditAction.DATA_ACCESS, redact_url(source), {"stage": "gateway.import", "rows": len(rows), "table": table})
    return len(rows)


def keygen(cfg: GatewayConfig, *, overwrite: bool = False) -> tuple[Path, Path]:
    if cfg.token_private_key is None or cfg.token_public_key is None:
        raise ConfigError("[tokens] private_key and public_key must both be set to generate a key pair")
    if cfg.token_private_key.exists() and not overwrite:
        raise ConfigError(f"{cfg.token_private_key} exists; pass --overwrite to replace it (all issued tokens stop working)")
    generate_keypair(cfg.token_private_key, cfg.token_public_key)
    return cfg.token_private_key, cfg.token_public_key


__all__ = ["build_gateway", "serve_config", "issue_token", "import_records", "keygen", "ClientCertMode"]
