"""Differential privacy in the round engine: site guards, clip/noise stages, protocol wrappers.

Two levels (``DPLevel``):

* **record** — each site trains with DP-SGD (``insitu.learn.dpsgd``); the unit protected is
  one patient record of that site.  Each site calibrates its own noise for its own sampling
  rate q = batch / n_train, and its ledger composes its own rounds.  The run's ε is the
  largest over sites (sites hold disjoint records: parallel composition).
* **site** — DP-FedAvg (McMahan et al. 2018): each site's whole update is clipped to L2 norm
  C, updates are weighted uniformly, and Gaussian noise of std z·C is added to the sum; the
  unit protected is a whole hospital's contribution (add/remove-one-site adjacency).

Two placements of the site-level noise (``Placement``):

* **central** — :class:`CentralDPProtocol` wraps any aggregation protocol and adds
  N(0, (zC)²) to the aggregate.  Sites trust the coordinator to add it.
* **distributed** — every site adds its share N(0, (zC)²/m) *before* masking/encryption,
  where m is the minimum number of sites a round needs (``--min-sites``).  Whatever the
  dropouts, a completed round sums ≥ m shares, so the noise is never below the accounted
  zC (more sites only add noise).  :class:`DistributedDPProtocol` aborts a round with fewer
  than m shares, and sites refuse a round that announces a smaller m.  With secure
  aggregation the coordinator never sees a single update nor an un-noised sum.

Every site enforces its own budget: a :class:`BudgetGuard` charges the round's events to the
site's :class:`~insitu.privacy.PrivacyLedger` *before* training and refuses with
``BudgetExceeded`` if the round would cross the limit.
"""
from __future__ import annotations

import enum
import math
import uuid
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from insitu.errors import BudgetExceeded, ConfigError, PolicyViolation, ProtocolError, RoundAborted
from insitu.federation.messages import Message
from insitu.federation.protocol import AggregateResult, AggregationProtocol, RoundPlan, SiteProtection
from insitu.federation.task import TaskSpec
from insitu.federation.transport import Transport
from insitu.learn.dpsgd import DPSGDConfig, dp_sgd_train
from insitu.privacy import (
    AccountantKind,
    AdaptiveClip,
    Budget,
    LedgerRecord,
    Mechanism,
    PrivacyEvent,
    PrivacyLedger,
    calibrate_noise,
    clip_by_norm,
    secure_rng,
)


class DPLevel(str, enum.Enum):
    OFF = "off"
    RECORD = "record"
    SITE = "site"


class Placement(str, enum.Enum):
    CENTRAL = "central"
    DISTRIBUTED = "distributed"


#: default clip norms: per-record gradient (record level) and per-site update (site level).
DEFAULT_CLIP = {DPLevel.RECORD: 1.0, DPLevel.SITE: 0.5}
#: a budget when neither a target ε nor a site budget is given (noise set by hand).
FALLBACK_BUDGET = 10.0


