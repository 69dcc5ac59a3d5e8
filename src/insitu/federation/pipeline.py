"""The site pipeline, in the one order that keeps its privacy promises.

    local update Δ ─► clip ─► add this site's noise share ─► compress ─► weight ─► protect
                                                                         (encode + mask / encrypt)

Users pick which stages are on; nobody picks the order.  Clipping before noise
is what makes the noise meaningful; noise before compression and masking is
what lets secure aggregation carry DP noise the coordinator never sees alone.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from insitu.federation.instructions import RoundInstructions
from insitu.federation.messages import Message
from insitu.federation.protocol import PlainSiteProtection, SiteProtection


@dataclass(frozen=True)
class RoundContext:
    """What a stage may know of the round: its job, number and parsed instructions."""

    job: str
    round: int
    instructions: RoundInstructions


class UpdateStage(Protocol):
    """One transformation of a site's update vector.  ``info`` collects what the stage reports
    (e.g. the norm before clipping, ε spent) and travels back in the reply's metrics."""

    def apply(self, vec: np.ndarray, ctx: RoundContext, info: dict[str, Any]) -> np.ndarray: ...


@dataclass
class SitePipeline:
    """The stages of one site, in the fixed order; each optional, the protection always last."""

    clip: UpdateStage | None = None
    noise: UpdateStage | None = None
    compress: UpdateStage | None = None
    protection: SiteProtection = field(default_factory=PlainSiteProtection)

    def run(self, request: Message, instructions: RoundInstructions, update: np.ndarray, weight: float,
            info: dict[str, Any]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        ctx = RoundContext(request.job, request.round, instructions)
        vec = np.asarray(update, dtype=np.float64)
        for stage in (self.clip, self.noise, self.compress):
            if stage is not None:
                vec = stage.apply(vec, ctx, info)
        return self.protection.protect(request, weight * vec, weight)
