"""``gateway.toml``: where the certificates, keys, records, model and audit log are, and the extra rules.

Relative paths are resolved against the file's own directory, so a config and
its keys can move together.  Example::

    [server]
    host = "127.0.0.1"
    port = 8443
    cert = "tls/gateway.pem"          # issued by the consortium CA
    key = "tls/gateway.key"
    ca = "tls/ca.pem"                 # verifies mutual-TLS client certificates
    crl = "tls/crl.pem"               # optional: refuse revoked client certificates
    client_certs = "optional"         # optional | required | none

    [tokens]
    issuer = "gateway.hospital-a"
    public_key = "keys/token.pub"     # the gateway needs only this
    private_key = "keys/token.key"    # for `insitu gateway token`; keep it off the gateway host
    max_ttl = "12h"

    [records]
    url = "sqlite:///records.db"      # or postgresql://user:pw@host/db (the site's database)
    table = "gateway_records"
    schema = "schema.toml"            # optional: the consortium's record schema (insitu.gateway.record_schema);
                                      #   without it, the built-in heart demonstration record

    [model]
    run_dir = "runs/heart"

    [audit]
    path = "audit.db"
    key = "keys/audit.key"
    writer = "gateway.hospital-a"

    [policy]
    timezone = "Europe/Berlin"        # shifts are local times

    [[mtls.clients]]                  # certificate common name → gateway attributes
    cn = "agent-triage"
    role = "ai-model"

    [[policy.rules]]
    name = "nurse-own-ward"
    effect = "deny"
    roles = ["nurse"]
    resources = ["nursing_view"]
    conditions = [{ op = "ne", left = "resource.ward", right = "subject.ward" }]
"""
from __future__ import annotations

import datetime as dt
import enum
import tomllib
import zoneinfo
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from insitu.errors import ConfigError, parse_choice
from insitu.gateway.policy import Role, Rule, rule_from_dict
from insitu.gateway.tokens import parse_ttl, validate_identity


class ClientCertMode(str, enum.Enum):
    NONE = "none"  # tokens only
    OPTIONAL = "optional"  # a client may present a certificate instead of a token
    REQUIRED = "required"  # every connection presents a CA-issued certificate


@dataclass(frozen=True)
class MtlsClient:
    cn: str
    role: Role
    ward: str | None = None
    shift: str | None = None


@dataclass(frozen=True)
class GatewayConfig:
    base: Path
    host: str = "127.0.0.1"
    port: int = 8443
    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None
    crl: Path | None = None
    client_certs: ClientCertMode = ClientCertMode.OPTIONAL
    issuer: str = "insitu-gateway"
    token_public_key: Path | None = None
    token_private_key: Path | None = None
    max_ttl: dt.timedelta = dt.timedelta(hours=12)
    records_url: str = "sqlite:///records.db"
    records_table: str = "gateway_records"
    records_schema: Path | None = None  # the consortium's record schema; None: the built-in demonstration record
    model_run_dir: Path | None = None
    audit_path: str = "audit.db"
    audit_key: Path | None = None
    audit_writer: str = "gateway"
    timezone: zoneinfo.ZoneInfo = field(default_factory=lambda: zoneinfo.ZoneInfo("UTC"))
    mtls_clients: tuple[MtlsClient, ...] = ()
    rules: tuple[Rule, ...] = ()

    def record_models(self) -> Any:
        """The record format the gateway stores and serves (:mod:`insitu.gateway.record_schema`)."""
        from insitu.gateway.record_schema import HEART_RECORDS, records_from_schema

        if self.records_schema is None:
            return HEART_RECORDS
        from insitu.data.sources import RecordSchema

        return records_from_schema(RecordSchema.from_toml(self.records_schema), str(self.records_schema))

    @classmethod
    def load(cls, path: str | Path) -> "GatewayConfig":
        p = Path(path)
        try:
            raw = tomllib.loads(p.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read gateway config {p}: {exc}") from None
        return cls.from_dict(raw, base=p.resolve().parent)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], base: Path) -> "GatewayConfig":
        allowed = {"server", "tokens", "records", "model", "audit", "policy", "mtls"}
        unknown = set(raw) - allowed
        if unknown:
            raise ConfigError(f"gateway config has unknown sections {sorted(unknown)}; allowed: {sorted(allowed)}")
        srv, tok, rec = raw.get("server", {}), raw.get("tokens", {}), raw.get("records", {})
        mdl, aud, pol = raw.get("model", {}), raw.get("audit", {}), raw.get("policy", {})

        def path(v: Any) -> Path | None:
            if v is None:
                return None
            q = Path(str(v))
            return q if q.is_absolute() else base / q

        mode = parse_choice(ClientCertMode, srv.get("client_certs", "optional"), "server.client_certs")
        try:
            tz = zoneinfo.ZoneInfo(pol.get("timezone", "UTC"))
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ConfigError(f"policy.timezone {pol.get('timezone')!r} is not an IANA zone name like Europe/Berlin") from None
        clients = []
        for c in raw.get("mtls", {}).get("clients", []):
            role = validate_identity(c.get("cn", ""), c.get("role", ""), c.get("ward"), c.get("shift"))
            clients.append(MtlsClient(c["cn"], role, c.get("ward"), c.get("shift")))
        url = str(rec.get("url", "sqlite:///records.db"))
        if url.startswith("sqlite:///") and not url.startswith("sqlite:////") and url != "sqlite:///:memory:":
            url = "sqlite:///" + str(base / url[len("sqlite:///"):])
        audit = str(aud.get("path", "audit.db"))
        if "://" not in audit and not Path(audit).is_absolute():
            audit = str(base / audit)
        port = srv.get("port", 8443)
        if not isinstance(port, int) or not 0 <= port < 65536:
            raise ConfigError(f"server.port {port!r} must be an integer 0-65535")
        return cls(
            base=base,
            host=str(srv.get("host", "127.0.0.1")),
            port=port,
            cert=path(srv.get("cert")),
            key=path(srv.get("key")),
            ca=path(srv.get("ca")),
            crl=path(srv.get("crl")),
            client_certs=mode,
            issuer=str(tok.get("issuer", "insitu-gateway")),
            token_public_key=path(tok.get("public_key")),
            token_private_key=path(tok.get("private_key")),
            max_ttl=parse_ttl(tok.get("max_ttl", "12h")),
            records_url=url,
            records_table=str(rec.get("table", "gateway_records")),
            records_schema=path(rec.get("schema")),
            model_run_dir=path(mdl.get("run_dir")),
            audit_path=audit,
            audit_key=path(aud.get("key")),
            audit_writer=str(aud.get("writer", "gateway")),
            timezone=tz,
            mtls_clients=tuple(clients),
            rules=tuple(rule_from_dict(r) for r in pol.get("rules", [])),
        )


__all__ = ["GatewayConfig", "ClientCertMode", "MtlsClient"]