@dataclass(frozen=True)
class DPSettings:
    """What a user asks for.  Give ``epsilon`` (noise is calibrated) or ``noise_multiplier``."""

    level: DPLevel = DPLevel.OFF
    epsilon: float | None = None
    delta: float = 1e-5
    noise_multiplier: float | None = None
    clip: float | None = None
    placement: Placement = Placement.CENTRAL
    adaptive_clip: bool = False
    target_quantile: float = 0.5
    site_budgets: Mapping[str, float] = field(default_factory=dict)
    default_budget: float | None = None
    accountant: AccountantKind = AccountantKind.PLD

    def __post_init__(self) -> None:
        object.__setattr__(self, "level", _enum(DPLevel, self.level, "--dp"))
        object.__setattr__(self, "placement", _enum(Placement, self.placement, "--dp-placement"))
        object.__setattr__(self, "accountant", _enum(AccountantKind, self.accountant, "--accountant"))
        if self.level is DPLevel.OFF:
            return
        if (self.epsilon is None) == (self.noise_multiplier is None):
            raise ConfigError("DP needs exactly one of --epsilon (noise is calibrated to it) or --noise-multiplier")
        if self.epsilon is not None and not (self.epsilon > 0 and math.isfinite(self.epsilon)):
            raise ConfigError(f"--epsilon must be a positive number, got {self.epsilon}")
        if self.noise_multiplier is not None and not (self.noise_multiplier > 0):
            raise ConfigError(f"--noise-multiplier must be positive, got {self.noise_multiplier}")
        if not (0 < self.delta < 1):
            raise ConfigError(f"--delta must be in (0, 1), got {self.delta}")
        if self.clip is not None and not (self.clip > 0):
            raise ConfigError(f"--clip must be positive, got {self.clip}")
        if self.level is DPLevel.RECORD and (self.adaptive_clip or self.placement is Placement.DISTRIBUTED):
            raise ConfigError("--adaptive-clip and --dp-placement distributed apply to site-level DP (--dp site)")
        if self.adaptive_clip and self.placement is Placement.DISTRIBUTED:
            raise ConfigError("adaptive clipping needs the coordinator to count clipped sites: use --dp-placement central")
        for site, eps in self.site_budgets.items():
            if not (eps > 0):
                raise ConfigError(f"budget of site {site} must be positive, got {eps}")

    @property
    def on(self) -> bool:
        return self.level is not DPLevel.OFF

    @property
    def clip_norm(self) -> float:
        return self.clip if self.clip is not None else DEFAULT_CLIP[self.level]

    def budget_for(self, site: str) -> Budget:
        eps = self.site_budgets.get(site, self.default_budget if self.default_budget is not None else (self.epsilon or FALLBACK_BUDGET))
        return Budget(eps, self.delta, self.accountant)


def parse_budgets(spec: str | None) -> tuple[dict[str, float], float | None]:
    """``"3"`` (every site) or ``"cleveland=1,hungary=0.5,default=3"`` → (per site, default)."""
    if not spec:
        return {}, None
    per: dict[str, float] = {}
    default = None
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        name, _, val = part.rpartition("=")
        try:
            eps = float(val)
        except ValueError:
            raise ConfigError(f"--site-budget part {part!r} is not NAME=EPSILON or EPSILON") from None
        if name in ("", "default", "*"):
            default = eps
        else:
            per[name] = eps
    return per, default


def _enum(cls, value, option):
    try:
        return cls(value)
    except ValueError:
        raise ConfigError(f"{option}: unknown value {value!r}; choose one of {[m.value for m in cls]}") from None


# ---------------------------------------------------------------------------------------------
# site side
# ---------------------------------------------------------------------------------------------
@dataclass
class BudgetGuard:
    """A site guard: charges the round's privacy events to the site's ledger before training.

    ``events(task)`` gives what the round will release; the ledger refuses (BudgetExceeded)
    without recording anything if that would cross the budget.  ``min_shares`` (distributed
    noise) refuses a round whose coordinator announces fewer noise shares than this site's
    share was sized for.
    """

    ledger: PrivacyLedger
    site: str
    events: Any  # Callable[[TaskSpec], tuple[PrivacyEvent, ...]]
    job: str | None = None
    min_shares: int | None = None
    charged: dict[int, LedgerRecord] = field(default_factory=dict)
    refused: dict[int, str] = field(default_factory=dict)

    def __call__(self, site: Any, request: Message, task: TaskSpec) -> None:
        if self.min_shares is not None:
            announced = request.meta.get("dp_min_shares")
            if not isinstance(announced, int) or announced < self.min_shares:
                msg = (f"site {self.site}: round {request.round} announces {announced!r} noise shares; this site's share "
                       f"is sized for at least {self.min_shares}, so the sum could carry less noise than accounted")
                self.refused[request.round] = msg
                raise PolicyViolation(msg)
        try:
            rec = self.ledger.charge(self.site, self.job or request.job, request.round, self.events(task))
        except BudgetExceeded as exc:
            self.refused[request.round] = str(exc)
            raise
        self.charged[request.round] = rec


