"""The medical-agent gateway: HTTPS (TLS 1.3 only), role- and attribute-based access, audited.

    from insitu.gateway import GatewayConfig, build_gateway, create_app, serve_config

    cfg = GatewayConfig.load("gateway.toml")
    serve_config(cfg)                           # what `insitu gateway serve` does
    app = create_app(build_gateway(cfg))        # or mount the ASGI app yourself (tests, other servers)

Pieces: :mod:`.policy` (the one decision point), :mod:`.tokens` (Ed25519 bearer tokens),
:mod:`.records` (the record store and the nursing view), :mod:`.model` (the served model and its
card), :mod:`.tls` (TLS 1.3-only serving), :mod:`.auditing` (group commit to the audit log).
"""
from importlib import import_module
from typing import Any

# Loaded on first use so that `insitu gateway --help` does not import torch and FastAPI.
_WHERE = {
    "Gateway": "app", "create_app": "app", "GatewayConfig": "config",
    "AccessRequest": "policy", "Action": "policy", "Decision": "policy", "PolicyDecisionPoint": "policy",
    "ResourceType": "policy", "Role": "policy", "Rule": "policy",
    "build_gateway": "service", "issue_token": "service", "serve_config": "service",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'insitu.gateway' has no attribute {name!r}")
    return getattr(import_module(f"insitu.gateway.{_WHERE[name]}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
