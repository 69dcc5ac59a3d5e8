"""The privacy report: attack a finished run and say what each defence bought.

For a run directory written by ``insitu simulate`` the report plays three attackers:

* an **outsider with the final model** (what a model card publishes) runs membership inference:
  the loss-threshold attack and LiRA with shadow models trained by the run's own recipe.  Members
  are the sites' training records, non-members their test records.
* the **curious coordinator** runs the run's protocol and site pipeline on a probe round in which
  every site's update comes from a single record (the worst case for a site), keeps everything
  that reaches it, and tries to reconstruct the records: analytic recovery through a first linear
  layer (tabular models), gradient matching (CNN) or gradient matching on the series (GRU-D, LSTM:
  a record counts as recovered when its pattern of observations is exact and every observed value
  within 0.1 z).
* the same coordinator attacks what travels **around** the vectors
  (:mod:`insitu.attacks.side_channels`): the training losses sites report (the loss-equation attack
  on single-record sites, with parameters it chose), the answers to EVALUATE messages carrying
  crafted models (the evaluation oracle, once against the run's sites and once against sites that
  score anything, the behaviour before the evaluation contract), and, for record-level DP, the ε
  that holds when it knows each site's sampling (replayable runs) beside the declared ε.
* a **linkage attacker** joins the site's records, before and after the de-identification policy,
  to an auxiliary table with identities (heart only: X-ray images carry no quasi-identifiers here).

Each run's report ends with one verdict per thing that left the hospitals: what it was, the attack
that used it, how that attack fares without the defence and in this run, in one plain sentence.

:func:`compare` runs the same task with no defence, record-level DP at several ε, secure
aggregation and homomorphic aggregation, attacks each run, and fills one table.
"""
from __future__ import annotations

import base64
import dataclasses
import enum
import functools
import html
import io
import json
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from insitu.attacks.linkage import ReidentificationRisk, reidentification_before_after
from insitu.attacks.membership import MembershipAttack, MembershipResult, ShadowStats, lira, loss_threshold, train_shadows
from insitu.attacks.metrics import auc_interval
from insitu.attacks.probe import ProbeResult, attack_images, attack_series, attack_tabular, single_record_round
from insitu.attacks.reconstruction import MatchConfig
from insitu.attacks.side_channels import LossEquationResult, OracleResult, SamplingFigures
from insitu.errors import ConfigError, DataError
from insitu.federation.task import TaskSpec
from insitu.learn.models import ModelName, set_flat
from insitu.learn.train import TrainConfig, single_thread, train_local  # noqa: F401  (single_thread: the CLI's)


# ---------------------------------------------------------------------------------------------
# records of what was measured
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MembershipFigures:
    attack: str
    auc: float
    tpr_at_0_1pct: float
    tpr_at_1pct: float
    n_members: int
    n_nonmembers: int
    shadows: int = 0
    auc_low: float | None = None  # 95 % interval of the AUC: bootstrap (one run) or over seeds (mean of runs)
    auc_high: float | None = None
    per_seed: tuple[float, ...] = ()  # the AUC of each seed's run, when this is a mean over seeds

    @classmethod
    def of(cls, r: MembershipResult, is_member: np.ndarray) -> "MembershipFigures":
        lo, hi = auc_interval(r.scores, is_member)
        return cls(r.attack.value, r.roc.auc, r.roc.tpr_at_0_1pct, r.roc.tpr_at_1pct, r.roc.n_members, r.roc.n_nonmembers, r.num_shadows, lo, hi)


@dataclass(frozen=True)
class ReconstructionFigures:
    attack: str  # analytic / image-inversion (feature inversion or gradient matching)
    records: int
    success_rate: float  # exact match (tabular) or SSIM ≥ 0.7 and above the guess (images)
    quality: float  # mean RMS error in z-units (tabular) or mean SSIM (images)
    guess_quality: float  # the same for the guess
    psnr: float | None
    views: int  # vectors the coordinator held and attacked
    better_than_guess: float | None = None  # share of records the best view got closer to than the guess

    @classmethod
    def of(cls, r: ProbeResult) -> "ReconstructionFigures":
        return cls(r.kind, len(r.success), r.success_rate, float(np.mean(r.quality)), float(np.mean(r.guess_quality)),
                   float(np.mean(r.psnr)) if r.psnr else None, r.views, r.better_than_guess)


@dataclass(frozen=True)
class LossEquationFigures:
    """The loss-equation attack on single-record sites of the run's plan, and on the same sites
    without secure aggregation, HE or DP (``undefended_success_rate``: what the defences stop)."""

    records: int
    success_rate: float  # records recovered exactly (every feature within 1e-3 z and the label)
    label_rate: float  # labels right
    rms_error: float  # mean RMS error of the estimates, z-units
    guess_rms_error: float  # the same for the population-mean guess
    losses_received: int  # training losses that reached the coordinator
    rounds: int
    undefended_success_rate: float | None = None
    applicable: bool = True  # False: not a logistic regression (the attack was not run)
    losses_left: bool | None = None  # did any training loss reach the coordinator (measured)

    @classmethod
    def of(cls, r: LossEquationResult, undefended: LossEquationResult | None) -> "LossEquationFigures":
        return cls(r.records, r.success_rate, float(np.mean(r.label_correct)), float(np.mean(r.rms_error)), float(np.mean(r.guess_rms_error)),
                   r.losses_received, r.rounds, None if undefended is None else undefended.success_rate, True, r.losses_received > 0)


@dataclass(frozen=True)
class OracleFigures:
    """The evaluation oracle on every site's test split, against the run's sites (under the
    evaluation contract) and against sites that score any parameters (the pre-contract site)."""

    feature: str
    pairs: int  # (feature value, label) pairs over the sites' test splits
    recovered: int
    queries_sent: int
    queries_answered: int
    refused: bool  # some site refused a crafted model
    pre_contract_recovered: int
    pre_contract_queries: int
    applicable: bool = True

    @property
    def rate(self) -> float:
        return self.recovered / self.pairs if self.pairs else 0.0

    @property
    def pre_contract_rate(self) -> float:
        return self.pre_contract_recovered / self.pairs if self.pairs else 0.0

    @classmethod
    def of(cls, runs: Sequence[OracleResult], pre: Sequence[OracleResult]) -> "OracleFigures":
        return cls(runs[0].feature, sum(r.pairs for r in runs), sum(r.recovered for r in runs), sum(r.queries_sent for r in runs),
                   sum(r.queries_answered for r in runs), any(r.refusal for r in runs), sum(r.recovered for r in pre),
                   sum(r.queries_answered for r in pre))


@dataclass(frozen=True)
class PrivacyRow:
    """One line of the report: one run, attacked by every attacker."""

    run_dir: str
    dataset: str
    defence: str
    epsilon: float | None
    accuracy: float
    membership: tuple[MembershipFigures, ...]
    reconstruction: ReconstructionFigures
    reid_before: float | None
    reid_after: float | None
    accuracy_cost: float | None = None  # no-defence accuracy − this run's accuracy (compare only)
    seeds: int = 1  # >1: every figure is the mean over this many independently trained runs
    loss_equation: LossEquationFigures | None = None
    oracle: OracleFigures | None = None
    sampling: SamplingFigures | None = None  # record- or site-level DP runs only
    undefended_reconstruction: float | None = None  # the vector attack's success without protection or DP

    @property
    def strongest(self) -> MembershipFigures:
        """The membership attack with the highest AUC (the report's headline)."""
        return max(self.membership, key=lambda m: m.auc)


@dataclass(frozen=True)
class PrivacyReport:
    rows: tuple[PrivacyRow, ...]
    notes: tuple[str, ...] = ()
    html_path: str | None = None
    command: str = ""