@dataclass
class ClipStage:
    """Clips the site's whole update to L2 norm C (C from the coordinator when adaptive)."""

    clip: float
    adaptive: bool = False
    max_clip: float = 1e4

    def apply(self, vec: np.ndarray, request: Message, info: dict[str, Any]) -> np.ndarray:
        c = self.clip
        if self.adaptive:
            c = request.meta.get("dp_clip", self.clip)
            if not isinstance(c, (int, float)) or not (0 < c <= self.max_clip):
                raise ProtocolError(f"clip norm {c!r} from the coordinator is not in (0, {self.max_clip}]")
        out, norm = clip_by_norm(vec, float(c))
        info["dp_update_norm"] = norm
        info["dp_clip"] = float(c)
        if self.adaptive:
            info["dp_clip_bit"] = 0.5 if norm <= c else -0.5
        return out


@dataclass
class NoiseShareStage:
    """Adds this site's share N(0, (zC)²/m) of the distributed noise (before masking)."""

    noise_multiplier: float
    shares: int
    rng: np.random.Generator = field(default_factory=secure_rng)

    def apply(self, vec: np.ndarray, request: Message, info: dict[str, Any]) -> np.ndarray:
        c = info.get("dp_clip")
        if c is None:
            raise ConfigError("the noise stage needs the clip stage before it (the pipeline fixes that order)")
        std = self.noise_multiplier * c / math.sqrt(self.shares)
        info["dp_noise_share_std"] = std
        return vec + self.rng.normal(0.0, std, size=vec.shape)


@dataclass(frozen=True)
class TaskDP:
    """Record-level DP a *deployed* task asks for, read from ``TaskSpec.extra``.

    The parameters live in the task, so they are covered by the content hash a site admin
    approves: a coordinator cannot lower the noise without the site refusing the task.  Only
    the mechanism is fixed by the task; each site derives its own sampling rate q = batch /
    its records and computes its own ε with its own accountant and ledger (the coordinator's
    figure, if any, is never trusted)."""

    noise_multiplier: float
    clip: float

    @classmethod
    def of(cls, task: TaskSpec) -> "TaskDP | None":
        extra = task.extra if isinstance(task.extra, Mapping) else {}
        level = extra.get("dp")
        if level is None:
            stray = [k for k in ("noise_multiplier", "clip", "epsilon_per_round") if k in extra]
            if stray:
                raise ConfigError(f"task {task.content_hash()[:12]} sets {stray} without dp = \"record\"; a deployed DP task "
                                  "names its mechanism: dp = \"record\", noise_multiplier, clip")
            return None
        if level != DPLevel.RECORD.value:
            raise ConfigError(f"task asks for dp = {level!r}; deployed sites run record-level DP (dp = \"record\", DP-SGD at the site)")
        out = []
        for k in ("noise_multiplier", "clip"):
            v = extra.get(k)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
                raise ConfigError(f"record-level DP task needs a positive {k}, got {v!r}")
            out.append(float(v))
        return cls(*out)

    def sampling_rate(self, n_train: int, batch_size: int) -> float:
        return min(1.0, batch_size / max(1, n_train))

    def events(self, task: TaskSpec, n_train: int) -> tuple[PrivacyEvent, ...]:
        """What one round of this task releases about one of ``n_train`` records."""
        return (PrivacyEvent(Mechanism.GAUSSIAN, self.noise_multiplier, self.sampling_rate(n_train, task.batch_size), task.local_steps),)

    def install(self, site: Any, ledger: PrivacyLedger, *, job: str | None = None) -> BudgetGuard:
        """Charge every round to ``ledger`` before training and train with DP-SGD (OS-seeded noise)."""
        n = int(site.data.n_train)
        guard = BudgetGuard(ledger, site.site_id, lambda task: self.events(task, n), job=job)
        site.guards.append(guard)
        dp = DPSGDConfig(self.noise_multiplier, self.clip, self.sampling_rate(n, site.task.batch_size))
        site.trainer = with_epsilon(dpsgd_trainer(dp), guard)
        return guard


