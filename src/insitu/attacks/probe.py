"""The worst case for a site: a round whose update comes from a single record.

A site's update is most revealing when it was computed from one record (a site with one new
patient, or a coordinator that asks for one local step at batch size one).  The probe builds one
site per record, runs a real round through the given protocol and site pipeline (so masking,
encryption, clipping and noise are the ones a run uses), and lets the curious coordinator attack
every vector it received.  A record counts as reconstructed when *any* view yields it: the
attacker is given the benefit of choosing its best view after the fact.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from insitu.attacks.observer import ObservedRound, observe_round
from insitu.attacks.reconstruction import MatchConfig, analytic_linear, reconstruct_image, score_images, score_tabular
from insitu.data.dataset import SiteData
from insitu.errors import ConfigError
from insitu.federation.task import TaskSpec
from insitu.federation.transport import InProcessTransport
from insitu.learn.models import set_flat
from insitu.plan import Plan


def probe_plan(plan: Plan, noise_multiplier: float | None = None) -> Plan:
    """The worst case of ``plan`` for a site: one plain SGD step on one record, no augmentation.

    Record-level DP keeps the run's noise (``noise_multiplier``, as the run's sites trained with)
    while the record is always in the batch (sampling rate 1); site-level DP and every other
    defence are the run's own."""
    out = plan.with_task(local_steps=1, batch_size=1, optimizer="sgd", augment_shift=0)
    if noise_multiplier is not None and plan.dp.on:
        from dataclasses import replace

        out = replace(out, dp=replace(plan.dp, epsilon=None, noise_multiplier=float(noise_multiplier)))
    return out


def single_record_round(plan: Plan, X: torch.Tensor, y: torch.Tensor, params: np.ndarray, *,
                        secrets: dict[str, bytes] | None = None) -> ObservedRound:
    """One round of ``plan`` with ``len(X)`` sites, each holding one record, from global model ``params``.

    The sites and the coordinator are built by :mod:`insitu.builder` from the plan, so every
    defence (masking, encryption, clipping, noise, compression) is the one a run uses.  Site
    ``probe-i``'s secret is ``secrets[probe-i]`` if given (repeatable tests), OS randomness otherwise."""
    from insitu.builder import build_coordinator, build_site

    if X.shape[0] < 1:
        raise ConfigError("the probe needs at least one record")
    ledger = None
    if plan.dp.on:
        from insitu.privacy import Budget, PrivacyLedger

        ledger = PrivacyLedger(":memory:")
    sites = {}
    for i in range(X.shape[0]):
        sid = f"probe-{i + 1}"
        if ledger is not None:
            ledger.set_budget(sid, Budget(1e9, plan.dp.delta, plan.dp.accountant))
        sites[sid] = build_site(plan, sid, SiteData(sid, X[i : i + 1], y[i : i + 1], X[i : i + 1], y[i : i + 1]), ledger=ledger,
                                secret=(secrets or {}).get(sid))
    coord = build_coordinator(plan, "privacy-probe", InProcessTransport(sites), params=params)
    return observe_round(coord, 1)


@dataclass(frozen=True)
class ProbeResult:
    """Per target record: was it reconstructed, and how close the best view got next to a guess."""

    kind: str  # "analytic", "image-inversion" or "series-matching"
    success: tuple[bool, ...]
    quality: tuple[float, ...]  # tabular and series: RMS error to the record (z); images: SSIM
    guess_quality: tuple[float, ...]
    psnr: tuple[float, ...] = ()
    views: int = 0

    @property
    def success_rate(self) -> float:
        return float(np.mean(self.success)) if self.success else 0.0

    @property
    def better_than_guess(self) -> float:
        """Share of records the best view got closer to than the guess did."""
        if self.kind in ("analytic", "series-matching"):  # an error: lower is better
            return float(np.mean([q < g for q, g in zip(self.quality, self.guess_quality)]))
        return float(np.mean([q > g for q, g in zip(self.quality, self.guess_quality)]))


def _model_at(task: TaskSpec, params: np.ndarray) -> torch.nn.Module:
    m = task.build_model()
    set_flat(m, params)
    return m