# ---------------------------------------------------------------------------------------------
# reading a run
# ---------------------------------------------------------------------------------------------
def _load_run(run_dir: Path) -> tuple[dict[str, Any], Any, TaskSpec, np.ndarray]:
    from insitu.apps.simulate import SimulationConfig

    summary_path = run_dir / "summary.json"
    model_path = run_dir / "model.npz"
    if not summary_path.exists() or not model_path.exists():
        raise DataError(f"{str(run_dir)!r} is not a finished run: it needs summary.json and model.npz (write one with `insitu simulate --out DIR`)")
    summary = json.loads(summary_path.read_text())
    known = {f.name for f in dataclasses.fields(SimulationConfig)}
    cfg = SimulationConfig(**{k: v for k, v in summary["config"].items() if k in known}).resolved()
    task = TaskSpec.from_meta(summary["task"])
    with np.load(model_path) as z:
        params = z["params"].astype(np.float32)
    return summary, cfg, task, params


class Defence(str, enum.Enum):
    NONE = "none"
    RECORD_DP = "record-level DP"
    SITE_DP = "site-level DP"
    SECAGG = "secure aggregation"
    HE_PAILLIER = "homomorphic (Paillier)"
    HE_CKKS = "homomorphic (CKKS)"


def _dp_level(cfg: Any) -> str:
    return str(getattr(cfg, "dp", "off") or "off").lower()


def _dp_fields(cfg: Any) -> dict[str, Any]:
    """The DP options of a run config (they decide the shadow models' recipe)."""
    return {k: getattr(cfg, k) for k in ("dp", "epsilon", "delta", "noise_multiplier", "clip", "dp_placement") if hasattr(cfg, k)}


def describe_defence(cfg: Any, summary: dict[str, Any]) -> tuple[str, float | None]:
    """Human label of the run's defences and the ε it spent (None without DP)."""
    parts = []
    level = _dp_level(cfg)
    eps = _run_epsilon(cfg, summary)
    if level == "record":
        parts.append(Defence.RECORD_DP.value)
    elif level == "site":
        parts.append(f"{Defence.SITE_DP.value} ({getattr(cfg, 'dp_placement', 'central')})")
    if getattr(cfg, "secure_aggregation", False):
        parts.append(Defence.SECAGG.value)
    he = (getattr(cfg, "homomorphic", "none") or "none").lower()
    if he == "paillier":
        parts.append(Defence.HE_PAILLIER.value)
    elif he == "ckks":
        parts.append(Defence.HE_CKKS.value)
    label = " + ".join(parts) or Defence.NONE.value
    if level != "off" and summary.get("private_randomness") is False:
        label += " (replayable randomness: not private)"
    return label, eps


def _run_epsilon(cfg: Any, summary: dict[str, Any]) -> float | None:
    """ε the run spent (the largest over sites), as its ledger reported it."""
    if _dp_level(cfg) == "off":
        return None
    final = summary.get("final", {})
    if isinstance(final.get("epsilon"), (int, float)):
        return float(final["epsilon"])
    v = getattr(cfg, "epsilon", None)
    return float(v) if isinstance(v, (int, float)) else None


def _dp_privacy(summary: dict[str, Any]) -> dict[str, Any]:
    return dict(summary.get("final", {}).get("privacy") or {})


# ---------------------------------------------------------------------------------------------
# the three attackers
# ---------------------------------------------------------------------------------------------
def shadow_trainer(task: TaskSpec, steps: int, batch_size: int, dp: tuple[float, float] | None = None) -> Callable[[torch.Tensor, torch.Tensor, int], torch.nn.Module]:
    """The attacker's copy of the training recipe: the task's model, optimizer and learning rate,
    for the run's number of rounds × local steps on pooled data at the sites' combined batch size
    (FedAvg over m sites moves like one model on m× the batch).  ``dp`` = (noise multiplier,
    clip) when the run used record-level DP: the shadows then train with DP-SGD too."""
    base = task.train_config()

    def fit(X: torch.Tensor, y: torch.Tensor, seed: int) -> torch.nn.Module:
        model = task.build_model(seed)
        cfg = TrainConfig(lr=base.lr, steps=steps, batch_size=batch_size, optimizer=base.optimizer)
        gen = torch.Generator().manual_seed(seed)
        if dp is not None:
            from insitu.learn.dpsgd import DPSGDConfig, dp_sgd_train

            q = min(1.0, batch_size / max(1, X.shape[0]))
            # shadow models are the attacker's own: a replayable noise stream is fine here
            dp_sgd_train(model, X, y, cfg, DPSGDConfig(dp[0], dp[1], q), gen, num_outputs=task.num_outputs,
                         noise_generator=torch.Generator().manual_seed(seed + 1))
        else:
            train_local(model, X, y, cfg, gen, num_outputs=task.num_outputs)
        return model

    return fit


def label_matched(y_members: np.ndarray, y_nonmembers: np.ndarray, seed: int = 0) -> torch.Tensor:
    """Indices of members subsampled so that their label mix equals the non-members'.

    When training and test splits differ in label mix (PneumoniaMNIST: 74 % vs 62.5 % pneumonia)
    even a constant model's loss separates them: a "membership" signal that is only label shift.
    """
    ym, yn = np.asarray(y_members).astype(int), np.asarray(y_nonmembers).astype(int)
    classes = np.union1d(np.unique(ym), np.unique(yn))
    counts_n = np.array([(yn == c).sum() for c in classes])
    counts_m = np.array([(ym == c).sum() for c in classes])
    ok = counts_n > 0
    scale = np.min(counts_m[ok] / counts_n[ok]) if ok.any() else 0.0
    rng = np.random.default_rng(seed)
    keep = [rng.choice(np.flatnonzero(ym == c), int(np.floor(scale * n)), replace=False) for c, n in zip(classes, counts_n) if n > 0]
    return torch.from_numpy(np.sort(np.concatenate(keep)).astype(np.int64))


def membership_attacks(
    model: torch.nn.Module,
    data: Any,
    fit: Callable,
    *,
    shadows: int,
    seed: int = 0,
    stats: ShadowStats | None = None,
) -> tuple[tuple[MembershipFigures, ...], ShadowStats | None]:
    """Loss threshold, and LiRA (online and offline) when ``shadows`` ≥ 2."""
    Xm, ym = data.pooled_train()
    Xn, yn = data.pooled_test()
    keep = label_matched(ym.numpy(), yn.numpy(), seed)
    Xm, ym = Xm[keep], ym[keep]
    X, y = torch.cat([Xm, Xn]), torch.cat([ym, yn])
    is_member = np.r_[np.ones(Xm.shape[0], bool), np.zeros(Xn.shape[0], bool)]
    out = [MembershipFigures.of(loss_threshold(model, X, y, is_member), is_member)]
    if shadows >= 2 or stats is not None:
        if stats is None:
            stats = train_shadows(X, y, fit, shadows, seed)
        for v in (MembershipAttack.LIRA_ONLINE, MembershipAttack.LIRA_OFFLINE):
            out.append(MembershipFigures.of(lira(model, X, y, is_member, fit, variant=v, stats=stats), is_member))
    return tuple(out), stats


def undefended(plan: Any) -> Any:
    """``plan`` without secure aggregation, homomorphic encryption or differential privacy."""
    from insitu.plan import DPSpec, ProtectionSpec

    return dataclasses.replace(plan, protection=ProtectionSpec(), dp=DPSpec())


def _probe_plan_of(cfg: Any, summary: dict[str, Any]) -> Any:
    """The run's plan in its single-record worst case, with the run's record-level noise."""
    from insitu.attacks.probe import probe_plan
    from insitu.plan import Plan

    sigma = None
    if _dp_level(cfg) == "record":
        sigma = max(float(v) for v in (_dp_privacy(summary).get("noise_multiplier") or {}).values())
    return probe_plan(Plan.from_meta(summary["plan"]), sigma)


def _probe_records(data: Any, records: int, seed: int) -> np.ndarray:
    """The training records the coordinator's probes target (the same for every probe of a run)."""
    n = data.pooled_train()[0].shape[0]
    return np.random.default_rng(seed).choice(n, size=min(records, n), replace=False)


