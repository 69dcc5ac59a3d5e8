"""Membership inference against a final model: was this patient's record in the training data?

Two attackers, both holding the published model and a pool of candidate records (some of them
members, the rest not):

* **loss threshold** (Yeom et al. 2018): members tend to have lower loss.  No extra compute; the
  floor every defence must beat.
* **LiRA**, the likelihood-ratio attack of Carlini et al. 2022.  The attacker trains shadow models
  the way the target was trained, each on a random half of the pool, so that every candidate is
  IN half of them and OUT of the other half.  For each candidate it fits Gaussians to the shadow
  models' logit-scaled confidence φ = log p/(1−p) on that very record, and asks which Gaussian
  the target model's φ came from.  The *online* variant compares IN vs OUT; the *offline*
  variant only uses the OUT models (one-sided test), which is what an attacker does when it
  cannot afford models trained on each target.  With fewer than 64 shadow models the variance is
  shared across records ("fixed variance"), as the paper recommends.

The attacker's shadow training is a callable, so that a report can hand it the same recipe the
run used (model, optimizer, steps, and DP-SGD when the run used it).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from scipy.stats import norm
from torch import nn

from insitu.attacks.metrics import RocSummary, roc_summary
from insitu.errors import ConfigError, DataError

#: trains a fresh model of the target's kind on (X, y); seed makes shadow runs differ.
ShadowTrainer = Callable[[torch.Tensor, torch.Tensor, int], nn.Module]

#: Carlini et al. recommend a per-record variance only with many shadow models.
FIXED_VARIANCE_BELOW = 64


class MembershipAttack(str, enum.Enum):
    LOSS_THRESHOLD = "loss-threshold"
    LIRA_ONLINE = "lira-online"
    LIRA_OFFLINE = "lira-offline"


@dataclass(frozen=True)
class MembershipResult:
    attack: MembershipAttack
    roc: RocSummary
    scores: np.ndarray  # higher = judged more likely a member
    num_shadows: int = 0

    @property
    def auc(self) -> float:
        return self.roc.auc


@torch.no_grad()
def _logits(model: nn.Module, X: torch.Tensor, batch: int = 4096) -> torch.Tensor:
    model.eval()
    return torch.cat([model(X[i : i + batch]) for i in range(0, X.shape[0], batch)])


def logit_confidence(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """φ = log p_y − log(1 − p_y), computed from logits without rounding p to 0 or 1.

    For one binary logit z this is z for y = 1 and −z for y = 0; for classes it is
    z_y − logsumexp over the other classes.
    """
    z = _logits(model, X).double()
    y = y.long().reshape(-1)
    if z.dim() == 1 or z.shape[-1] == 1:
        z = z.reshape(-1)
        return torch.where(y == 1, z, -z).numpy()
    zy = z.gather(1, y[:, None]).squeeze(1)
    others = z.clone()
    others.scatter_(1, y[:, None], float("-inf"))
    return (zy - torch.logsumexp(others, dim=1)).numpy()


def per_record_loss(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """Cross-entropy of each record under the model: −log p_y = softplus(−φ)."""
    phi = logit_confidence(model, X, y)
    return np.logaddexp(0.0, -phi)


def loss_threshold(model: nn.Module, X: torch.Tensor, y: torch.Tensor, is_member: np.ndarray) -> MembershipResult:
    """Score = −loss: the lower a record's loss, the more likely it was trained on."""
    scores = -per_record_loss(model, X, y)
    return MembershipResult(MembershipAttack.LOSS_THRESHOLD, roc_summary(scores, is_member), scores)


@dataclass(frozen=True)
class ShadowStats:
    """φ of every pool record under every shadow model, and which records each shadow trained on."""

    phi: np.ndarray  # (num_shadows, n)
    inside: np.ndarray  # (num_shadows, n) bool

    @property
    def num_shadows(self) -> int:
        return int(self.phi.shape[0])


def train_shadows(X: torch.Tensor, y: torch.Tensor, train_fn: ShadowTrainer, num_shadows: int, seed: int = 0) -> ShadowStats:
    """Shadow models in complementary pairs: each record is IN exactly half of them."""
    if num_shadows < 2 or num_shadows % 2:
        raise ConfigError(f"LiRA needs an even number of shadow models (at least 2), got {num_shadows}")
    n = int(X.shape[0])
    if n < 4:
        raise DataError(f"LiRA needs a pool of at least 4 records, got {n}")
    rng = np.random.default_rng(seed)
    phis, insides = [], []
    for k in range(num_shadows // 2):
        half = np.zeros(n, dtype=bool)
        half[rng.permutation(n)[: n // 2]] = True
        for j, mask in enumerate((half, ~half)):
            idx = torch.from_numpy(np.flatnonzero(mask))
            model = train_fn(X[idx], y[idx], seed * 1000 + 2 * k + j)
            phis.append(logit_confidence(model, X, y))
            insides.append(mask)
    return ShadowStats(np.stack(phis), np.stack(insides))


def _masked_stats(phi: np.ndarray, mask: np.ndarray, fixed_variance: bool) -> tuple[np.ndarray, np.ndarray]:
    cnt = mask.sum(0)
    if (cnt == 0).any():
        raise DataError("some records are in no shadow model of this kind; train more shadow models")
    mu = np.where(mask, phi, 0.0).sum(0) / cnt
    dev = np.where(mask, phi - mu, 0.0)
    if fixed_variance:
        var = np.full_like(mu, (dev**2).sum() / max(1, mask.sum() - 1))
    else:
        var = (dev**2).sum(0) / np.maximum(1, cnt - 1)
    return mu, np.sqrt(np.maximum(var, 1e-12))


def lira_scores(target_phi: np.ndarray, stats: ShadowStats, variant: MembershipAttack) -> np.ndarray:
    """Likelihood-ratio scores of the target model's φ given the shadow statistics."""
    fixed = stats.num_shadows < FIXED_VARIANCE_BELOW
    mu_out, sd_out = _masked_stats(stats.phi, ~stats.inside, fixed)
    if variant is MembershipAttack.LIRA_OFFLINE:
        # one-sided: how far above what OUT models give is the target's confidence? (log Φ for stability)
        return norm.logcdf((target_phi - mu_out) / sd_out)
    if variant is MembershipAttack.LIRA_ONLINE:
        mu_in, sd_in = _masked_stats(stats.phi, stats.inside, fixed)
        return norm.logpdf(target_phi, mu_in, sd_in) - norm.logpdf(target_phi, mu_out, sd_out)
    raise ConfigError(f"{variant.value} is not a LiRA variant")


def lira(
    model: nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    is_member: np.ndarray,
    train_fn: ShadowTrainer,
    *,
    num_shadows: int = 16,
    variant: MembershipAttack = MembershipAttack.LIRA_ONLINE,
    seed: int = 0,
    stats: ShadowStats | None = None,
) -> MembershipResult:
    """Run LiRA against ``model`` on the pool (X, y); pass ``stats`` to reuse trained shadows."""
    variant = MembershipAttack(variant)
    if stats is None:
        stats = train_shadows(X, y, train_fn, num_shadows, seed)
    scores = lira_scores(logit_confidence(model, X, y), stats, variant)
    return MembershipResult(variant, roc_summary(scores, is_member), scores, stats.num_shadows)
