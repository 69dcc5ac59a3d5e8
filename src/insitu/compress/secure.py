"""Compression that composes with secure aggregation (or homomorphic aggregation).

Masks cancel only in a sum over *aligned* coordinates, so per-site top-k
(each site its own indices) cannot be masked, and int8 saves nothing once the
values live in the protocol's ring.  What composes is ``shared:F``: every site
keeps the same ``⌈F·n⌉`` coordinates, drawn from (job, round) by
:func:`insitu.compress.shared_indices`.  :class:`SharedSubsetProtocol` wraps any
:class:`AggregationProtocol` and runs it on that subset only — the sites mask
(or encrypt) ``k`` values instead of ``n``, the coordinator unmasks a ``k``-long
sum and scatters it back — without the wrapped protocol knowing.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, Mapping

import numpy as np

from insitu.compress.updates import CompressionSpec, Sparsifier, shared_indices
from insitu.errors import ConfigError, ProtocolError
from insitu.federation.messages import Message, MessageKind
from insitu.federation.protocol import AggregateResult, AggregationProtocol, RoundPlan, SiteProtection
from insitu.federation.transport import Transport


class _SubsetSite:
    def __init__(self, inner: SiteProtection, spec: CompressionSpec):
        self.inner, self.spec = inner, spec

    def protect(self, request: Message, weighted: np.ndarray, weight: float) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        x = np.asarray(weighted, dtype=np.float64).reshape(-1)
        idx = shared_indices(request.job, request.round, x.shape[0], self.spec.k(x.shape[0]))
        outside = np.count_nonzero(x) - np.count_nonzero(x[idx])
        if outside:
            raise ProtocolError(f"update has {outside} nonzero values outside round {request.round}'s shared index set; "
                              "the site pipeline needs the matching shared:F compress stage")
        return self.inner.protect(request, x[idx], weight)

    def handlers(self) -> Mapping[MessageKind, Callable[[Message], Message]]:
        return self.inner.handlers()

    @property
    def request_keys(self) -> tuple[str, ...]:
        return getattr(self.inner, "request_keys", ())

    def egress(self) -> dict:
        return self.inner.egress()


class SharedSubsetProtocol:
    """``inner`` run on round ``r``'s shared index subset; same result as ``inner`` on the
    sparse vectors, ``F`` times the bytes of the masked payload."""

    def __init__(self, inner: AggregationProtocol, spec: CompressionSpec):
        if spec.sparsify is not Sparsifier.SHARED:
            raise ConfigError(f"SharedSubsetProtocol needs a shared:F compression, got {spec}")
        self.inner, self.spec = inner, spec
        self.name = f"{inner.name}+{spec}"

    def site_protection(self, site_id: str) -> SiteProtection:
        return self.site_half(self.inner.site_protection(site_id), self.spec)

    @staticmethod
    def site_half(inner: SiteProtection, spec: CompressionSpec) -> SiteProtection:
        """The site half: ``inner`` run on the round's shared subset of coordinates."""
        return _SubsetSite(inner, spec)

    def collect(self, plan: RoundPlan, transport: Transport) -> AggregateResult:
        k = self.spec.k(plan.size)
        idx = shared_indices(plan.job, plan.round, plan.size, k)
        res = self.inner.collect(replace(plan, size=k), transport)
        total = np.zeros(plan.size, dtype=np.float64)
        total[idx] = res.total
        return replace(res, total=total)

    def __getattr__(self, name: str) -> Any:  # stats etc. of the wrapped protocol
        return getattr(self.inner, name)


def check_composes(spec: CompressionSpec) -> None:
    """Refuse, naming what composes, a compression that masks or ciphertexts cannot carry."""
    if spec.is_identity or spec.sparsify is Sparsifier.SHARED:
        return
    if spec.sparsify is Sparsifier.TOPK:
        raise ConfigError(f"--compress {spec} cannot be combined with secure aggregation: each site's top-k indices differ, "
                          f"and masks cancel only on aligned coordinates; use shared:{spec.fraction:g} instead")
    raise ConfigError("--compress int8 saves nothing under secure aggregation (masked values fill the whole ring); "
                      "use shared:F to send fewer coordinates")


def compose_with_secure(protocol: AggregationProtocol, spec: CompressionSpec) -> AggregationProtocol:
    """The secure ``protocol`` with ``spec`` applied, or a ConfigError naming what composes."""
    check_composes(spec)
    if spec.is_identity:
        return protocol
    return SharedSubsetProtocol(protocol, spec)