def reconstruction_attack(cfg: Any, summary: dict[str, Any], task: TaskSpec, params: np.ndarray, data: Any, *, records: int | None = None, iterations: int = 300, seed: int = 0,
                          without_defences: bool = False) -> ReconstructionFigures:
    """The curious coordinator on probe rounds of single-record updates, with the run's defences.

    Each probe round has as many sites as the run (so secure aggregation sums as many updates as
    it did in the run), and each probe site takes one SGD step on its one record with the run's
    learning rate, clip and noise; ``records`` (default: 32 tabular, 4 images) are spread over
    ⌈records / sites⌉ rounds, so that a figure is not one lucky draw.  ``without_defences``
    attacks the same probe rounds with secure aggregation, HE and DP taken away.
    """
    Xm, ym = data.pooled_train()
    cnn = ModelName(task.model) is ModelName.CNN
    series = _is_series(task)
    records = records or (4 if cnn or series else 32)
    per_round = max(1, len(data.sites))
    chosen = _probe_records(data, records, seed)
    # the worst case a site can be put in: one plain SGD step on one record, so the update is that
    # record's gradient (the classic DLG setting).  A run's Adam steps (≈ the gradient's sign) or
    # random shifts leak less per round; this figure does not credit them (an upper bound).
    plan = _probe_plan_of(cfg, summary)
    if without_defences:
        plan = undefended(plan)
    probe_task = plan.task
    Xn, _ = data.pooled_test()
    guess = Xn.mean(0).numpy()  # what an attacker knows without the update: the population mean
    parts: list[ProbeResult] = []
    for start in range(0, len(chosen), per_round):
        idx = torch.from_numpy(np.sort(chosen[start : start + per_round]))
        obs = single_record_round(plan, Xm[idx], ym[idx], params)
        if series:  # recurrent models start with no linear layer on the record: gradient matching on the series
            parts.append(attack_series(obs, probe_task, Xm[idx].numpy(), guess, MatchConfig(iterations=iterations), seed=seed + start))
        elif cnn:
            lo, hi = float(Xn.min()), float(Xn.max())
            parts.append(attack_images(obs, probe_task, Xm[idx].numpy(), guess[None], MatchConfig(iterations=iterations, bounds=(lo, hi)), seed=seed + start))
        else:
            parts.append(attack_tabular(obs, probe_task, Xm[idx].numpy(), guess))
    merged = ProbeResult(parts[0].kind, sum((p.success for p in parts), ()), sum((p.quality for p in parts), ()),
                         sum((p.guess_quality for p in parts), ()), sum((p.psnr for p in parts), ()), sum(p.views for p in parts))
    return ReconstructionFigures.of(merged)


def loss_equation_figures(cfg: Any, summary: dict[str, Any], params: np.ndarray, data: Any, *, records: int | None = None, seed: int = 0,
                          undefended_cache: dict[Any, LossEquationResult] | None = None) -> LossEquationFigures:
    """The loss-equation attack on the run's probe plan (single-record sites, parameters chosen by the
    coordinator, features + 1 rounds), ``len(data.sites)`` sites at a time, on the same records as
    the vector probe; and on the same plan without defences (cached per task in ``undefended_cache``)."""
    from insitu.attacks.probe import single_record_round
    from insitu.attacks.side_channels import LOSS_METRIC, loss_equation_attack

    plan = _probe_plan_of(cfg, summary)
    Xm, ym = data.pooled_train()
    if ModelName(plan.task.model) is not ModelName.LOGREG or plan.task.num_outputs != 1:
        # not a logistic regression: the equations do not apply; still measure whether losses leave
        obs = single_record_round(plan, Xm[:1], ym[:1], params)
        left = any(LOSS_METRIC in (m.meta.get("metrics") or {}) for m in obs.train_replies.values())
        return LossEquationFigures(0, 0.0, 0.0, float("nan"), float("nan"), int(left), 1, applicable=False, losses_left=left)
    Xn, yn = data.pooled_test()
    guess, guess_label = Xn.mean(0).numpy(), int(yn.float().mean().item() > 0.5)
    chosen = _probe_records(data, records or 32, seed)
    per = max(1, len(data.sites))

    def run(p: Any) -> LossEquationResult:
        parts = []
        for start in range(0, len(chosen), per):
            idx = torch.from_numpy(np.sort(chosen[start : start + per]))
            parts.append(loss_equation_attack(p, Xm[idx], ym[idx], guess=guess, guess_label=guess_label, seed=seed + start))
        return LossEquationResult(parts[0].rounds, sum(r.losses_received for r in parts), sum((r.success for r in parts), ()),
                                  sum((r.label_correct for r in parts), ()), sum((r.rms_error for r in parts), ()),
                                  sum((r.guess_rms_error for r in parts), ()))

    base = undefended(plan)
    key = (base.content_hash(), cfg.dataset, cfg.partition, cfg.seed, cfg.normalize, cfg.data, len(chosen), seed)
    bare = (undefended_cache or {}).get(key)
    if bare is None:
        bare = run(base)
        if undefended_cache is not None:
            undefended_cache[key] = bare
    return LossEquationFigures.of(bare if base == plan else run(plan), bare)


def oracle_figures(cfg: Any, summary: dict[str, Any], data: Any, *, feature: int | str = 0,
                   pre_contract_cache: dict[Any, tuple[OracleResult, ...]] | None = None) -> OracleFigures | None:
    """The evaluation oracle on every site's test split (``feature``: the task's first by default),
    against sites built from the run's plan and against sites that score anything; None when the
    task is not a logistic regression (threshold models need one)."""
    from insitu.attacks.side_channels import evaluation_oracle
    from insitu.plan import Plan

    plan = Plan.from_meta(summary["plan"])
    if ModelName(plan.task.model) is not ModelName.LOGREG or plan.task.num_outputs != 1:
        return None
    runs = tuple(evaluation_oracle(plan, sd, feature) for sd in data.sites)
    import hashlib

    digest = hashlib.sha256()
    for sd in data.sites:  # the answer depends only on the sites' test splits and the model family
        digest.update(sd.name.encode() + sd.X_test.numpy().tobytes() + sd.y_test.numpy().tobytes())
    key = (plan.task.model, tuple(plan.task.input_shape), str(feature), digest.hexdigest())
    pre = (pre_contract_cache or {}).get(key)
    if pre is None:
        pre = tuple(evaluation_oracle(plan, sd, feature, contract=False) for sd in data.sites)
        if pre_contract_cache is not None:
            pre_contract_cache[key] = pre
    return OracleFigures.of(runs, pre)


def sampling_of_run(run_dir: Path, cfg: Any, summary: dict[str, Any]) -> SamplingFigures | None:
    """Declared ε and the ε that holds when the coordinator knows each site's sampling, from the
    run's own ledger (its events, recomputed at sampling rate 1); None without DP."""
    from insitu.attacks.side_channels import sampling_figures
    from insitu.privacy import PrivacyLedger

    if _dp_level(cfg) == "off":
        return None
    priv = _dp_privacy(summary)
    path = Path(cfg.privacy_ledger) if getattr(cfg, "privacy_ledger", None) else run_dir / "privacy_ledger.sqlite"
    if not path.exists():
        raise DataError(f"the run's privacy ledger {str(path)!r} is missing; the known-sampling ε is computed from its events")
    ledger = PrivacyLedger(path)
    try:
        job = priv.get("ledger_run_id")
        events = {sid: [e for rec in ledger.records(sid, job) for e in rec.events] for sid in summary["sites"]}
    finally:
        ledger.close()
    # runs written before randomness became private recorded no flag: their sampling was replayable
    private = bool(summary.get("private_randomness", False))
    return sampling_figures(events, float(summary["final"].get("delta", cfg.delta)), priv.get("accountant", cfg.accountant), private)


