"""The aggregation-protocol registry, shared by the coordinator and the sites of a deployment.

A job names its protocol; the coordinator builds the protocol's collecting
half and each site its protecting half from the same registry, so nothing on
the wire picks code: an unknown name is refused.
"""
from __future__ import annotations

import enum
from typing import Any, Mapping

from insitu.errors import ConfigError
from insitu.federation.protocol import AggregationProtocol, PlainProtocol


class ProtocolName(str, enum.Enum):
    PLAIN = "plain"
    SECAGG = "secagg"


def make_protocol(name: str, options: Mapping[str, Any] | None = None) -> AggregationProtocol:
    """The aggregation protocol registry shared by coordinator and sites (both halves)."""
    try:
        key = ProtocolName(name)
    except ValueError:
        raise ConfigError(f"unknown aggregation protocol {name!r}; choose one of {[p.value for p in ProtocolName]}") from None
    if key is ProtocolName.PLAIN:
        return PlainProtocol()
    try:
        from insitu.secure.secagg import SecAggProtocol  # type: ignore[import-not-found]
    except ImportError:
        raise ConfigError("secure aggregation is not available in this build (insitu.secure.secagg is missing)") from None
    return SecAggProtocol(**dict(options or {}))


#: the secure-aggregation group size a protocol gives a site's update (plain: the update is seen alone).
def group_size(protocol: str, sites: int) -> int:
    return 1 if ProtocolName(protocol) is ProtocolName.PLAIN else sites


__all__ = ["ProtocolName", "make_protocol", "group_size"]
