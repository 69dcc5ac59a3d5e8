"""The plan: everything a federated job does, in one typed, frozen, hashable object.

``insitu simulate`` options and a deployed ``job.toml`` parse into the same :class:`Plan`
(one vocabulary, one validation).  Its content hash is what a site admin approves: the model,
the site's optimiser and hyper-parameters, FedProx's μ, the server strategy, the protection of
updates, their compression, how the global model reaches the sites (``downlink``), the
differential-privacy mechanism, the preprocessing and the model selection.  A coordinator can change none of these without the site refusing the job; what it
may vary per round is the short list in :class:`~insitu.federation.instructions.RoundInstructions`.

On the wire a plan travels as ``meta["plan"]`` (its :meth:`Plan.to_meta`); a site parses it with
:meth:`Plan.from_meta`, which refuses unknown or missing keys at every level, and compares its
hash with the approved one.  Once a site has checked it whole in a job, later requests name it by
its hash only (``meta["plan_hash"]``, :mod:`insitu.federation.planref`).  :mod:`insitu.builder` turns a plan into sites and a coordinator.
"""
from __future__ import annotations

import enum
import functools
import math
from dataclasses import dataclass, field, fields, replace
from typing import Any, Mapping

from insitu.errors import ConfigError, parse_choice
from insitu.compress.downlink import DownlinkMode
from insitu.federation.dp import DPLevel, Placement
from insitu.federation.robust import DEFAULT_MAX_RECORDS, DEFAULT_NORM_FACTOR, check_max_records, check_norm_factor
from insitu.federation.strategies import Strategy, StrategyName, make_strategy
from insitu.federation.task import TaskSpec, canonical_hash
from insitu.privacy.accounting import AccountantKind


class Protection(str, enum.Enum):
    """How updates travel to the sum (``--secure-aggregation`` / ``--homomorphic``)."""

    PLAIN = "plain"
    SECAGG = "secagg"  # pairwise masks (insitu.secure.secagg)
    PAILLIER = "paillier"  # packed Paillier, exact (insitu.secure.he)
    CKKS = "ckks"  # CKKS through TenSEAL, approximate


class Recovery(str, enum.Enum):
    """Secure aggregation: who removes the masks of dropped sites (see insitu.secure.Recovery)."""

    SERVER = "server"
    SURVIVORS = "survivors"


class Adjacency(str, enum.Enum):
    """Which neighbouring datasets site-level DP protects against telling apart."""

    REPLACE = "replace"  # one site's data swapped for any other: sensitivity 2C (holds when participants are known)
    ADD_REMOVE = "add-remove"  # one site present or absent: sensitivity C (only if participation itself is secret)


class LRSchedule(str, enum.Enum):
    CONSTANT = "constant"
    COSINE = "cosine"  # site lr decays from 100 % to 10 % over the rounds


class Selection(str, enum.Enum):
    LAST = "last"
    BEST_VAL = "best-val"  # best round by accuracy on the union of the sites' validation splits
    BEST_VAL_BALANCED = "best-val-balanced"  # best round by mean per-class recall there (insitu.federation.evaluation)


class Normalize(str, enum.Enum):
    SITE = "site"  # each site z-scores with its own training statistics (FLamby)
    FEDERATED = "federated"  # consortium moments from each site's DP release of count, Σx, Σx² (simulate only)


#: ε each site spends on its DP release of the normalisation moments (``normalize = federated``)
NORMALIZE_EPSILON = 0.1


#: server learning rates that work for the adaptive optimisers (Reddi et al. tune η on a grid)
SERVER_LR = {StrategyName.FEDADAM: 0.03, StrategyName.FEDYOGI: 0.03, StrategyName.FEDADAGRAD: 0.03}
#: FedProx's μ when none is given (FLamby's grid: 0.001 … 1)
DEFAULT_MU = 0.01
#: default clip norms: per-record gradient (record level) and per-site update (site level)
DEFAULT_CLIP = {DPLevel.RECORD: 1.0, DPLevel.SITE: 0.5}