def dpsgd_trainer(dp: DPSGDConfig, noise_seed: int | None = None):
    """A :data:`~insitu.federation.site.Trainer` running DP-SGD on the site's records.

    The noise stream is seeded from the OS unless ``noise_seed`` is given (reproducible
    simulations only); the site's own generator draws only the Poisson samples."""
    import secrets

    import torch

    noise = torch.Generator().manual_seed(secrets.randbits(63) if noise_seed is None else noise_seed)

    def trainer(site: Any, model: Any, cfg: Any, request: Message) -> dict[str, Any]:
        correction = site.scaffold_correction(request, model)
        return dp_sgd_train(model, site.data.X_train, site.data.y_train, cfg, dp, site.generator,
                            num_outputs=site.task.num_outputs, correction=correction, noise_generator=noise)

    return trainer


def with_epsilon(trainer: Any, guard: BudgetGuard):
    """Adds the round's charged ε to the metrics the trainer returns (they travel in the reply)."""

    def wrapped(site: Any, model: Any, cfg: Any, request: Message) -> dict[str, Any]:
        info = dict(trainer(site, model, cfg, request))
        rec = guard.charged.get(request.round)
        if rec is not None:
            info["epsilon_round"] = rec.epsilon_round
            info["epsilon_total"] = rec.epsilon_total
        return info

    return wrapped


# ---------------------------------------------------------------------------------------------
# coordinator side: protocol wrappers ("wrap, don't fork")
# ---------------------------------------------------------------------------------------------
def _uniform(result: AggregateResult, round_: int) -> None:
    if abs(result.weight - len(result.participants)) > 1e-6:
        raise RoundAborted(f"round {round_}: site-level DP needs uniform weighting (weight {result.weight} for "
                           f"{len(result.participants)} sites); the global model is unchanged")


@dataclass
class CentralDPProtocol:
    """Wraps any protocol; adds N(0, (zC)²) to the aggregate sum and (optionally) adapts C."""

    inner: AggregationProtocol
    noise_multiplier: float
    clip: float
    adaptive: AdaptiveClip | None = None
    rng: np.random.Generator = field(default_factory=secure_rng)
    clips: list[float] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.inner.name}+central-dp"

    def collect(self, plan: RoundPlan, transport: Transport) -> AggregateResult:
        c = self.adaptive.clip if self.adaptive else self.clip
        if self.adaptive:
            plan = replace(plan, train_meta={**plan.train_meta, "dp_clip": c})
        result = self.inner.collect(plan, transport)
        if not result.participants:
            return result
        _uniform(result, plan.round)
        noisy = result.total + self.rng.normal(0.0, self.noise_multiplier * c, size=result.total.shape)
        self.clips.append(c)
        if self.adaptive:
            bits = [m.get("dp_clip_bit") for m in result.site_metrics.values()]
            if any(b not in (-0.5, 0.5) for b in bits):
                raise RoundAborted(f"round {plan.round}: a site did not report its clip indicator; the global model is unchanged")
            self.adaptive.update(bits, self.rng)
        return replace(result, total=noisy)

    def site_protection(self, site_id: str) -> SiteProtection:
        return self.inner.site_protection(site_id)