#: quasi-identifiers of the heart records an outside table (a registry) could also hold.
HEART_QI = ("age", "sex", "hospital", "trestbps", "chol")
#: the policy a heart site applies: 5-anonymity over those quasi-identifiers.
HEART_DEID_POLICY = {
    "deid": {"k": 5, "l": 1, "max_suppression": 0.05, "patient_id": "id", "date_shift_days": 0},
    "identifiers": {"id": "pseudonymize"},
    "generalize": {
        "age": {"hierarchy": "age_band", "levels": [5, 10, 20, "*"]},
        "sex": {"hierarchy": "category"},
        "hospital": {"hierarchy": "category"},
        "trestbps": {"hierarchy": "numeric_band", "levels": [10, 20, 40, "*"]},
        "chol": {"hierarchy": "numeric_band", "levels": [25, 50, 100, "*"]},
    },
}


def heart_reidentification(policy: dict[str, Any] | None = None, csv: str | None = None) -> ReidentificationRisk:
    """Link the heart records to a registry holding the same quasi-identifiers with identities.

    The auxiliary table is every heart patient's id and quasi-identifiers (the strongest outside
    table: it covers everyone); the release is the records raw, then after the policy.
    """
    if policy is None:
        return _heart_reid_default(csv)
    return _heart_reid(policy, csv)


@functools.lru_cache(maxsize=4)
def _heart_reid_default(csv: str | None) -> ReidentificationRisk:
    return _heart_reid(HEART_DEID_POLICY, csv)


def _heart_reid(policy: dict[str, Any], csv: str | None) -> ReidentificationRisk:
    from insitu.data.heart import load_heart_frame
    from insitu.data.sources import RecordSchema, conform
    from insitu.deid import DeidPolicy

    cols = {"id": {"role": "direct_identifier", "type": "integer", "nullable": False},
            "age": {"role": "quasi_identifier", "type": "integer"},
            "sex": {"role": "quasi_identifier", "type": "integer"},
            "hospital": {"role": "quasi_identifier", "type": "string"},
            "trestbps": {"role": "quasi_identifier", "type": "float"},
            "chol": {"role": "quasi_identifier", "type": "float"},
            "label": {"role": "label", "type": "integer"}}
    schema = RecordSchema.from_dict({"columns": cols})
    pol = DeidPolicy.from_dict(policy, origin="heart privacy-report policy")
    frame = conform(load_heart_frame(csv)[list(cols)], schema)
    secret = np.random.default_rng(0).bytes(32)  # the evaluator's site secret, used only to score
    return reidentification_before_after(frame, frame[["id", *HEART_QI]], HEART_QI, identity="id", schema=schema, policy=pol, secret=secret)


# ---------------------------------------------------------------------------------------------
# one run, many runs
# ---------------------------------------------------------------------------------------------
def _is_series(task: TaskSpec) -> bool:
    """Records are time series (``[T, 3V]``) read by a recurrent model (GRU-D, LSTM: insitu.learn.sequence)."""
    return len(task.input_shape) == 2


def default_shadows(task: TaskSpec) -> int:
    """Shadow models are cheap for tabular models and dear for the CNN and recurrent models."""
    return 4 if ModelName(task.model) is ModelName.CNN or _is_series(task) else 16


def attack_run(
    run_dir: str | Path,
    *,
    shadows: int | None = None,
    probe_records: int | None = None,
    iterations: int = 300,
    seed: int = 0,
    reid: ReidentificationRisk | None = None,
    shadow_cache: dict[Any, ShadowStats] | None = None,
    side_cache: dict[Any, Any] | None = None,
) -> PrivacyRow:
    """Attack one finished run; ``shadow_cache`` lets :func:`compare` reuse shadow models between
    runs that share a training recipe (the protocol does not change what a model learns), and
    ``side_cache`` the undefended reference figures (the same for every run of one task)."""
    from insitu.apps.simulate import load_federated

    run_dir = Path(run_dir)
    summary, cfg, task, params = _load_run(run_dir)
    data = load_federated(cfg)
    model = task.build_model()
    set_flat(model, params)
    defence, eps = describe_defence(cfg, summary)
    n_shadows = default_shadows(task) if shadows is None else shadows
    steps = int(cfg.rounds) * int(cfg.local_steps)
    dp = None
    if _dp_level(cfg) == "record":
        priv = _dp_privacy(summary)
        dp = (float(np.mean(list(priv["noise_multiplier"].values()))), float(priv["clip"]))
    fit = shadow_trainer(task, steps, int(cfg.batch_size) * len(data.sites), dp)
    key = (task.content_hash(), steps, json.dumps(_dp_fields(cfg), sort_keys=True, default=str), n_shadows, cfg.seed, cfg.dataset, cfg.partition)
    cached = shadow_cache.get(key) if shadow_cache is not None else None
    mia, stats = membership_attacks(model, data, fit, shadows=n_shadows, seed=seed, stats=cached)
    if shadow_cache is not None and stats is not None:
        shadow_cache[key] = stats
    recon = reconstruction_attack(cfg, summary, task, params, data, records=probe_records, iterations=iterations, seed=seed)
    caches = side_cache if side_cache is not None else {}
    bare_recon = None  # the vector attack on the same probe with protection and DP taken away
    if defence == Defence.NONE.value:
        bare_recon = recon.success_rate
    elif ModelName(task.model) is not ModelName.CNN and not _is_series(task):  # analytic and cheap; gradient matching is not re-run
        bare_recon = reconstruction_attack(cfg, summary, task, params, data, records=probe_records, seed=seed, without_defences=True).success_rate
    loss = loss_equation_figures(cfg, summary, params, data, records=probe_records, seed=seed, undefended_cache=caches.setdefault("loss", {}))
    oracle = oracle_figures(cfg, summary, data, pre_contract_cache=caches.setdefault("oracle", {}))
    sampling = sampling_of_run(run_dir, cfg, summary)
    if reid is None and cfg.dataset == "heart":
        reid = heart_reidentification(csv=cfg.data)
    return PrivacyRow(
        run_dir=str(run_dir), dataset=cfg.dataset, defence=defence, epsilon=eps,
        accuracy=float(summary["final"]["mean_site_accuracy"]), membership=mia, reconstruction=recon,
        reid_before=reid.before.rate if reid else None, reid_after=reid.after.rate if reid else None,
        loss_equation=loss, oracle=oracle, sampling=sampling, undefended_reconstruction=bare_recon,
    )


def privacy_report(run_dir: str | Path, *, html_out: str | Path | None = None, shadows: int | None = None, probe_records: int | None = None, iterations: int = 300, seed: int = 0) -> PrivacyReport:
    """``insitu privacy report RUN_DIR``: attack one run; writes ``privacy.html`` beside it."""
    row = attack_run(run_dir, shadows=shadows, probe_records=probe_records, iterations=iterations, seed=seed)
    report = PrivacyReport((row,), _notes([row]), command=f"insitu privacy report {run_dir}")
    path = Path(html_out) if html_out else Path(run_dir) / "privacy.html"
    write_html(report, path)
    report = dataclasses.replace(report, html_path=str(path))
    path.with_suffix(".json").write_text(json.dumps(dataclasses.asdict(report), indent=2, default=float))
    return report


def load_report(path: str | Path) -> PrivacyReport:
    """A report written as JSON by :func:`privacy_report` or :func:`compare`."""
    d = json.loads(Path(path).read_text())
    rows = []
    for r in d["rows"]:
        r = dict(r)
        r["membership"] = tuple(MembershipFigures(**m) for m in r["membership"])
        r["reconstruction"] = ReconstructionFigures(**r["reconstruction"])
        for name, cls in (("loss_equation", LossEquationFigures), ("oracle", OracleFigures), ("sampling", SamplingFigures)):
            if r.get(name) is not None:
                r[name] = cls(**r[name])
        rows.append(PrivacyRow(**r))
    return PrivacyReport(tuple(rows), tuple(d.get("notes", ())), d.get("html_path"), d.get("command", ""))


