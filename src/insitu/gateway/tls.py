"""TLS 1.3-only serving of the gateway with uvicorn, and the client certificate handed to the app.

We build the :class:`ssl.SSLContext` ourselves (``minimum_version = TLSv1_3``)
and give it to uvicorn through ``ssl_context_factory``, so a TLS 1.2
ClientHello is refused at the handshake.  When a client certificate is asked
for, OpenSSL verifies it against the consortium CA; the verified DER
certificate is put in the ASGI scope (``scope["state"]["tls_peer_der"]``) by a
thin subclass of uvicorn's h11 protocol, because uvicorn does not yet fill the
ASGI TLS extension.
"""
from __future__ import annotations

import asyncio
import ssl
from pathlib import Path
from typing import Any

from insitu.errors import ConfigError
from insitu.gateway.config import ClientCertMode

PEER_KEY = "tls_peer_der"


def server_context(cert: Path, key: Path, ca: Path | None, mode: ClientCertMode) -> ssl.SSLContext:
    """A server context that speaks TLS 1.3 only and, unless ``mode`` is none, asks for a CA-issued client cert."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    try:
        ctx.load_cert_chain(str(cert), str(key))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load the gateway certificate {cert} / key {key}: {exc}") from None
    if mode is ClientCertMode.NONE:
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    if ca is None:
        raise ConfigError("server.client_certs is optional/required but server.ca (the consortium CA) is not set")
    try:
        ctx.load_verify_locations(cafile=str(ca))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load the consortium CA {ca}: {exc}") from None
    ctx.verify_mode = ssl.CERT_REQUIRED if mode is ClientCertMode.REQUIRED else ssl.CERT_OPTIONAL
    return ctx


def _peer_protocol() -> type:
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class PeerCertH11Protocol(H11Protocol):
        """h11 protocol that exposes the verified client certificate to the app, per connection."""

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            obj = transport.get_extra_info("ssl_object")
            der = obj.getpeercert(binary_form=True) if obj is not None else None
            if der:
                self.app_state = {**self.app_state, PEER_KEY: der}

    return PeerCertH11Protocol


def uvicorn_config(app: Any, host: str, port: int, ctx: ssl.SSLContext | None, **kw: Any):
    """A uvicorn Config serving ``app`` with our SSL context (or plain HTTP when ``ctx`` is None: benchmarks only)."""
    import uvicorn

    opts: dict[str, Any] = dict(host=host, port=port, http=_peer_protocol(), log_level="warning", lifespan="off")
    if ctx is not None:
        opts["ssl_context_factory"] = lambda _config, _default: ctx
    opts.update(kw)
    return uvicorn.Config(app, **opts)


def serve(app: Any, host: str, port: int, ctx: ssl.SSLContext | None, **kw: Any) -> None:
    import uvicorn

    uvicorn.Server(uvicorn_config(app, host, port, ctx, **kw)).run()


__all__ = ["server_context", "uvicorn_config", "serve", "PEER_KEY"]