@dataclass
class DistributedDPProtocol:
    """Wraps any protocol; tells sites the minimum number of noise shares and refuses to finish a
    round that holds fewer (the noise would be below what every site accounted)."""

    inner: AggregationProtocol
    shares: int

    @property
    def name(self) -> str:
        return f"{self.inner.name}+distributed-dp"

    def collect(self, plan: RoundPlan, transport: Transport) -> AggregateResult:
        plan = replace(plan, train_meta={**plan.train_meta, "dp_min_shares": self.shares}, min_sites=max(plan.min_sites, self.shares))
        result = self.inner.collect(plan, transport)
        if not result.participants:
            return result
        _uniform(result, plan.round)
        if len(result.participants) < self.shares:
            raise RoundAborted(f"round {plan.round}: only {len(result.participants)} noise shares arrived, each was sized for "
                               f"{self.shares}; the sum is not released and the global model is unchanged")
        return result

    def site_protection(self, site_id: str) -> SiteProtection:
        return self.inner.site_protection(site_id)


# ---------------------------------------------------------------------------------------------
# one run: settings → guards, trainers, stages, wrapper, and what the report shows
# ---------------------------------------------------------------------------------------------
class DPRun:
    """Sets up DP for one federated run and reports what it spent.

    ``site_sizes`` maps site name → number of training records (record level needs it for q).
    """

    def __init__(self, settings: DPSettings, *, rounds: int, local_steps: int, batch_size: int,
                 site_sizes: Mapping[str, int], min_sites: int, ledger_path: str | Path | None,
                 seed: int | None = None, run_id: str | None = None, audit: Any = None):
        self.settings = settings
        self.rounds = rounds
        self.local_steps = local_steps
        self.run_id = run_id or f"run-{uuid.uuid4().hex[:12]}"
        self.seed = seed
        self.ledger = PrivacyLedger(ledger_path or ":memory:", audit=audit)
        self.guards: dict[str, BudgetGuard] = {}
        self.by_round: list[dict[str, Any]] = []
        self.shares = max(1, int(min_sites))
        s = settings
        self.noise: dict[str, float] = {}
        self.sampling: dict[str, float] = {}
        self.adaptive: AdaptiveClip | None = None
        self.count_event: PrivacyEvent | None = None
        if s.level is DPLevel.RECORD:
            for site, n in site_sizes.items():
                q = min(1.0, batch_size / max(1, n))
                self.sampling[site] = q
                self.noise[site] = s.noise_multiplier or calibrate_noise(
                    s.epsilon, s.delta, rounds=rounds, sampling_rate=q, steps_per_round=local_steps, kind=s.accountant)
        elif s.level is DPLevel.SITE:
            extra: tuple[PrivacyEvent, ...] = ()
            if s.adaptive_clip:
                base = s.noise_multiplier or calibrate_noise(s.epsilon, s.delta, rounds=rounds, kind=s.accountant)
                # Andrew et al. suggest σ_b = m/20 for many sites; with a handful of hospitals that
                # would eat the budget, so the count gets at most ~10 % of the privacy (σ_b ≥ 1.6 z).
                sigma_b = max(len(site_sizes) / 20.0, 1.6 * base)
                self.adaptive = AdaptiveClip(clip=s.clip_norm, target_quantile=s.target_quantile, count_stddev=sigma_b)
                self.count_event = self.adaptive.count_event()
                extra = (self.count_event,)
            z = s.noise_multiplier if s.noise_multiplier is not None and not s.adaptive_clip else None
            if z is None and s.epsilon is not None:
                z = calibrate_noise(s.epsilon, s.delta, rounds=rounds, kind=s.accountant, extra_per_round=extra)
            elif z is None:  # hand-set total noise with adaptive clipping: split it
                from insitu.privacy import split_noise

                z = split_noise(s.noise_multiplier, self.adaptive.count_stddev)
            for site in site_sizes:
                self.noise[site] = z
        # A persisted ledger keeps a site's budget across runs unless one is given explicitly.
        for site in site_sizes:
            if s.on and (site in s.site_budgets or s.default_budget is not None or not self._has_budget(site)):
                self.ledger.set_budget(site, s.budget_for(site))

    def _has_budget(self, site: str) -> bool:
        try:
            self.ledger.budget(site)
            return True
        except ConfigError:
            return False

    @property
    def weighting(self) -> str:
        return "uniform" if self.settings.level is DPLevel.SITE else "samples"

    def round_events(self, site: str, task: TaskSpec) -> tuple[PrivacyEvent, ...]:
        z = self.noise[site]
        if self.settings.level is DPLevel.RECORD:
            return (PrivacyEvent(Mechanism.GAUSSIAN, z, self.sampling[site], task.local_steps),)
        return (PrivacyEvent(Mechanism.GAUSSIAN, z),) + ((self.count_event,) if self.count_event else ())

    def wrap_protocol(self, protocol: AggregationProtocol) -> AggregationProtocol:
        s = self.settings
        if s.level is not DPLevel.SITE:
            return protocol
        rng = secure_rng(None if self.seed is None else self.seed + 7919)
        if s.placement is Placement.CENTRAL:
            return CentralDPProtocol(protocol, self.noise[next(iter(self.noise))], s.clip_norm, self.adaptive, rng)
        return DistributedDPProtocol(protocol, self.shares)

    def configure_site(self, site: Any) -> None:
        """Install this run's guard, trainer and pipeline stages on a :class:`Site`."""
        s = self.settings
        sid = site.site_id
        guard = BudgetGuard(self.ledger, sid, lambda task, sid=sid: self.round_events(sid, task), job=self.run_id,
                            min_shares=self.shares if s.level is DPLevel.SITE and s.placement is Placement.DISTRIBUTED else None)
        self.guards[sid] = guard
        site.guards.append(guard)
        trainer = site.trainer
        if s.level is DPLevel.RECORD:
            trainer = dpsgd_trainer(DPSGDConfig(self.noise[sid], s.clip_norm, self.sampling[sid]),
                                    None if self.seed is None else self.seed * 7 + zlib.crc32(sid.encode()) + 1)
        else:
            site.pipeline.clip = ClipStage(s.clip_norm, adaptive=self.adaptive is not None)
            if s.placement is Placement.DISTRIBUTED:
                rng = secure_rng(None if self.seed is None else self.seed * 7 + zlib.crc32(sid.encode()))
                site.pipeline.noise = NoiseShareStage(self.noise[sid], self.shares, rng)
        site.trainer = with_epsilon(trainer, guard)

    # -- reporting ---------------------------------------------------------------------------
    def round_summary(self, round_: int) -> dict[str, Any]:
        per_site = {sid: g.charged[round_].epsilon_total for sid, g in self.guards.items() if round_ in g.charged}
        spent = {sid: self.ledger.spent(sid) for sid in self.guards}
        refused = {sid: g.refused[round_] for sid, g in self.guards.items() if round_ in g.refused}
        out: dict[str, Any] = {
            "epsilon": max(spent.values()) if spent else 0.0,
            "epsilon_round": max((g.charged[round_].epsilon_round for g in self.guards.values() if round_ in g.charged), default=0.0),
            "epsilon_sites": per_site,
        }
        if refused:
            out["dp_refused"] = refused
        self.by_round.append({"round": round_, "epsilon": out["epsilon"]})
        return out

    def final(self) -> dict[str, Any]:
        s = self.settings
        spent = {sid: self.ledger.spent(sid) for sid in self.guards}
        refusals = [{"site": sid, "round": r, "reason": why} for sid, g in self.guards.items() for r, why in sorted(g.refused.items())]
        return {
            "epsilon": max(spent.values()) if spent else 0.0,
            "delta": s.delta,
            "epsilon_per_site": spent,
            "privacy": {
                "level": s.level.value,
                "placement": s.placement.value if s.level is DPLevel.SITE else None,
                "accountant": s.accountant.value,
                "target_epsilon": s.epsilon,
                "noise_multiplier": dict(self.noise),
                "sampling_rate": dict(self.sampling) or None,
                "clip": s.clip_norm,
                "adaptive_clip": self.adaptive is not None,
                "count_noise_stddev": self.adaptive.count_stddev if self.adaptive else None,
                "noise_shares": self.shares if s.level is DPLevel.SITE and s.placement is Placement.DISTRIBUTED else None,
                "budgets": {sid: self.ledger.budget(sid).epsilon for sid in self.guards},
                "refusals": refusals,
                "epsilon_by_round": list(self.by_round),
                "ledger_run_id": self.run_id,
            },
        }

    def close(self) -> None:
        self.ledger.close()