def merge_reports(reports: Sequence[PrivacyReport], command: str = "") -> PrivacyReport:
    """One table from single-run reports (e.g. runs attacked in parallel); the first row is the
    reference for the accuracy cost."""
    rows = [r for rep in reports for r in rep.rows]
    if not rows:
        raise DataError("no report rows to merge")
    base = rows[0].accuracy
    rows = [dataclasses.replace(r, accuracy_cost=base - r.accuracy) for r in rows]
    return PrivacyReport(tuple(rows), _notes(rows), command=command)


@dataclass(frozen=True)
class CompareConfig:
    dataset: str = "heart"
    data: str | None = None
    epsilons: tuple[float, ...] = (8.0, 1.0)
    homomorphic: str = "auto"  # auto: paillier for small models, ckks for the CNN
    rounds: int | None = None
    seed: int = 0
    seeds: int = 1  # repeat every run with seeds seed … seed+seeds−1 and report means
    shadows: int | None = None
    probe_records: int | None = None
    iterations: int = 300
    out: str = "runs/privacy-compare"
    extra: dict[str, Any] = field(default_factory=dict)  # further SimulationConfig options
    #: ε of the secure aggregation + record-level DP row (None: no such row)
    combined_epsilon: float | None = 1.0
    #: add a record-level DP run at ``combined_epsilon`` with replayable randomness (not private), to show what secret sampling buys
    replayable: bool = True


def compare_configs(cc: CompareConfig, seed: int | None = None) -> list[tuple[str, dict[str, Any]]]:
    """(name, SimulationConfig options) for every defence the comparison runs (at ``seed``, default cc.seed)."""
    base = {"dataset": cc.dataset, "data": cc.data, "rounds": cc.rounds, "seed": cc.seed if seed is None else seed, "baselines": False, **cc.extra}
    model = cc.extra.get("model") or ("logreg" if cc.dataset == "heart" else "cnn")
    he = cc.homomorphic if cc.homomorphic != "auto" else ("ckks" if model == "cnn" else "paillier")
    runs: list[tuple[str, dict[str, Any]]] = [("none", dict(base))]
    for eps in cc.epsilons:
        runs.append((f"dp-eps{eps:g}", {**base, "dp": "record", "epsilon": float(eps)}))
    runs.append(("secagg", {**base, "secure_aggregation": True}))
    runs.append((f"he-{he}", {**base, "homomorphic": he}))
    if cc.combined_epsilon is not None:
        eps = float(cc.combined_epsilon)
        runs.append((f"secagg-dp-eps{eps:g}", {**base, "secure_aggregation": True, "dp": "record", "epsilon": eps}))
        if cc.replayable:
            runs.append((f"dp-eps{eps:g}-replayable", {**base, "dp": "record", "epsilon": eps, "insecure_replayable_randomness": True}))
    return runs


def compare(cc: CompareConfig, *, progress: Callable[[str], None] | None = None) -> PrivacyReport:
    """``insitu privacy compare``: run the task under each defence, attack every run, one table."""
    from insitu.apps.simulate import SimulationConfig, simulate

    out = Path(cc.out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"output directory {str(out)!r} exists and is not empty; choose another --out")
    if cc.seeds < 1:
        raise ConfigError(f"--seeds must be at least 1, got {cc.seeds}")
    out.mkdir(parents=True, exist_ok=True)
    cache: dict[Any, ShadowStats] = {}
    side: dict[Any, Any] = {}
    reid = heart_reidentification(csv=cc.data) if cc.dataset == "heart" else None
    notes: list[str] = []
    runs: list[list[PrivacyRow]] = []  # runs[seed][defence]
    for k in range(cc.seeds):
        seed = cc.seed + k
        where = out if cc.seeds == 1 else out / f"seed{seed}"
        per_seed = []
        for name, opts in compare_configs(cc, seed):
            tag = name if cc.seeds == 1 else f"{name} (seed {seed}, {k + 1}/{cc.seeds})"
            if progress:
                progress(f"training: {tag}")
            simulate(SimulationConfig(**opts, out=str(where / name)))
            if progress:
                progress(f"attacking: {tag}")
            per_seed.append(attack_run(where / name, shadows=cc.shadows, probe_records=cc.probe_records, iterations=cc.iterations, seed=seed, reid=reid,
                                       shadow_cache=cache, side_cache=side))
        runs.append(per_seed)
    rows = runs[0] if cc.seeds == 1 else [mean_row(list(same)) for same in zip(*runs)]
    if cc.seeds > 1:
        notes.append(f"Every figure is the mean over {cc.seeds} runs trained and attacked with seeds {cc.seed}–{cc.seed + cc.seeds - 1}; "
                     "the AUC interval is the 95% t-interval of that mean, and the strongest attack is the one with the highest mean AUC.")
    base_acc = rows[0].accuracy
    rows = [dataclasses.replace(r, accuracy_cost=base_acc - r.accuracy) for r in rows]
    report = PrivacyReport(tuple(rows), tuple(notes) + _notes(rows), command=_compare_command(cc))
    path = out / "privacy.html"
    write_html(report, path)
    (out / "privacy.json").write_text(json.dumps(dataclasses.asdict(report), indent=2, default=float))
    (out / "privacy.md").write_text(f"`{report.command}`\n\n{markdown_table(report)}\n\n" + "\n".join(f"- {n}" for n in report.notes)
                                    + f"\n\n## What left the hospitals, attacked\n\n{verdict_markdown(report)}\n")
    return dataclasses.replace(report, html_path=str(path))


def _mean_interval(values: Sequence[float]) -> tuple[float, float, float]:
    """Mean and 95 % t-interval of a few per-seed figures."""
    from scipy import stats

    v = np.asarray(values, dtype=float)
    mean = float(v.mean())
    if v.size < 2:
        return mean, mean, mean
    half = float(stats.t.ppf(0.975, v.size - 1) * v.std(ddof=1) / np.sqrt(v.size))
    return mean, mean - half, mean + half


