"""Protecting updates on their way to the sum: secure aggregation and homomorphic aggregation.

Both plug into the round engine as an :class:`~insitu.federation.protocol.AggregationProtocol`
(coordinator half) with a matching site half:

* :class:`SecAggProtocol` / :class:`SecAggSite`: pairwise masking after Bonawitz et al. 2017
  on the sparse SecAgg+ graph, surviving drop-outs (the default, and the fastest).
* :class:`HEProtocol` / :class:`HESite` with :class:`HEScheme` ``PAILLIER`` (packed, exact)
  or ``CKKS`` (TenSEAL, approximate): the coordinator sums ciphertexts it cannot read.
"""
from insitu.secure.he import HEConfig, HEProtocol, HEScheme, HESite, HEStats
from insitu.secure.secagg import Recovery, SecAggConfig, SecAggProtocol, SecAggSite, SecAggStats

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
    "secure_protocol",
]


def secure_protocol(secure_aggregation: bool = False, homomorphic: str = "none", secagg_recovery: str = "server"):
    """The protocol for the CLI options ``--secure-aggregation`` / ``--homomorphic``, or None for plain.

    ``secagg_recovery`` (server or survivors) picks who removes masks, see :class:`Recovery`.

    Both at once is refused: they protect the same step in two different ways.
    """
    from insitu.errors import ConfigError

    he = (homomorphic or "none").lower()
    if he != "none":
        try:
            scheme = HEScheme(he)
        except ValueError:
            raise ConfigError(f"unknown --homomorphic {homomorphic!r}; choose none, paillier or ckks") from None
        if secure_aggregation:
            raise ConfigError("--secure-aggregation and --homomorphic both protect the sum; choose one")
        return HEProtocol(HEConfig(scheme=scheme))
    try:
        recovery = Recovery(secagg_recovery)
    except ValueError:
        raise ConfigError(f"unknown --secagg-recovery {secagg_recovery!r}; choose server or survivors") from None
    if secure_aggregation:
        return SecAggProtocol(SecAggConfig(recovery=recovery))
    if recovery is not Recovery.SERVER:
        raise ConfigError("--secagg-recovery only applies with --secure-aggregation")
    return None