__all__ = [
    "DPLevel", "Placement", "DPSettings", "parse_budgets", "BudgetGuard", "ClipStage", "NoiseShareStage",
    "CentralDPProtocol", "DistributedDPProtocol", "DPRun", "dpsgd_trainer", "with_epsilon",
]


def settings_from(cfg: Any) -> DPSettings:
    """DPSettings from a :class:`~insitu.federation.simulation.SimulationConfig` (its DP fields)."""
    per, default = parse_budgets(cfg.site_budget)
    return DPSettings(level=cfg.dp, epsilon=cfg.epsilon, delta=cfg.delta, noise_multiplier=cfg.noise_multiplier,
                      clip=cfg.clip, placement=cfg.dp_placement, adaptive_clip=cfg.adaptive_clip,
                      site_budgets=per, default_budget=default, accountant=cfg.accountant)


def run_for_simulation(cfg: Any, data: Any) -> DPRun | None:
    """The DPRun of a resolved SimulationConfig, or None when --dp is off."""
    settings = settings_from(cfg)
    if not settings.on:
        return None
    return DPRun(settings, rounds=cfg.rounds, local_steps=cfg.local_steps, batch_size=cfg.batch_size,
                 site_sizes={s.name: s.n_train for s in data.sites}, min_sites=cfg.min_sites,
                 ledger_path=cfg.privacy_ledger, seed=cfg.seed)


