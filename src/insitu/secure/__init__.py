"""Protecting updates on their way to the sum: secure aggregation and homomorphic aggregation.

Both plug into the round engine as an :class:`~insitu.federation.protocol.AggregationProtocol`
(coordinator half) with a matching site half:

* :class:`SecAggProtocol` / :class:`SecAggSite`: pairwise masking after Bonawitz et al. 2017
  on the sparse SecAgg+ graph, surviving drop-outs (the default, and the fastest).
* :class:`HEProtocol` / :class:`HESite` with :class:`HEScheme` ``PAILLIER`` (packed, exact)
  or ``CKKS`` (TenSEAL, approximate): the coordinator sums ciphertexts it cannot read.
"""
from __future__ import annotations

from typing import Any

from insitu.secure.secagg import Recovery, SecAggConfig, SecAggProtocol, SecAggSite, SecAggStats

_HE = ("HEConfig", "HEProtocol", "HEScheme", "HESite", "HEStats")


def __getattr__(name: str) -> Any:  # TenSEAL and phe load when homomorphic aggregation is first used
    if name in _HE:
        from insitu.secure import he

        return getattr(he, name)
    raise AttributeError(f"module 'insitu.secure' has no attribute {name!r}")

__all__ = [
    "HEConfig",
    "HEProtocol",
    "HEScheme",
    "HESite",
    "HEStats",
    "Recovery",
    "SecAggConfig",
    "SecAggProtocol",
    "SecAggSite",
    "SecAggStats",
]
