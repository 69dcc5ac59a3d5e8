"""The one builder: a :class:`~insitu.plan.Plan` becomes sites and a coordinator here, and nowhere else.

``insitu simulate``, a deployed site (:mod:`insitu.site.node`), the deployed coordinator
(:mod:`insitu.coordinator.service`), the privacy probe and report, and cross-device mode all
call these functions, so a plan tried in simulation runs the same code path when deployed.
Sites are built whole: stages, trainer, guards and protection are chosen once, at
construction, and never swapped afterwards.

Randomness that protects a site (its minibatch sampling, its DP noise, its compression's
stochastic rounding) comes from a **site secret**: 32 bytes from the OS unless a caller passes
one explicitly.  Tests that compare two code paths exactly hand both the same secret; a real run
never derives it from a value the coordinator knows or a run records.
"""
from __future__ import annotations

import hashlib
import math
import secrets as _secrets
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np

from insitu.data.dataset import SiteData
from insitu.errors import ConfigError
from insitu.federation.coordinator import Coordinator
from insitu.federation.dp import BudgetGuard, ClipStage, DPLevel, NoiseShareStage, Placement, ReclipAfter, dpsgd_trainer, with_epsilon
from insitu.federation.pipeline import SitePipeline
from insitu.federation.protocol import AggregationProtocol, PlainProtocol, PlainSiteProtection, SiteProtection
from insitu.federation.site import Guard, Site, default_trainer
from insitu.federation.transport import Transport
from insitu.learn.models import get_flat
from insitu.plan import DownlinkMode, Plan, Protection

if TYPE_CHECKING:
    from insitu.federation.egress import Egress
    from insitu.federation.robust import ClipBound

SECRET_BYTES = 32


def new_secret() -> bytes:
    """A fresh site secret from the OS CSPRNG."""
    return _secrets.token_bytes(SECRET_BYTES)


def derive_seed(secret: bytes, label: str) -> int:
    """A 63-bit seed for one purpose (``label``) from a site secret (SHA-256, domain-separated)."""
    return int.from_bytes(hashlib.sha256(b"insitu/site-secret/" + label.encode() + b"/" + secret).digest()[:8], "little") >> 1


# -- protection ---------------------------------------------------------------------------------
def protection_half(kind: Protection, site_id: str, *, attestation: Any = None, min_group: int = 0, recovery: str = "server") -> SiteProtection:
    """The site half of protection ``kind`` (before compression is composed around it).

    Deployed sites create it when a protocol's first phase (key agreement) reaches them, before
    they have seen the plan; :func:`build_site` then takes it as ``protection``."""
    if kind is Protection.PLAIN:
        return PlainSiteProtection()
    if kind is Protection.SECAGG:
        from insitu.secure import SecAggConfig, SecAggSite

        return SecAggSite(site_id, SecAggConfig(min_group=max(SecAggConfig().min_group, min_group), recovery=recovery), attestation=attestation)
    from insitu.secure import HEConfig, HESite

    return HESite(site_id, HEConfig(scheme=kind.value, min_group=max(HEConfig().min_group, min_group)), attestation=attestation)


def site_protection(plan: Plan, site_id: str, *, attestation: Any = None, min_group: int = 0, inner: SiteProtection | None = None) -> SiteProtection:
    """The last step of the site pipeline for ``plan``: protection with compression composed in."""
    from insitu.compress import CompressionSpec

    spec = CompressionSpec.parse(plan.compression)
    if plan.protection.kind is Protection.PLAIN:
        from insitu.compress.codec import UpdateCodec

        return PlainSiteProtection(UpdateCodec(spec))
    inner = inner or protection_half(plan.protection.kind, site_id, attestation=attestation, min_group=min_group,
                                     recovery=plan.protection.recovery.value)
    if plan.protection.kind is Protection.SECAGG:  # the bound its coordinator half declares (build_protocol), at least
        from insitu.secure.secagg import UNBOUNDED

        inner.min_bound = secagg_bound(plan) or UNBOUNDED  # type: ignore[attr-defined]
    if spec.is_identity:
        return inner
    from insitu.compress.secure import SharedSubsetProtocol

    return SharedSubsetProtocol.site_half(inner, spec)


def secagg_bound(plan: Plan) -> float | None:
    """The largest coordinate a site's protected vector can hold, when the plan bounds it: site-level
    DP clips every update to C with weight 1 (plus, distributed, the site's own noise share).  With a
    bound secure aggregation takes the fast 32-bit ring where the sum fits; without one, 64 bits."""
    dp = plan.dp
    if dp.level is not DPLevel.SITE or dp.adaptive_clip:
        return None
    from insitu.secure.secagg import value_bound

    share = 0.0
    if dp.placement is Placement.DISTRIBUTED:
        share = dp.site_noise(plan.rounds) * dp.sensitivity_factor * dp.clip / plan.min_sites ** 0.5
    return value_bound(dp.clip, noise_std=share)


