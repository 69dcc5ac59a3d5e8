"""The aggregation-protocol registry, shared by the coordinator and the sites of a deployment.

A job names its protocol; the coordinator builds the protocol's collecting
half and each site its protecting half from the same registry, so nothing on
the wire picks code: an unknown name is refused.  Which protocol a message
belongs to follows from its kind (``SECAGG_*`` → secure aggregation), never
from a name the coordinator sends.
"""
from __future__ import annotations

import enum
from typing import Any, Mapping

from insitu.errors import ConfigError
from insitu.federation.messages import MessageKind
from insitu.federation.protocol import AggregationProtocol, PlainProtocol, SiteProtection


class ProtocolName(str, enum.Enum):
    PLAIN = "plain"
    SECAGG = "secagg"


#: message kinds that only one protocol's site half answers.
KIND_PROTOCOL: dict[MessageKind, ProtocolName] = {
    MessageKind.SECAGG_ADVERTISE: ProtocolName.SECAGG,
    MessageKind.SECAGG_SHARE: ProtocolName.SECAGG,
    MessageKind.SECAGG_UNMASK: ProtocolName.SECAGG,
}


def _name(name: str) -> ProtocolName:
    try:
        return ProtocolName(name)
    except ValueError:
        raise ConfigError(f"unknown aggregation protocol {name!r}; choose one of {[p.value for p in ProtocolName]}") from None


def make_protocol(name: str, options: Mapping[str, Any] | None = None) -> AggregationProtocol:
    """The coordinator half of protocol ``name`` (``options``: e.g. SecAggConfig fields)."""
    key = _name(name)
    if key is ProtocolName.PLAIN:
        if options:
            raise ConfigError(f"the plain protocol takes no options, got {sorted(options)}")
        return PlainProtocol()
    from insitu.secure import SecAggConfig, SecAggProtocol

    try:
        return SecAggProtocol(SecAggConfig(**dict(options or {})))
    except TypeError as exc:
        raise ConfigError(f"invalid secure-aggregation options {dict(options or {})}: {exc}") from None


def site_protection(name: str, site_id: str, *, min_group: int = 0) -> SiteProtection:
    """The site half of protocol ``name``; ``min_group`` is the site's own smallest acceptable group."""
    key = _name(name)
    if key is ProtocolName.PLAIN:
        return PlainProtocol().site_protection(site_id)
    from insitu.secure import SecAggConfig, SecAggSite

    return SecAggSite(site_id, SecAggConfig(min_group=max(SecAggConfig().min_group, min_group)))


__all__ = ["ProtocolName", "KIND_PROTOCOL", "make_protocol", "site_protection"]