def _finite_positive(what: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
        raise ConfigError(f"{what} must be a positive number, got {v!r}")
    return float(v)


def _strict_fields(cls: type, raw: Any, what: str) -> dict[str, Any]:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{what} must be a table/object, got {raw!r}")
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(f"{what} has unknown key(s) {unknown}; known: {sorted(names)}")
    return dict(raw)


@dataclass(frozen=True)
class StrategySpec:
    """The server strategy and what sites need of it (FedProx's μ, Scaffold's controls)."""

    name: StrategyName = StrategyName.FEDAVG
    server_lr: float | None = None  # None: 1.0, or the adaptive optimisers' default
    mu: float = 0.0  # FedProx only: sites add μ/2·‖w − w_global‖² to their loss

    def __post_init__(self) -> None:
        name = parse_choice(StrategyName, self.name, "strategy")
        object.__setattr__(self, "name", name)
        lr = self.server_lr if self.server_lr is not None else SERVER_LR.get(name, 1.0)
        object.__setattr__(self, "server_lr", _finite_positive("server_lr", lr))
        if isinstance(self.mu, bool) or not isinstance(self.mu, (int, float)) or not (math.isfinite(self.mu) and self.mu >= 0):
            raise ConfigError(f"mu must be a number >= 0, got {self.mu!r}")
        object.__setattr__(self, "mu", float(self.mu))
        if name is StrategyName.FEDPROX and self.mu <= 0:
            raise ConfigError("fedprox needs mu > 0 (the proximal weight); with mu = 0 it is fedavg")
        if name is not StrategyName.FEDPROX and self.mu != 0:
            raise ConfigError(f"mu = {self.mu} is FedProx's proximal weight; strategy {name.value} does not use it (use strategy fedprox)")

    @property
    def scaffold(self) -> bool:
        return self.name is StrategyName.SCAFFOLD

    def build(self) -> Strategy:
        """A fresh server strategy object (its state, e.g. FedAdam's moments, starts empty)."""
        return make_strategy(self.name.value, server_lr=self.server_lr, **({"mu": self.mu} if self.name is StrategyName.FEDPROX else {}))

    def to_meta(self) -> dict[str, Any]:
        return {"name": self.name.value, "server_lr": self.server_lr, "mu": self.mu}


@dataclass(frozen=True)
class ProtectionSpec:
    """What protects each site's update on its way to the sum."""

    kind: Protection = Protection.PLAIN
    recovery: Recovery | None = None  # secure aggregation: survivors (the default, fastest server) or server

    def __post_init__(self) -> None:
        kind = parse_choice(Protection, self.kind, "protection")
        object.__setattr__(self, "kind", kind)
        if self.recovery is None:
            object.__setattr__(self, "recovery", Recovery.SURVIVORS if kind is Protection.SECAGG else Recovery.SERVER)
            return
        object.__setattr__(self, "recovery", parse_choice(Recovery, self.recovery, "secagg_recovery"))
        if self.recovery is not Recovery.SERVER and kind is not Protection.SECAGG:
            raise ConfigError("secagg_recovery only applies with secure aggregation")

    @property
    def secure(self) -> bool:
        return self.kind is not Protection.PLAIN

    def to_meta(self) -> dict[str, Any]:
        return {"kind": self.kind.value, "recovery": self.recovery.value}


@dataclass(frozen=True)
class DPSpec:
    """The differential-privacy mechanism of a plan (budgets are each site's own policy, not the plan's).

    Give ``epsilon`` (each site calibrates its noise to it, for its own sampling rate) or
    ``noise_multiplier`` (fixed noise; each site reports the ε it spends).  ``adjacency`` is the
    neighbouring relation site-level DP protects: ``replace`` (one site's data swapped for other
    data, sensitivity 2C: what holds when the participants are known) or ``add-remove``.
    """

    level: DPLevel = DPLevel.OFF
    epsilon: float | None = None
    noise_multiplier: float | None = None
    delta: float = 1e-5
    clip: float | None = None
    placement: Placement = Placement.CENTRAL
    adaptive_clip: bool = False
    target_quantile: float = 0.5
    accountant: AccountantKind = AccountantKind.PLD
    adjacency: Adjacency = Adjacency.REPLACE

    def __post_init__(self) -> None:
        level = parse_choice(DPLevel, self.level, "dp")
        object.__setattr__(self, "adjacency", parse_choice(Adjacency, self.adjacency, "dp_adjacency"))
        object.__setattr__(self, "level", level)
        object.__setattr__(self, "placement", parse_choice(Placement, self.placement, "dp_placement"))
        object.__setattr__(self, "accountant", parse_choice(AccountantKind, self.accountant, "accountant"))
        if level is DPLevel.OFF:
            given = [k for k in ("epsilon", "noise_multiplier", "clip") if getattr(self, k) is not None]
            if self.adaptive_clip:
                given.append("adaptive_clip")
            if self.placement is not Placement.CENTRAL:
                given.append("dp_placement")
            if given:
                raise ConfigError(f"{', '.join(given)} given without dp = record or site; say which level of differential privacy to use")
            return
        if (self.epsilon is None) == (self.noise_multiplier is None):
            raise ConfigError("DP needs exactly one of epsilon (noise is calibrated to it) or noise_multiplier")
        if self.epsilon is not None:
            object.__setattr__(self, "epsilon", _finite_positive("epsilon", self.epsilon))
        if self.noise_multiplier is not None:
            object.__setattr__(self, "noise_multiplier", _finite_positive("noise_multiplier", self.noise_multiplier))
        if isinstance(self.delta, bool) or not isinstance(self.delta, (int, float)) or not 0 < self.delta < 1:
            raise ConfigError(f"delta must be in (0, 1), got {self.delta!r}")
        clip = self.clip if self.clip is not None else DEFAULT_CLIP[level]
        object.__setattr__(self, "clip", _finite_positive("clip", clip))
        if not 0 < self.target_quantile < 1:
            raise ConfigError(f"target_quantile must be in (0, 1), got {self.target_quantile!r}")
        if level is DPLevel.RECORD and (self.adaptive_clip or self.placement is Placement.DISTRIBUTED):
            raise ConfigError("adaptive_clip and dp_placement = distributed apply to site-level DP (dp = site)")
        if self.adaptive_clip and self.placement is Placement.DISTRIBUTED:
            raise ConfigError("adaptive clipping needs the coordinator to count clipped sites: use dp_placement = central")

    @property
    def on(self) -> bool:
        return self.level is not DPLevel.OFF

    @property
    def sensitivity_factor(self) -> float:
        """Site level: the L2 sensitivity of the sum in units of the clip norm C (2 under replace
        adjacency, 1 under add/remove); noise is z times this times C.  Record level (DP-SGD with
        Poisson sampling) is accounted under add/remove of one record, its standard setting."""
        return 2.0 if self.level is DPLevel.SITE and self.adjacency is Adjacency.REPLACE else 1.0

    # -- noise, calibrated once per (plan, sampling rate); pure functions of public values ----------
    def record_noise(self, rounds: int, sampling_rate: float, steps: int) -> float:
        """Record level: the noise multiplier of a site whose Poisson sampling rate is ``sampling_rate``."""
        return self.noise_multiplier or _calibrate(self.epsilon, self.delta, rounds, sampling_rate, steps, self.accountant, 0.0)

    def count_stddev(self, rounds: int) -> float | None:
        """Adaptive clipping's σ_b (noise on the count of unclipped sites), or None."""
        if not self.adaptive_clip:
            return None
        base = self.noise_multiplier or _calibrate(self.epsilon, self.delta, rounds, 1.0, 1, self.accountant, 0.0)
        # Andrew et al. suggest σ_b = (expected sites)/20; with a handful of hospitals that would eat the
        # budget, so the count gets at most ~10 % of the privacy (σ_b = 1.6 z).
        return 1.6 * base

    def site_noise(self, rounds: int) -> float:
        """Site level: the noise multiplier on the clipped updates (after the count's share)."""
        sb = self.count_stddev(rounds)
        if self.epsilon is not None:
            return _calibrate(self.epsilon, self.delta, rounds, 1.0, 1, self.accountant, sb or 0.0)
        if sb is None:
            return float(self.noise_multiplier)
        from insitu.privacy import split_noise

        return split_noise(float(self.noise_multiplier), sb)

    def to_meta(self) -> dict[str, Any]:
        return {"level": self.level.value, "epsilon": self.epsilon, "noise_multiplier": self.noise_multiplier,
                "delta": self.delta, "clip": self.clip, "placement": self.placement.value,
                "adaptive_clip": self.adaptive_clip, "target_quantile": self.target_quantile,
                "accountant": self.accountant.value, "adjacency": self.adjacency.value}


@functools.lru_cache(maxsize=256)
def _calibrate(eps: float, delta: float, rounds: int, q: float, steps: int, kind: AccountantKind, count_stddev: float) -> float:
    from insitu.privacy import Mechanism, PrivacyEvent, calibrate_noise

    extra = (PrivacyEvent(Mechanism.GAUSSIAN, 2.0 * count_stddev),) if count_stddev else ()
    return calibrate_noise(eps, delta, rounds=rounds, sampling_rate=q, steps_per_round=steps, kind=kind, extra_per_round=extra)


@dataclass(frozen=True)
class Plan:
    """One federated job, as every party reads it.  Frozen; :meth:`content_hash` is what sites approve."""

    task: TaskSpec
    strategy: StrategySpec = field(default_factory=StrategySpec)
    protection: ProtectionSpec = field(default_factory=ProtectionSpec)
    compression: str = "none"
    dp: DPSpec = field(default_factory=DPSpec)
    rounds: int = 30
    min_sites: int = 1
    lr_schedule: LRSchedule = LRSchedule.CONSTANT
    select: Selection = Selection.LAST
    normalize: Normalize = Normalize.SITE
    normalize_epsilon: float = NORMALIZE_EPSILON  # federated normalisation: ε of each site's moments release
    #: how the global model reaches the sites: dense, or a (lossless or int8) delta against what each holds
    downlink: DownlinkMode = DownlinkMode.DENSE
    #: plain rounds (insitu.federation.robust): a site's per-record update may be at most this many times
    #: the round's median norm, and its weight (training record count) at most max_site_records
    update_norm_factor: float = DEFAULT_NORM_FACTOR
    max_site_records: int = DEFAULT_MAX_RECORDS

    def __post_init__(self) -> None:
        from insitu.compress.updates import CompressionSpec

        object.__setattr__(self, "update_norm_factor", check_norm_factor(self.update_norm_factor))
        object.__setattr__(self, "max_site_records", check_max_records(self.max_site_records))

        object.__setattr__(self, "downlink", DownlinkMode.parse(self.downlink))

        object.__setattr__(self, "lr_schedule", parse_choice(LRSchedule, self.lr_schedule, "lr_schedule"))
        object.__setattr__(self, "select", parse_choice(Selection, self.select, "select"))
        object.__setattr__(self, "normalize", parse_choice(Normalize, self.normalize, "normalize"))
        object.__setattr__(self, "normalize_epsilon", _finite_positive("normalize_epsilon", self.normalize_epsilon))
        spec = CompressionSpec.parse(self.compression)
        object.__setattr__(self, "compression", str(spec))
        if isinstance(self.rounds, bool) or not isinstance(self.rounds, int) or not 1 <= self.rounds <= 1_000_000:
            raise ConfigError(f"rounds must be an integer from 1 to 1,000,000, got {self.rounds!r}")
        if isinstance(self.min_sites, bool) or not isinstance(self.min_sites, int) or not 1 <= self.min_sites <= 1_000_000:
            raise ConfigError(f"min_sites must be an integer from 1 to 1,000,000, got {self.min_sites!r}")
        if self.protection.secure and not spec.is_identity:
            from insitu.compress.secure import check_composes

            check_composes(spec)  # masks cancel only on aligned coordinates: shared:F composes, top-k and int8 do not
        if self.dp.level is DPLevel.SITE and self.dp.placement is Placement.DISTRIBUTED and self.dp.adaptive_clip:
            raise ConfigError("adaptive clipping needs central noise")
        if self.dp.level is DPLevel.RECORD and isinstance(self.task.class_weights, str):
            raise ConfigError(f"class_weights = {self.task.class_weights.value!r} derives each site's weights from its training labels, so one "
                              "record changes every other record's weight and record-level DP's clip bound no longer holds; with dp = record "
                              "give fixed weights (e.g. 1,0.5) or none")
        if self.dp.level is DPLevel.RECORD and self.task.model_spec is not None:
            from insitu.learn.spec import check_record_dp

            check_record_dp(self.task.model_spec.canonical)  # refused now, not at the sites' first round

    # -- derived ------------------------------------------------------------------------------
    @property
    def weighting(self) -> str:
        """Site-level DP weights every site the same (its sensitivity is one clipped update)."""
        return "uniform" if self.dp.level is DPLevel.SITE else "samples"

    def lr_scale(self, round_: int) -> float:
        if self.lr_schedule is LRSchedule.CONSTANT:
            return 1.0
        floor = 0.1
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * (round_ - 1) / max(1, self.rounds - 1)))

    # -- wire and hash ------------------------------------------------------------------------
    def to_meta(self) -> dict[str, Any]:
        return {
            "task": self.task.to_meta(), "strategy": self.strategy.to_meta(), "protection": self.protection.to_meta(),
            "compression": self.compression, "dp": self.dp.to_meta(), "rounds": self.rounds, "min_sites": self.min_sites,
            "lr_schedule": self.lr_schedule.value, "select": self.select.value, "normalize": self.normalize.value,
            "normalize_epsilon": self.normalize_epsilon,
            # only when not dense: plans without downlink compression keep the hash sites approved before the field existed
            **({"downlink": self.downlink.value} if self.downlink is not DownlinkMode.DENSE else {}),
            # the same for the plain rounds' bounds: in the hash only when a plan sets another value than the default
            **({"update_norm_factor": self.update_norm_factor} if self.update_norm_factor != DEFAULT_NORM_FACTOR else {}),
            **({"max_site_records": self.max_site_records} if self.max_site_records != DEFAULT_MAX_RECORDS else {}),
        }

    @classmethod
    def from_meta(cls, raw: Any) -> "Plan":
        """Parse a plan received from a peer or read from storage; every key is checked."""
        d = _strict_fields(cls, raw, "plan")
        missing = sorted({f.name for f in fields(cls)} - set(d) - {"downlink", "update_norm_factor", "max_site_records"})
        if missing:
            raise ConfigError(f"plan lacks key(s) {missing}")
        d["task"] = TaskSpec.from_meta(d["task"])
        d["strategy"] = StrategySpec(**_strict_fields(StrategySpec, d["strategy"], "plan strategy"))
        d["protection"] = ProtectionSpec(**_strict_fields(ProtectionSpec, d["protection"], "plan protection"))
        d["dp"] = DPSpec(**_strict_fields(DPSpec, d["dp"], "plan dp"))
        try:
            return cls(**d)
        except TypeError as exc:
            raise ConfigError(f"invalid plan: {exc}") from None

    def content_hash(self) -> str:
        """SHA-256 over the canonical JSON of the plan: what a site admin approves."""
        return canonical_hash(self.to_meta())

    def with_task(self, **changes: Any) -> "Plan":
        return replace(self, task=replace(self.task, **changes))


__all__ = ["Plan", "DownlinkMode", "StrategySpec", "ProtectionSpec", "DPSpec", "Protection", "Recovery", "Adjacency", "LRSchedule", "Selection",
           "Normalize", "NORMALIZE_EPSILON", "SERVER_LR", "DEFAULT_MU"]