def dp_clip_bound(plan: Plan) -> "ClipBound | None":
    """The longest update a site of ``plan`` can honestly send under site-level DP, or None.

    The site clips to C (the round's ``dp_clip`` when adaptive).  With central noise that is all: a
    sparsifier keeps part of the clipped vector (under site-level DP without an error-feedback
    residual) and int8 rounding is scaled back to C (:class:`~insitu.federation.dp.ReclipAfter`).
    With distributed noise the site adds its share N(0, σ²) per coordinate (bounded by σ(√d + 12),
    exceeded with probability below 1e-31) and int8 then rounds each value by less than its block's
    scale (‖error‖ ≤ √block / 127 · ‖x‖; top-k quantises its kept values as one block)."""
    from insitu.compress.updates import QMAX, CompressionSpec, Quantizer, Sparsifier
    from insitu.federation.robust import F32_SLACK, NOISE_TAIL

    dp = plan.dp
    if dp.level is not DPLevel.SITE:
        return None
    spec = CompressionSpec.parse(plan.compression)
    distributed = dp.placement is Placement.DISTRIBUTED
    std_per_clip = 0.0
    if distributed:
        std_per_clip = dp.site_noise(plan.rounds) * dp.sensitivity_factor / math.sqrt(plan.min_sites)
    adaptive, fixed = dp.adaptive_clip, float(dp.clip)

    def bound(round_plan: Any) -> float | None:
        c = round_plan.instructions.dp_clip if adaptive else fixed
        if c is None:
            return None
        d = round_plan.size
        quant = 1.0
        if distributed and spec.quantize is Quantizer.INT8:
            block = spec.k(d) if spec.sparsify is Sparsifier.TOPK else spec.block
            quant = 1.0 + math.sqrt(block) / QMAX
        noise = std_per_clip * float(c) * (math.sqrt(d) + NOISE_TAIL)
        return (float(c) + noise) * quant * (1 + F32_SLACK) + 1e-12

    return bound


def build_protocol(plan: Plan, *, rng: np.random.Generator | None = None) -> AggregationProtocol:
    """The coordinator half for ``plan``: protection, compression and site-level DP composed in one order.

    ``rng`` draws the central DP noise; the OS CSPRNG unless given (tests only)."""
    from insitu.compress import CompressionSpec

    spec = CompressionSpec.parse(plan.compression)
    kind = plan.protection.kind
    proto: AggregationProtocol
    if kind is Protection.PLAIN:
        from insitu.compress.codec import UpdateCodec, decode_update

        from insitu.federation.robust import UpdateScreen

        proto = PlainProtocol(decode_update, UpdateCodec(spec), UpdateScreen.for_plan(plan, dp_clip_bound(plan)))
    else:
        if kind is Protection.SECAGG:
            from insitu.secure import SecAggConfig, SecAggProtocol

            proto = SecAggProtocol(SecAggConfig(recovery=plan.protection.recovery.value, bound=secagg_bound(plan)))
        else:
            from insitu.secure import HEConfig, HEProtocol

            proto = HEProtocol(HEConfig(scheme=kind.value))
        from insitu.compress.secure import compose_with_secure

        proto = compose_with_secure(proto, spec)
    dp = plan.dp
    if dp.level is DPLevel.SITE:
        from insitu.federation.dp import CentralDPProtocol, DistributedDPProtocol
        from insitu.privacy import AdaptiveClip, secure_rng

        if dp.placement is Placement.CENTRAL:
            sb = dp.count_stddev(plan.rounds)
            adaptive = AdaptiveClip(clip=dp.clip, target_quantile=dp.target_quantile, count_stddev=sb) if sb else None
            proto = CentralDPProtocol(proto, dp.site_noise(plan.rounds), dp.clip, adaptive, rng or secure_rng(),
                                      sensitivity=dp.sensitivity_factor)
        else:
            proto = DistributedDPProtocol(proto, plan.min_sites)
    return proto