def mean_row(rows: Sequence[PrivacyRow]) -> PrivacyRow:
    """One row from the same defence run with several seeds: every figure is the mean over runs.

    Averaging the AUC of independently trained models estimates the attack's expected success on
    this recipe; one run's AUC on a few hundred records moves by ±0.04 from training noise alone,
    and taking the strongest of three attacks on one run biases it upwards."""
    first = rows[0]
    if any(r.defence != first.defence or r.dataset != first.dataset for r in rows):
        raise DataError(f"cannot average rows of different defences: {sorted({r.defence for r in rows})}")
    mia = []
    for i, m in enumerate(first.membership):
        same = [r.membership[i] for r in rows]
        if any(x.attack != m.attack for x in same):
            raise DataError(f"attack lists differ between seeds at position {i}")
        mean, lo, hi = _mean_interval([x.auc for x in same])
        mia.append(dataclasses.replace(
            m, auc=mean, auc_low=lo, auc_high=hi, per_seed=tuple(x.auc for x in same),
            tpr_at_0_1pct=float(np.mean([x.tpr_at_0_1pct for x in same])), tpr_at_1pct=float(np.mean([x.tpr_at_1pct for x in same]))))
    rc = [r.reconstruction for r in rows]

    def avg(vals: Sequence[float | None]) -> float | None:
        got = [v for v in vals if v is not None]
        return float(np.mean(got)) if got else None

    recon = dataclasses.replace(
        rc[0], records=sum(r.records for r in rc), success_rate=float(np.mean([r.success_rate for r in rc])),
        quality=float(np.mean([r.quality for r in rc])), guess_quality=float(np.mean([r.guess_quality for r in rc])),
        psnr=avg([r.psnr for r in rc]), views=sum(r.views for r in rc), better_than_guess=avg([r.better_than_guess for r in rc]))
    loss = [r.loss_equation for r in rows if r.loss_equation is not None]
    le = None
    if loss:
        le = dataclasses.replace(
            loss[0], records=sum(x.records for x in loss), success_rate=float(np.mean([x.success_rate for x in loss])),
            label_rate=float(np.mean([x.label_rate for x in loss])), rms_error=float(np.mean([x.rms_error for x in loss])),
            guess_rms_error=float(np.mean([x.guess_rms_error for x in loss])), losses_received=sum(x.losses_received for x in loss),
            undefended_success_rate=avg([x.undefended_success_rate for x in loss]), losses_left=any(bool(x.losses_left) for x in loss))
    orc = [r.oracle for r in rows if r.oracle is not None]
    oracle = None
    if orc:
        oracle = dataclasses.replace(
            orc[0], pairs=sum(x.pairs for x in orc), recovered=sum(x.recovered for x in orc), queries_sent=sum(x.queries_sent for x in orc),
            queries_answered=sum(x.queries_answered for x in orc), refused=any(x.refused for x in orc),
            pre_contract_recovered=sum(x.pre_contract_recovered for x in orc), pre_contract_queries=sum(x.pre_contract_queries for x in orc))
    smp = [r.sampling for r in rows if r.sampling is not None]
    sampling = None
    if smp:
        sampling = SamplingFigures(float(np.mean([x.declared_epsilon for x in smp])), float(np.mean([x.known_sampling_epsilon for x in smp])),
                                   all(x.private_randomness for x in smp), max((x.sampling_rate or 0.0) for x in smp))
    return dataclasses.replace(
        # the runs live in OUT/seed<k>/<defence>: name them all
        first, run_dir=str(Path(first.run_dir).parent.parent / "seed*" / Path(first.run_dir).name) if len(rows) > 1 else first.run_dir,
        epsilon=avg([r.epsilon for r in rows]), accuracy=float(np.mean([r.accuracy for r in rows])), membership=tuple(mia),
        reconstruction=recon, seeds=len(rows), loss_equation=le, oracle=oracle, sampling=sampling,
        undefended_reconstruction=avg([r.undefended_reconstruction for r in rows]))


def _compare_command(cc: CompareConfig) -> str:
    parts = ["insitu privacy compare", f"--dataset {cc.dataset}"]
    if cc.data:
        parts.append(f"--data {cc.data}")
    if cc.rounds:
        parts.append(f"--rounds {cc.rounds}")
    if cc.extra.get("model"):
        parts.append(f"--model {cc.extra['model']}")
    if cc.extra.get("partition"):
        parts.append(f"--partition {cc.extra['partition']}")
    parts.append("--epsilons " + ",".join(f"{e:g}" for e in cc.epsilons))
    if cc.combined_epsilon is None:
        parts.append("--no-combined")
    elif cc.combined_epsilon != 1.0:
        parts.append(f"--combined-epsilon {cc.combined_epsilon:g}")
    if cc.combined_epsilon is not None and not cc.replayable:
        parts.append("--no-replayable")
    if cc.seeds > 1:
        parts.append(f"--seed {cc.seed} --seeds {cc.seeds}")
    parts.append(f"--out {cc.out}")
    return " ".join(parts)


def _notes(rows: Sequence[PrivacyRow]) -> tuple[str, ...]:
    notes = [
        "MIA: members = the sites' training records (subsampled to the non-members' label mix), non-members = "
        "their test records; the strongest of "
        "loss-threshold / LiRA online / LiRA offline is shown (all three in the details), with its 95% bootstrap "
        "interval in the HTML/markdown table: with a few hundred records, AUCs within about ±0.05 of 0.5 are chance.",
        "Reconstruction: the coordinator's best over every vector it received in a probe round where each of "
        "the sites' updates comes from one record (the worst case for a site), run through the run's own protocol.",
        "Loss-equation attack: one site per target record (the run's sites' records, as many per federation as the run has sites), "
        "one SGD step on that record per round for features + 1 rounds, the coordinator choosing the parameters it sends; each training "
        "loss a site reports is one equation in its record. Exact = every feature within 1e-3 z and the label right.",
        "Evaluation oracle: the coordinator sends each site logistic regressions thresholding the task's first feature and reads the "
        "loss and correct count of each answer; the pre-contract figure is the same attack on sites that score any parameters.",
        "Known-sampling ε: the run's ledger events recomputed with sampling rate 1 (a record in every batch), the ε that holds when "
        "the coordinator can know each site's batches; a record drawn into fewer batches loses less.",
    ]
    n_non = min((m.n_nonmembers for r in rows for m in r.membership), default=0)
    if n_non and n_non < 1000:
        notes.append(f"TPR at 0.1% FPR: with {n_non} non-members the smallest non-zero FPR is {100 / n_non:.2f}%, "
                     "so that column is the TPR at zero false positives.")
    return tuple(notes)


# ---------------------------------------------------------------------------------------------
# presentation
# ---------------------------------------------------------------------------------------------
def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def _recon_cell(r: ReconstructionFigures, long: bool = False) -> str:
    if r.attack == "analytic":
        return f"{_pct(r.success_rate)} exact" + (f" (RMS err {r.quality:.3g} vs guess {r.guess_quality:.3g}, n={r.records})" if long else "")
    if r.attack == "series-matching":
        return f"{_pct(r.success_rate)} recovered" + (f" (RMS err {r.quality:.3g} z vs guess {r.guess_quality:.3g}, n={r.records})" if long else "")
    return f"{_pct(r.success_rate)}, SSIM {r.quality:.2f}" + (f" vs guess {r.guess_quality:.2f}, n={r.records}" if long else "")


def _loss_cell(le: LossEquationFigures | None, long: bool = False) -> str:
    if le is None:
        return "n/a"
    if not le.applicable:
        return "losses left (not a logreg: not run)" if le.losses_left else "no loss left"
    cell = f"{_pct(le.success_rate)} exact"
    if not le.losses_left:
        cell += " (no loss left)"
    if long:
        cell += f" (RMS err {le.rms_error:.3g} vs guess {le.guess_rms_error:.3g}, n={le.records}, {le.losses_received} losses received)"
    return cell


def _oracle_cell(o: OracleFigures | None, long: bool = False) -> str:
    if o is None:
        return "n/a"
    cell = f"{o.recovered}/{o.pairs} pairs"
    if long:
        cell += (f" ({o.queries_answered} of {o.queries_sent} queries answered; site that scores anything: "
                 f"{o.pre_contract_recovered}/{o.pairs} in {o.pre_contract_queries} queries)")
    return cell


def _sampling_cell(sf: SamplingFigures | None, long: bool = False) -> str:
    if sf is None:
        return "no DP"
    if sf.private_randomness:
        return "amplification holds" + (f" (ε {sf.declared_epsilon:.2f}; {sf.known_sampling_epsilon:.2f} if the batches were known)" if long else "")
    return f"ε {sf.known_sampling_epsilon:.2f}" + (f" (declared {sf.declared_epsilon:.2f}; sampling replayable)" if long else "")


def table_rows(report: PrivacyReport, long: bool = False) -> list[list[str]]:
    out = []
    for r in report.rows:
        m = r.strongest
        reid = "n/a" if r.reid_before is None else f"{_pct(r.reid_before)} → {_pct(r.reid_after)}"
        out.append([
            r.defence,
            "∞" if r.epsilon is None else f"{r.epsilon:.2f}",
            f"{m.auc:.3f}" + (f" [{m.auc_low:.2f}, {m.auc_high:.2f}] ({m.attack}{f', mean of {r.seeds} seeds' if r.seeds > 1 else ''})" if long and m.auc_low is not None else ""),
            _pct(m.tpr_at_0_1pct),
            _pct(m.tpr_at_1pct),
            _recon_cell(r.reconstruction, long),
            _loss_cell(r.loss_equation, long),
            _oracle_cell(r.oracle, long),
            _sampling_cell(r.sampling, long),
            reid,
            f"{r.accuracy:.3f}" + ("" if r.accuracy_cost is None else f" ({0.0 - r.accuracy_cost:+.3f})"),
        ])
    return out


