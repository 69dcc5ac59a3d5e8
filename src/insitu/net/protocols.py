"""The aggregation-protocol registry, shared by the coordinator and the sites of a deployment.

A job names its protocol; the coordinator builds the protocol's collecting
half and each site its protecting half from the same registry, so nothing on
the wire picks code: an unknown name is refused.  Which protocol a message
belongs to follows from its kind (``SECAGG_*`` → secure aggregation,
``HE_KEYS`` → homomorphic aggregation, with the scheme checked against the
closed :class:`ProtocolName` list).
"""
from __future__ import annotations

import enum
from typing import Any, Mapping

from insitu.errors import ConfigError, ProtocolError
from insitu.federation.messages import Message, MessageKind
from insitu.federation.protocol import AggregationProtocol, PlainProtocol, SiteProtection


class ProtocolName(str, enum.Enum):
    PLAIN = "plain"
    SECAGG = "secagg"  # pairwise masks on the SecAgg+ graph (insitu.secure.secagg)
    PAILLIER = "paillier"  # packed Paillier, exact (insitu.secure.he)
    CKKS = "ckks"  # CKKS through TenSEAL, approximate (insitu.secure.he)


HE = (ProtocolName.PAILLIER, ProtocolName.CKKS)


def _name(name: str) -> ProtocolName:
    try:
        return ProtocolName(name)
    except ValueError:
        raise ConfigError(f"unknown aggregation protocol {name!r}; choose one of {[p.value for p in ProtocolName]}") from None


def protocol_of(msg: Message) -> ProtocolName | None:
    """The protocol a message that may open a job (before its first TRAIN) belongs to, or None."""
    if msg.kind in (MessageKind.SECAGG_ADVERTISE, MessageKind.SECAGG_SHARE, MessageKind.SECAGG_UNMASK):
        return ProtocolName.SECAGG
    if msg.kind in (MessageKind.HE_KEYS, MessageKind.HE_DECRYPT):
        scheme = msg.meta.get("scheme")
        try:
            proto = ProtocolName(scheme)
        except ValueError:
            raise ProtocolError(f"{msg.kind.value} names scheme {scheme!r}, not one of {[p.value for p in HE]}") from None
        if proto not in HE:
            raise ProtocolError(f"{msg.kind.value} names scheme {scheme!r}, not one of {[p.value for p in HE]}")
        return proto
    return None


def make_protocol(name: str, options: Mapping[str, Any] | None = None) -> AggregationProtocol:
    """The coordinator half of protocol ``name`` (``options``: fields of SecAggConfig / HEConfig)."""
    key = _name(name)
    opts = dict(options or {})
    if key is ProtocolName.PLAIN:
        if opts:
            raise ConfigError(f"the plain protocol takes no options, got {sorted(opts)}")
        return PlainProtocol()
    try:
        if key is ProtocolName.SECAGG:
            from insitu.secure import SecAggConfig, SecAggProtocol

            return SecAggProtocol(SecAggConfig(**opts))
        from insitu.secure import HEConfig, HEProtocol

        return HEProtocol(HEConfig(scheme=key.value, **opts))
    except TypeError as exc:
        raise ConfigError(f"invalid {key.value} options {opts}: {exc}") from None


def site_protection(name: str, site_id: str, *, min_group: int = 0, attestation: Any = None) -> SiteProtection:
    """The site half of protocol ``name``; ``min_group`` is the site's own smallest acceptable group;
    ``attestation`` (secure aggregation, homomorphic key dealing) signs this site's keys and checks its peers' signatures."""
    key = _name(name)
    if key is ProtocolName.PLAIN:
        return PlainProtocol().site_protection(site_id)
    if key is ProtocolName.SECAGG:
        from insitu.secure import SecAggConfig, SecAggSite

        return SecAggSite(site_id, SecAggConfig(min_group=max(SecAggConfig().min_group, min_group)), attestation=attestation)
    from insitu.secure import HEConfig, HESite

    return HESite(site_id, HEConfig(scheme=key.value, min_group=max(HEConfig().min_group, min_group)), attestation=attestation)


__all__ = ["ProtocolName", "protocol_of", "make_protocol", "site_protection"]
