"""Bounded influence of one site on a plain round: the coordinator's screen of the updates it sees.

Under ``protection = plain`` the coordinator sees every site's weighted update ``wᵢ·uᵢ`` and its
claimed weight ``wᵢ`` (the site's training record count).  FedAvg applies ``Σ wᵢuᵢ / Σ wᵢ``, so
one authenticated site that sends a finite but absurd update (every value 1e30) or claims an
absurd weight (1e15 records) would set the global model for everyone.  :class:`UpdateScreen`
refuses such a reply before it reaches the sum; the site is dropped from the round with a reason
naming the value and the bound, and is named a culprit (a deployed job excludes a site named in
``exclude_after`` rounds, :mod:`insitu.coordinator.service`).

The rules, all from the approved plan (every site knows them):

* **weight** — a positive whole number, at most the plan's ``max_site_records``, and the same in
  every round of the job (a site's training split does not change; the first weight the
  coordinator accepted from a site is its reference).
* **size** — with at least :data:`MIN_SCREENED` updates in the round, a site's per-record update
  ``uᵢ = vecᵢ / wᵢ`` may not have an L2 norm above ``update_norm_factor`` × the median norm of the
  round's updates.  Scaffold's reply is ``[Δy, Δc]``: the model part and the control-variate part
  are screened separately (the control variate feeds every site's next gradient correction).
* **DP clip** — with site-level DP the site promised to clip its update to C (the plan's, or the
  round's adaptive clip): an update longer than C (plus the site's own noise share when the noise
  is distributed, and int8 rounding when the plan quantises) is refused, whatever the round's size.

What is not bounded: a site can lie about its record count within the cap (nobody can check it),
and can steer the model in any direction within ``update_norm_factor`` × the median per round.
With fewer than three updates there is no majority to compare with, so only the weight and DP
rules apply.  Under secure aggregation or homomorphic encryption the coordinator never sees a
single update; only those protocols' own checks of the sum apply.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

from insitu.errors import ConfigError, ProtocolError

#: the screen compares sizes only when at least this many updates arrived (a median of two is no majority)
MIN_SCREENED = 3
#: default ``update_norm_factor``: the largest honest per-record norm / round median measured over the
#: project's recipes was 5.65 (heart, DP-SGD at ε = 1; bench/honest_update_ratios.py, table in
#: docs/guide/hostile.md), so honest runs keep a margin of about 9×
DEFAULT_NORM_FACTOR = 50.0
#: default ``max_site_records``: no hospital trains on more records than this; a consortium that
#: knows its sites' sizes declares a tighter cap in the plan
DEFAULT_MAX_RECORDS = 1_000_000_000
#: float32 transport of a clipped update: relative slack on the clip bound
F32_SLACK = 1e-5
#: Gaussian concentration: ‖N(0, σ²I_d)‖ ≤ σ(√d + t) except with probability exp(−t²/2) (t = 12: < 1e-31)
NOISE_TAIL = 12.0


def check_norm_factor(v: Any) -> float:
    """``update_norm_factor``: a finite number > 1 (the bound is this many times the round's median)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 1:
        raise ConfigError(f"update_norm_factor must be a number > 1 (a site's update may be at most this many times the "
                          f"round's median update norm), got {v!r}")
    return float(v)


def check_max_records(v: Any) -> int:
    """``max_site_records``: a positive integer (the largest training record count a site may claim)."""
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 10**15:
        raise ConfigError(f"max_site_records must be an integer from 1 to 10^15 (the most training records any site "
                          f"of the consortium has), got {v!r}")
    return v


#: (round plan) → the largest L2 norm a site's weighted update may have under site-level DP, or None
ClipBound = Callable[[Any], "float | None"]


@dataclass(frozen=True)
class UpdateSize:
    """One update as the screen sees it: the L2 norm of the weighted update as received (the DP clip
    rule), and per part (the whole update, or Scaffold's halves) the per-record norm ‖part‖ / wᵢ."""

    norm: float
    parts: tuple[str, ...]
    per_record: tuple[float, ...]


@dataclass
class UpdateScreen:
    """The coordinator's screen of one plain round's updates (see the module docstring).

    ``scaffold``: the reply is Scaffold's ``[Δy, Δc]`` (two halves, each screened alone).
    ``uniform``: the plan weights every site 1 (site-level DP), so any other weight is refused.
    ``clip_bound`` gives the DP bound of the round, when the plan has one.  ``weights`` holds each
    site's reference weight for the job (the first one accepted)."""

    norm_factor: float = DEFAULT_NORM_FACTOR
    max_records: int = DEFAULT_MAX_RECORDS
    scaffold: bool = False
    uniform: bool = False
    clip_bound: ClipBound | None = None
    weights: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.norm_factor = check_norm_factor(self.norm_factor)
        self.max_records = check_max_records(self.max_records)

    @classmethod
    def for_plan(cls, plan: Any, clip_bound: ClipBound | None = None) -> "UpdateScreen":
        """The screen an approved :class:`~insitu.plan.Plan` states; ``clip_bound`` is the plan's
        site-level DP bound (:func:`insitu.builder.dp_clip_bound`, which knows the compression layer)."""
        return cls(norm_factor=plan.update_norm_factor, max_records=plan.max_site_records, scaffold=plan.strategy.scaffold,
                   uniform=plan.weighting == "uniform", clip_bound=clip_bound)

    # -- weight -------------------------------------------------------------------------------
    def check_weight(self, site: str, w: Any) -> float:
        """The site's weight if it keeps the rules; ProtocolError naming the value and the rule otherwise."""
        try:
            f = float(w) if isinstance(w, (int, float)) and not isinstance(w, bool) else math.nan
        except OverflowError:  # an integer beyond any float
            f = math.inf
        if not math.isfinite(f) or f <= 0:
            raise ProtocolError(f"weight {str(w)[:40]} from {site} is not a positive number")
        w = f
        if self.uniform and w != 1.0:
            raise ProtocolError(f"weight {w:.17g} from {site}: the plan weights every site 1 (site-level DP)")
        if not w.is_integer():
            raise ProtocolError(f"weight {w!r} from {site} is not a whole number of training records")
        if w > self.max_records:
            raise ProtocolError(f"weight {w:.17g} from {site} is above the plan's max_site_records = {self.max_records:,}")
        ref = self.weights.get(site)
        if ref is not None and w != ref:
            raise ProtocolError(f"weight {w:.17g} from {site} differs from the {ref:.17g} it sent earlier in this job "
                                "(a site's training record count does not change between rounds)")
        self.weights.setdefault(site, w)
        return w

    # -- size ---------------------------------------------------------------------------------
    def measure(self, vec: np.ndarray, w: float) -> "UpdateSize":
        """What the rules compare of one update (weighted ``wᵢ·uᵢ`` as received, weight ``wᵢ``): the
        coordinator measures each update as it decodes it and keeps only these numbers, not the vector."""
        parts = self._parts(vec.shape[0])
        # einsum, not np.linalg.norm: BLAS's dot wakes OpenBLAS's threads for every vector (~1 ms each on a
        # loaded machine, measured in bench/secagg.py); the sum of squares in one pass costs ~50 µs per 1e5 values
        norms = [math.sqrt(float(np.einsum("i,i->", vec[part], vec[part]))) for _, part in parts]
        whole = norms[0] if len(norms) == 1 else math.sqrt(sum(n * n for n in norms))
        return UpdateSize(whole, tuple(label for label, _ in parts), tuple(n / w for n in norms))

    def screen(self, plan: Any, updates: Mapping[str, tuple[np.ndarray, float]]) -> dict[str, str]:
        """Sites whose update breaks the size or DP rules, each with the reason (value and bound).

        ``updates``: site → (weighted update ``wᵢ·uᵢ`` as received, weight ``wᵢ``), all finite and
        with weights already checked."""
        return self.judge(plan, {sid: self.measure(vec, w) for sid, (vec, w) in updates.items()})

    def judge(self, plan: Any, sizes: Mapping[str, "UpdateSize"]) -> dict[str, str]:
        """:meth:`screen` from the measured sizes (in the order the updates arrived)."""
        refused: dict[str, str] = {}
        bound = self.clip_bound(plan) if self.clip_bound is not None else None
        if bound is not None:
            for sid, size in sizes.items():
                if size.norm > bound:
                    refused[sid] = (f"update norm {size.norm:.6g} is above the bound {bound:.6g} the plan's site-level DP clip "
                                    "promises (the site clips its update before it leaves)")
        if len(sizes) < MIN_SCREENED:
            return refused
        limit_of = lambda med: self.norm_factor * med  # noqa: E731
        for label, norms, med in self._norms(sizes):
            for sid, norm in norms.items():
                if norm > limit_of(med) and sid not in refused:
                    against = f"is {norm / med:.3g}× the round's median {med:.6g}" if med > 0 else "while the round's median is 0"
                    refused[sid] = (f"per-record {label} norm {norm:.6g} {against} "
                                    f"(bound: update_norm_factor {self.norm_factor:g} × median = {limit_of(med):.6g})")
        return refused

    def ratios(self, updates: Mapping[str, tuple[np.ndarray, float]]) -> dict[str, float]:
        """Each update's largest norm / round median over its parts (what the size rule compares; benchmarks)."""
        out = {sid: 0.0 for sid in updates}
        for _, norms, med in self._norms({sid: self.measure(vec, w) for sid, (vec, w) in updates.items()}):
            for sid, norm in norms.items():
                out[sid] = max(out[sid], norm / med if med > 0 else (math.inf if norm > 0 else 1.0))
        return out

    @staticmethod
    def _norms(sizes: Mapping[str, "UpdateSize"]):
        """Per part (the whole update, or Scaffold's two halves): its label, each site's per-record norm, their median."""
        if not sizes:
            return
        labels = next(iter(sizes.values())).parts
        for k, label in enumerate(labels):
            norms = {sid: size.per_record[k] for sid, size in sizes.items()}
            yield label, norms, float(np.median(list(norms.values())))

    def _parts(self, size: int) -> list[tuple[str, slice]]:
        if not self.scaffold:
            return [("update", slice(None))]
        n = size // 2
        return [("model update", slice(0, n)), ("control-variate update", slice(n, size))]


__all__ = ["UpdateScreen", "UpdateSize", "ClipBound", "NOISE_TAIL", "F32_SLACK", "check_norm_factor", "check_max_records", "MIN_SCREENED",
           "DEFAULT_NORM_FACTOR", "DEFAULT_MAX_RECORDS"]