HEADERS = ["defence", "ε", "MIA AUC", "TPR@0.1%FPR", "TPR@1%FPR", "reconstruction from a site's update", "loss-equation attack",
           "evaluation oracle", "known-sampling ε", "re-identification (raw → de-identified)", "accuracy (cost)"]
SHORT_HEADERS = ["defence", "ε", "MIA AUC", "TPR@.1%", "TPR@1%", "recon.", "loss eq.", "oracle", "sampling", "re-id", "accuracy"]


# ---------------------------------------------------------------------------------------------
# verdicts: one plain sentence per thing that left the hospitals
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Verdict:
    """One channel out of the hospitals, the attack on it, and the defence that decides it."""

    channel: str  # what left the hospitals
    attack: str
    defence: str  # the defence that makes the attack fail
    without: str  # the attack's result without that defence ("" when not measured)
    this_run: str  # the attack's result on this run
    sentence: str  # for a data-protection officer


def _how_updates_left(defence: str) -> str:
    if Defence.SECAGG.value in defence:
        how = "masked by secure aggregation"
    elif "homomorphic" in defence:
        how = "encrypted (homomorphic aggregation)"
    else:
        how = ""
    if "DP" in defence:
        how = f"{how} and noised by differential privacy" if how else "noised by differential privacy"
    return how


def verdicts(row: PrivacyRow, reference: PrivacyRow | None = None) -> tuple[Verdict, ...]:
    """The verdicts of one row; ``reference`` (the no-defence row of a comparison) supplies the
    membership figure without DP."""
    out = []
    rc = row.reconstruction
    how = _how_updates_left(row.defence)
    n = rc.records
    got = rc.success_rate
    without = "" if row.undefended_reconstruction is None else f"{_pct(row.undefended_reconstruction)} reconstructed"
    if not how:
        sentence = f"Model updates: sent in the clear; from single-record updates the coordinator reconstructed {_pct(got)} of {n} records."
    elif got == 0:
        sentence = (f"Model updates: {how}; from single-record updates the coordinator reconstructed no record"
                    + (f" (without these defences: {_pct(row.undefended_reconstruction)} of {n})." if row.undefended_reconstruction else "."))
    else:
        sentence = f"Model updates: {how}, yet the coordinator reconstructed {_pct(got)} of {n} records from sums of single-record updates."
    out.append(Verdict("model updates", f"reconstruction ({rc.attack})", "secure aggregation, homomorphic aggregation or DP", without,
                       _recon_cell(rc), sentence))

    le = row.loss_equation
    if le is not None:
        without = "" if le.undefended_success_rate is None else f"{_pct(le.undefended_success_rate)} exact"
        if not le.losses_left:
            sentence = ("Training losses: none left the hospitals; the loss-equation attack had nothing to work with"
                        + (f" (no record recovered, against {_pct(le.undefended_success_rate)} when losses are public)." if le.applicable and le.undefended_success_rate else "."))
        elif not le.applicable:
            sentence = "Training losses: exact losses left the hospitals, as this plan allows; the loss-equation attack models logistic regression and was not run."
        else:
            sentence = (f"Training losses: each hospital's exact loss left beside its update, as this plan allows without secure aggregation or DP; "
                        f"by choosing the model it sent, the coordinator solved them for {_pct(le.success_rate)} of {le.records} records exactly.")
        out.append(Verdict("training losses", "loss equations (chosen parameters, single-record sites)",
                           "no exact loss leaves beside a protected or noised update", without, _loss_cell(le), sentence))

    o = row.oracle
    if o is None:
        out.append(Verdict("evaluation answers", "evaluation oracle", "sites score only models they were sent for training, plus two others", "",
                           "not run", "Evaluation answers: hospitals score only models they were sent for training, plus two others; the "
                           "threshold-model oracle needs a logistic regression and was not run on this model."))
    else:
        if o.recovered == 0 and o.refused:
            sentence = (f"Evaluation answers: hospitals refused to score the coordinator's crafted models after two answers, so the evaluation oracle "
                        f"recovered none of {o.pairs} ({o.feature}, outcome) pairs; a hospital that scored anything gave away {o.pre_contract_recovered} of {o.pairs}.")
        else:
            sentence = f"Evaluation answers: the coordinator's crafted models recovered {o.recovered} of {o.pairs} ({o.feature}, outcome) pairs of the hospitals' test records."
        out.append(Verdict("evaluation answers", f"evaluation oracle (threshold models on {o.feature})",
                           "sites score only models they were sent for training, plus two others",
                           f"{o.pre_contract_recovered}/{o.pairs} pairs", _oracle_cell(o), sentence))

    sf = row.sampling
    if sf is None:
        sentence = "Batch sampling: no differential privacy in this run, so there is no ε to lose."
        out.append(Verdict("batch sampling", "known-sampling ε", "sampling from each site's own secret", "", "no DP", sentence))
    else:
        if abs(sf.known_sampling_epsilon - sf.declared_epsilon) < 1e-9:
            sentence = f"Batch sampling: ε = {sf.declared_epsilon:.2f} does not rely on sampling, so it holds even against whoever knows the batches."
        elif sf.private_randomness:
            sentence = (f"Batch sampling: each hospital drew its batches from its own secret, so amplification by sampling holds against the "
                        f"coordinator and the declared ε = {sf.declared_epsilon:.2f} stands ({sf.known_sampling_epsilon:.2f} if it knew the batches).")
        else:
            sentence = (f"Batch sampling: this run's batches can be replayed from its recorded seed, so amplification by sampling does not hold "
                        f"against the coordinator: a record's ε is up to {sf.known_sampling_epsilon:.2f}, not the declared {sf.declared_epsilon:.2f}.")
        out.append(Verdict("batch sampling", "known-sampling ε (accountant at sampling rate 1)", "sampling from each site's own secret",
                           f"ε {sf.known_sampling_epsilon:.2f}", f"ε {sf.effective_epsilon:.2f}", sentence))

    m = row.strongest
    ref = reference.strongest.auc if reference is not None and reference is not row and reference.defence == Defence.NONE.value else None
    sentence = f"Final model: the strongest membership-inference attack reaches AUC {m.auc:.3f} (0.5 is chance)"
    if ref is not None and "DP" in row.defence:
        sentence += f", against {ref:.3f} without DP"
    out.append(Verdict("final model", f"membership inference ({m.attack})", "record-level DP", "" if ref is None else f"AUC {ref:.3f}",
                       f"AUC {m.auc:.3f}", sentence + "."))

    if row.reid_before is not None:
        out.append(Verdict("released records", "linkage to a registry", "de-identification policy (5-anonymity)", _pct(row.reid_before), _pct(row.reid_after),
                           f"Released records: linkage to a registry re-identifies {_pct(row.reid_before)} of patients in the raw records "
                           f"and {_pct(row.reid_after)} after de-identification."))
    return tuple(out)


def _reference(report: PrivacyReport) -> PrivacyRow | None:
    return next((r for r in report.rows if r.defence == Defence.NONE.value), None)


def verdict_markdown(report: PrivacyReport) -> str:
    """Per run: the verdict table (what left, the attack, without the defence, this run) and the sentences."""
    ref = _reference(report)
    parts = []
    for r in report.rows:
        parts.append(f"### {r.defence}" + ("" if r.epsilon is None else f" (ε = {r.epsilon:.3g})"))
        parts.append("| what left the hospitals | attack | defence | without it | this run |\n| --- | --- | --- | --- | --- |")
        vs = verdicts(r, ref)
        parts[-1] += "\n" + "\n".join(f"| {v.channel} | {v.attack} | {v.defence} | {v.without or 'n/a'} | {v.this_run} |" for v in vs)
        parts.append("\n".join(f"- {v.sentence}" for v in vs))
    return "\n\n".join(parts)