#: Training defaults that suit DP (larger Poisson batches, fewer steps: each step costs ε),
#: used only where the user did not set the option.  Heart, record level, ε = 1: mean site
#: accuracy 0.721 ± 0.021 over seeds 0–4 (bench/dp_tradeoff.py).
DP_DEFAULTS: dict[tuple[str, DPLevel], dict[str, Any]] = {
    ("heart", DPLevel.RECORD): {"rounds": 10, "local_steps": 5, "batch_size": 64, "lr": 0.3},
    # Plain SGD, not Adam: Adam rescales every coordinate of the noisy gradient to about the same
    # step, so the noise moves the model as much as the signal.  On the default non-IID split
    # (dirichlet:0.5, 283-1,300 images a hospital) the old recipe (5 rounds x 10 Adam steps, lr 0.05)
    # collapsed to one class at every ε; this one reached 0.859 / 0.845 (ε = 8, seeds 0 / 1) and on
    # IID sites 0.853 (ε = 8) / 0.835 (ε = 1), but on the non-IID split at ε ≤ 3 the global model
    # still flips between classes every other round (the 283-image hospital needs σ ≈ 41 at ε = 1).
    # Constant lr: with the cosine image schedule DP-SGD collapsed to the majority class (0.625).
    ("pneumoniamnist", DPLevel.RECORD): {"rounds": 30, "local_steps": 5, "batch_size": 256, "lr": 2.0, "optimizer": "sgd",
                                         "lr_schedule": "constant"},
}


def dp_defaults(dataset: str, level: str, defaults: Any) -> Any:
    """The dataset's ``Defaults`` record with DP-friendly training values swapped in."""
    try:
        key = (dataset, DPLevel(level))
    except ValueError:
        return defaults
    over = DP_DEFAULTS.get(key)
    return replace(defaults, **over) if over else defaults