# -- the border -------------------------------------------------------------------------------------
def site_egress(plan: Plan, protection: SiteProtection) -> "Egress":
    """Everything a site running ``plan`` may send, each field with its protection.

    Training metrics: with ``protection = plain`` and no DP the update itself leaves in the clear, so
    its loss and step count may too (public by the plan).  Under secure or homomorphic aggregation,
    or any DP, no exact training metric leaves: a loss is an exact function of the records (the audit
    recovered single records from released losses alone).  A DP site reports the ε it spent (a
    function of the public plan and of the record count it announced) and, with adaptive clipping,
    its clipping indicator, a release the plan's count event accounts for."""
    from insitu.federation.egress import EVALUATE_REPLY, PERSONALIZE_REPLY, Egress, Release
    from insitu.federation.messages import MessageKind

    replies = {**protection.egress(), MessageKind.EVALUATE_REPLY: EVALUATE_REPLY, MessageKind.PERSONALIZE_REPLY: PERSONALIZE_REPLY}
    metrics: dict[str, Release] = {}
    if plan.dp.on:
        metrics.update({"epsilon_round": Release.PUBLIC, "epsilon_total": Release.PUBLIC})
        if plan.dp.adaptive_clip:
            metrics["dp_clip_bit"] = Release.DP
    elif plan.protection.kind is Protection.PLAIN:
        metrics.update({"train_loss": Release.PUBLIC, "num_samples": Release.PUBLIC, "steps": Release.PUBLIC})
    return Egress(replies, metrics)


# -- sites --------------------------------------------------------------------------------------
def dp_events(plan: Plan, n_train: int) -> tuple[tuple, float, float]:
    """What one round of a DP plan releases about one of a site's ``n_train`` records (or about the site):
    (privacy events, noise multiplier, sampling rate).  A pure function of the public plan and the
    site's own record count; sites charge it, ``site pending`` shows it."""
    from insitu.privacy import Mechanism, PrivacyEvent

    dp, task = plan.dp, plan.task
    if dp.level is DPLevel.RECORD:
        q = min(1.0, task.batch_size / max(1, n_train))
        z = dp.record_noise(plan.rounds, q, task.local_steps)
        return (PrivacyEvent(Mechanism.GAUSSIAN, z, q, task.local_steps),), z, q
    z = dp.site_noise(plan.rounds)
    sb = dp.count_stddev(plan.rounds)
    return (PrivacyEvent(Mechanism.GAUSSIAN, z),) + ((PrivacyEvent(Mechanism.GAUSSIAN, 2.0 * sb),) if sb else ()), z, 1.0


def site_dp(plan: Plan, site_id: str, n_train: int, ledger: Any, job: str | None = None) -> BudgetGuard | None:
    """The budget guard a DP plan puts in front of a site's training (None without DP)."""
    dp = plan.dp
    if not dp.on:
        return None
    if ledger is None:
        raise ConfigError(f"plan asks for {dp.level.value}-level differential privacy but site {site_id} has no privacy ledger "
                          "to charge it to (a deployed site sets [policy] epsilon_budget)")
    events, z, q = dp_events(plan, n_train)
    shares = plan.min_sites if dp.level is DPLevel.SITE and dp.placement is Placement.DISTRIBUTED else None
    return BudgetGuard(ledger, site_id, events, job=job, min_shares=shares, noise_multiplier=z, sampling_rate=q)


def build_site(
    plan: Plan,
    site_id: str,
    data: SiteData,
    *,
    secret: bytes | None = None,
    ledger: Any = None,
    guards: Iterable[Guard] = (),
    attestation: Any = None,
    min_group: int = 0,
    protection: SiteProtection | None = None,
    job: str | None = None,
) -> Site:
    """A site that runs ``plan`` on ``data``; the only way sites are made.

    ``guards`` run first (a deployed site's approval and policy checks), then the DP budget guard
    charges ``ledger`` before any training.  ``protection`` reuses a protocol half that answered
    key agreement before the plan arrived (deployment)."""
    from insitu.compress import CompressionSpec, UpdateCompressor
    from insitu.learn.dpsgd import DPSGDConfig

    secret = new_secret() if secret is None else bytes(secret)
    if len(secret) < 16:
        raise ConfigError(f"a site secret must be at least 16 bytes, got {len(secret)}")
    budget = site_dp(plan, site_id, data.n_train, ledger, job)
    dp = plan.dp
    trainer = default_trainer
    clip = noise = None
    if budget is not None and dp.level is DPLevel.RECORD:
        trainer = dpsgd_trainer(DPSGDConfig(budget.noise_multiplier, dp.clip, budget.sampling_rate), derive_seed(secret, "dp-noise"))
    elif budget is not None:
        clip = ClipStage(dp.clip, adaptive=dp.adaptive_clip)
        if dp.placement is Placement.DISTRIBUTED:
            noise = NoiseShareStage(budget.noise_multiplier, plan.min_sites, np.random.default_rng(derive_seed(secret, "dp-noise")),
                                    sensitivity=dp.sensitivity_factor)
    if budget is not None:
        trainer = with_epsilon(trainer, budget)
    spec = CompressionSpec.parse(plan.compression)
    if clip is not None:  # site-level DP: an error-feedback residual would carry earlier rounds' unnoised
        spec = replace(spec, error_feedback=False)  # updates past the clip the noise is sized for
    compress = None if spec.is_identity else UpdateCompressor(spec, seed=derive_seed(secret, "compress"))
    if clip is not None and noise is None and compress is not None:  # central noise is sized for C: rounding may not lengthen it
        compress = ReclipAfter(compress)
    protect = site_protection(plan, site_id, attestation=attestation, min_group=min_group, inner=protection)
    pipeline = SitePipeline(clip=clip, noise=noise, compress=compress, protection=protect)
    all_guards = tuple(guards) + ((budget,) if budget is not None else ())
    downlink = None
    if plan.downlink is not DownlinkMode.DENSE:
        from insitu.compress.downlink import DownlinkReceiver

        downlink = DownlinkReceiver(plan.downlink, site_id)
    return Site(
        site_id, data, plan.task, plan_hash=plan.content_hash(), train_config=plan.task.train_config(plan.strategy.mu),
        scaffold=plan.strategy.scaffold, weighting=plan.weighting, pipeline=pipeline, guards=all_guards, trainer=trainer,
        sampling_seed=derive_seed(secret, "sampling"), budget=budget, egress=site_egress(plan, protect), downlink=downlink,
    )