def attack_tabular(obs: ObservedRound, task: TaskSpec, targets: np.ndarray, guess: np.ndarray, tol: float = 1e-3, clip: float = 10.0) -> ProbeResult:
    """Analytic recovery from every view; estimates are clipped to ±``clip`` (z-scores), as an
    attacker who knows the feature scale would."""
    model = _model_at(task, obs.params)
    ests = [np.clip(analytic_linear(v, model).estimate, -clip, clip) for v in obs.candidate_views().values()]
    succ, qual, gq = [], [], []
    for t in np.atleast_2d(targets):
        scores = [score_tabular(e, t[None], guess, tol) for e in ests]
        succ.append(any(s.exact for s in scores))
        qual.append(min(s.distance for s in scores))
        gq.append(scores[0].guess_distance)
    return ProbeResult("analytic", tuple(succ), tuple(qual), tuple(gq), views=len(ests))


def attack_images(
    obs: ObservedRound,
    task: TaskSpec,
    targets: np.ndarray,
    guess: np.ndarray,
    config: MatchConfig = MatchConfig(),
    *,
    only_float_views: bool = True,
    ssim_threshold: float = 0.7,
    seed: int = 0,
) -> ProbeResult:
    """Image reconstruction (feature inversion or gradient matching, whichever the attacker's own
    gradient check prefers; one image per view) from every view the coordinator holds.

    Views that arrived as integers (fixed-point encoded, masked) or ciphertext bytes cannot be a
    gradient and are skipped when ``only_float_views``; the aggregate is always attacked.
    """
    model = _model_at(task, obs.params)
    views = obs.candidate_views()
    if only_float_views:
        keep = {"aggregate"}
        for sid, msg in obs.train_replies.items():
            for name, arr in msg.tensors.items():
                if np.issubdtype(np.asarray(arr).dtype, np.floating):
                    keep.add(f"{sid}:{name}")
        views = {k: v for k, v in views.items() if k in keep}
    ests = [reconstruct_image(v, model, task.input_shape, config=config, seed=seed + i)[0] for i, v in enumerate(views.values())]
    succ, qual, gq, ps = [], [], [], []
    for t in targets:
        scores = [score_images(e, t[None], guess, config.bounds) for e in ests]
        best = max(scores, key=lambda s: s.ssim)
        succ.append(best.success(ssim_threshold))
        qual.append(best.ssim)
        gq.append(best.guess_ssim)
        ps.append(best.psnr)
    return ProbeResult("image-inversion", tuple(succ), tuple(qual), tuple(gq), tuple(ps), views=len(ests))


def attack_series(obs: ObservedRound, task: TaskSpec, targets: np.ndarray, guess: np.ndarray, config: MatchConfig = MatchConfig(),
                  *, seed: int = 0) -> ProbeResult:
    """Gradient matching on clinical series (``[T, 3V]`` records of recurrent models; the attacker
    knows the encoding: :func:`~insitu.attacks.reconstruction.series_matching`) from every
    floating-point view the coordinator holds (integer and ciphertext views cannot be a gradient;
    the aggregate is always attacked); scored by :func:`~insitu.attacks.reconstruction.score_series`."""
    from insitu.attacks.reconstruction import score_series, series_matching

    model = _model_at(task, obs.params)
    views = obs.candidate_views()
    keep = {"aggregate"}
    for sid, msg in obs.train_replies.items():
        for name, arr in msg.tensors.items():
            if np.issubdtype(np.asarray(arr).dtype, np.floating):
                keep.add(f"{sid}:{name}")
    width = 48.0 / task.input_shape[0]  # hours per bin: the 48-hour window of insitu.data.physionet
    ests = [series_matching(v, model, task.input_shape, hours_per_bin=width, config=config, seed=seed + i) for i, (k, v) in enumerate(views.items()) if k in keep]
    succ, qual, gq = [], [], []
    for t in targets:
        scores = [score_series(e[0], t, guess) for e in ests]
        best = min(scores, key=lambda sc: sc.rms)
        succ.append(any(sc.success() for sc in scores))
        qual.append(best.rms)
        gq.append(best.guess_rms)
    return ProbeResult("series-matching", tuple(succ), tuple(qual), tuple(gq), views=len(ests))