def rich_table(report: PrivacyReport):
    from rich.table import Table

    title = f"privacy · {report.rows[0].dataset}" if report.rows else "privacy"
    t = Table(title=title, title_justify="left")
    for h in SHORT_HEADERS:
        t.add_column(h, justify="left" if h in ("defence", "recon.") else "right")
    for row in table_rows(report):
        t.add_row(*row)
    return t


def markdown_table(report: PrivacyReport) -> str:
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + " --- |" * len(HEADERS)]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(report, long=True)]
    return "\n".join(lines)


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _plots(report: PrivacyReport) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report.rows
    names = [textwrap.fill(r.defence, 16) + ("" if r.epsilon is None else f"\nε={r.epsilon:.2g}") for r in rows]
    figs = []
    fig, ax = plt.subplots(figsize=(max(5, 1.4 * len(rows)), 3.2))
    attacks = sorted({m.attack for r in rows for m in r.membership})
    w = 0.8 / max(1, len(attacks))
    for i, a in enumerate(attacks):
        vals = [next((m.auc for m in r.membership if m.attack == a), np.nan) for r in rows]
        ax.bar(np.arange(len(rows)) + i * w - 0.4 + w / 2, vals, w, label=a)
    ax.axhline(0.5, color="k", lw=0.8, ls="--")
    ax.axhline(0.55, color="r", lw=0.8, ls=":", label="0.55")
    ax.set_xticks(range(len(rows)), names, fontsize=8)
    ax.set_ylim(0.4, max(0.8, max((m.auc for r in rows for m in r.membership), default=0.5) + 0.05))
    ax.set_ylabel("membership-inference AUC")
    ax.legend(fontsize=7)
    figs.append(("Membership inference AUC per defence (dashed: chance)", _png(fig)))

    fig, ax = plt.subplots(figsize=(max(5, 1.4 * len(rows)), 3.2))
    ax.bar(range(len(rows)), [r.reconstruction.success_rate for r in rows], color="tab:red")
    ax.set_xticks(range(len(rows)), names, fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("records reconstructed")
    figs.append(("Share of single-record updates the coordinator reconstructed", _png(fig)))

    if any(r.loss_equation is not None and r.loss_equation.applicable for r in rows):
        fig, (ax, ax2) = plt.subplots(2, 1, figsize=(max(5, 1.4 * len(rows)), 6.4), constrained_layout=True)
        x = np.arange(len(rows))
        le = [r.loss_equation for r in rows]
        ax.bar(x - 0.2, [np.nan if v is None or v.undefended_success_rate is None else v.undefended_success_rate for v in le], 0.4,
               color="tab:grey", label="without secure aggregation / DP")
        ax.bar(x + 0.2, [np.nan if v is None else v.success_rate for v in le], 0.4, color="tab:red", label="this run")
        ax.set_xticks(x, names, fontsize=8)
        ax.set_ylim(0, 1.3)
        ax.set_ylabel("records recovered exactly")
        ax.legend(fontsize=7)
        ax2.bar(x - 0.2, [np.nan if v is None else v.rms_error for v in le], 0.4, color="tab:red", label="attack's estimate")
        ax2.bar(x + 0.2, [np.nan if v is None else v.guess_rms_error for v in le], 0.4, color="tab:grey", label="population-mean guess")
        ax2.set_xticks(x, names, fontsize=8)
        ax2.set_ylabel("RMS error (z)")
        ax2.legend(fontsize=7)
        figs.append(("Loss-equation attack on single-record sites: records recovered, and error next to guessing the mean", _png(fig)))
    if any(r.oracle is not None for r in rows):
        fig, ax = plt.subplots(figsize=(max(5, 1.4 * len(rows)), 3.2))
        x = np.arange(len(rows))
        ax.bar(x - 0.2, [np.nan if r.oracle is None else r.oracle.pre_contract_rate for r in rows], 0.4, color="tab:grey",
               label="site that scores anything (before the contract)")
        ax.bar(x + 0.2, [np.nan if r.oracle is None else r.oracle.rate for r in rows], 0.4, color="tab:red", label="this run's sites")
        ax.set_xticks(x, names, fontsize=8)
        ax.set_ylim(0, 1.3)
        ax.set_ylabel("test (value, label) pairs recovered")
        ax.legend(fontsize=7)
        figs.append(("Evaluation oracle: share of the sites' test (feature value, label) pairs recovered", _png(fig)))

    fig, ax = plt.subplots(figsize=(max(5, 1.4 * len(rows)), 3.2))
    ax.bar(range(len(rows)), [r.accuracy for r in rows], color="tab:green")
    ax.set_xticks(range(len(rows)), names, fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("mean site test accuracy")
    figs.append(("Accuracy of the final model", _png(fig)))
    return figs


def write_html(report: PrivacyReport, path: str | Path) -> Path:
    """A self-contained HTML page: the table, the notes, plots and every attack's figures."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    esc = html.escape
    head = "".join(f"<th>{esc(h)}</th>" for h in HEADERS)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in table_rows(report, long=True))
    detail = []
    for r in report.rows:
        mia = "".join(
            f"<tr><td>{esc(m.attack)}</td><td>{m.auc:.4f} [{m.auc_low:.3f}, {m.auc_high:.3f}]"
            + (f"<br/>per seed: {', '.join(f'{a:.3f}' for a in m.per_seed)}" if m.per_seed else "") + "</td>"
            f"<td>{_pct(m.tpr_at_0_1pct)}</td><td>{_pct(m.tpr_at_1pct)}</td>"
            f"<td>{m.n_members}/{m.n_nonmembers}</td><td>{m.shadows}</td></tr>" for m in r.membership)
        rc = r.reconstruction
        detail.append(
            f"<h3>{esc(r.defence)}{'' if r.epsilon is None else f' (ε = {r.epsilon:.3g})'} — <code>{esc(r.run_dir)}</code></h3>"
            f"<table><tr><th>attack</th><th>AUC</th><th>TPR@0.1%</th><th>TPR@1%</th><th>members/non-members</th><th>shadow models</th></tr>{mia}</table>"
            f"<p>reconstruction ({esc(rc.attack)}, {rc.records} single-record updates, {rc.views} vectors attacked): "
            f"success {_pct(rc.success_rate)}, quality {rc.quality:.3f} vs guess {rc.guess_quality:.3f}"
            + ("" if rc.psnr is None else f", PSNR {rc.psnr:.1f} dB") + "</p>")
    ref = _reference(report)
    verdict_html = []
    for r in report.rows:
        vs = verdicts(r, ref)
        cells = "".join(f"<tr><td>{esc(v.channel)}</td><td>{esc(v.attack)}</td><td>{esc(v.defence)}</td><td>{esc(v.without or 'n/a')}</td>"
                        f"<td>{esc(v.this_run)}</td><td>{esc(v.sentence)}</td></tr>" for v in vs)
        verdict_html.append(f"<h3>{esc(r.defence)}{'' if r.epsilon is None else f' (ε = {r.epsilon:.3g})'}</h3><table><tr><th>what left the hospitals</th>"
                            f"<th>attack</th><th>defence</th><th>without it</th><th>this run</th><th>verdict</th></tr>{cells}</table>")
    plots = "".join(f"<figure><img src='data:image/png;base64,{b}'/><figcaption>{esc(c)}</figcaption></figure>" for c, b in _plots(report))
    notes = "".join(f"<li>{esc(n)}</li>" for n in report.notes)
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>insitu privacy report</title>"
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;font-size:13px}figure{display:inline-block;margin:1em}</style></head><body>"
        f"<h1>Privacy report</h1><p><code>{esc(report.command)}</code></p>"
        f"<table><tr>{head}</tr>{body}</table><ul>{notes}</ul><h2>What left the hospitals, attacked</h2>{''.join(verdict_html)}"
        f"{plots}<h2>Details</h2>{''.join(detail)}</body></html>"
    )
    path.write_text(page)
    return path