# -- coordinator --------------------------------------------------------------------------------
def initial_params(plan: Plan, seed: int) -> np.ndarray:
    """The global model before round 1 (public: every party may know the initialisation seed)."""
    return get_flat(plan.task.build_model(seed))


def build_coordinator(plan: Plan, job: str, transport: Transport, *, params: np.ndarray, timeout: float = 600.0,
                      sites: tuple[str, ...] | None = None, protocol: AggregationProtocol | None = None,
                      strategy_state: dict[str, np.ndarray] | None = None, cls: type[Coordinator] = Coordinator,
                      plan_by_hash: bool = True, **extra: Any) -> Coordinator:
    """The coordinator of ``plan`` over ``transport`` (in-process or mTLS), resuming ``strategy_state`` if given.

    A plan with a delta downlink sends TRAIN and EVALUATE models through
    :class:`~insitu.compress.downlink.DownlinkTransport` around ``transport``, which keeps each site's copy
    of the model; outside it, :class:`~insitu.federation.planref.PlanRefTransport` names the plan by its hash
    to sites that checked it whole (``plan_by_hash=False``: the whole plan in every request, for sites
    made afresh per message, as cross-device devices are, and for before/after measurements)."""
    if plan.downlink is not DownlinkMode.DENSE:
        from insitu.compress.downlink import DownlinkTransport

        transport = DownlinkTransport(transport, plan.downlink)
    if plan_by_hash:
        from insitu.federation.planref import PlanRefTransport

        transport = PlanRefTransport(transport)
    strategy = plan.strategy.build()
    for k, v in (strategy_state or {}).items():
        strategy.load_state(k, v)
    return cls(job=job, plan=plan, params=params, strategy=strategy, transport=transport,
               protocol=protocol if protocol is not None else build_protocol(plan), min_sites=plan.min_sites,
               timeout=timeout, sites=sites, **extra)


def build_federation(plan: Plan, sites: Iterable[SiteData], *, seed: int = 0, job: str = "job", secrets: dict[str, bytes] | None = None,
                     ledger: Any = None, fail: Any = None, wrap: Any = None, protocol: AggregationProtocol | None = None,
                     timeout: float = 600.0) -> tuple[Coordinator, dict[str, Site]]:
    """A whole in-process federation of ``plan`` over one's own ``sites`` (``SiteData``): the
    coordinator (initial model from ``seed``) and the sites, joined by the in-process transport.

    ``secrets`` (site → bytes) fixes the sites' secrets (exact-equality tests); ``fail`` rehearses
    drop-outs; ``wrap(site)`` may put a handler around each site (tests of faulty sites);
    ``protocol`` replaces the coordinator half built from the plan (its site halves are used too)."""
    from insitu.federation.transport import InProcessTransport

    built: dict[str, Site] = {}
    for sd in sites:
        inner = protocol.site_protection(sd.name) if protocol is not None and plan.protection.kind is not Protection.PLAIN else None
        built[sd.name] = build_site(plan, sd.name, sd, secret=(secrets or {}).get(sd.name), ledger=ledger, job=job, protection=inner)
    handlers = {k: wrap(v) for k, v in built.items()} if wrap else built
    coord = build_coordinator(plan, job, InProcessTransport(handlers, fail=fail), params=initial_params(plan, seed), timeout=timeout, protocol=protocol)
    return coord, built


__all__ = ["build_site", "build_federation", "site_egress", "dp_events", "build_protocol", "build_coordinator", "site_protection", "protection_half", "site_dp",
           "initial_params", "new_secret", "derive_seed"]
