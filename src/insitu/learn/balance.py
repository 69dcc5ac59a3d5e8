"""Class-balancing rules a site applies to its OWN training labels (label skew across hospitals).

A plan may carry, instead of fixed class weights, the name of a rule.  Every site derives the
numbers from the labels of its own training split when it trains: nothing about its labels leaves
the site, and sites with different label mixes each correct for their own.

* ``balanced``: each record's loss is weighted by ``n / (K · n_c)`` (n records, K classes, n_c
  records of its class), so every class present at the site weighs the same in its loss
  (inverse class frequency, the weighting scikit-learn calls "balanced").
* ``logit-adjust``: during training the site adds ``log π_c`` (its own label prior, Laplace-smoothed)
  to the logits before the loss; predictions use the raw logits.  The model then learns the
  class-conditional part rather than the site's prior (logit adjustment, Menon et al., ICLR 2021;
  applied per client against label skew as in FedLC, Zhang et al., ICML 2022).  A binary task
  with one logit adds ``log(π₁ / π₀)``.

Both depend on the training split's label counts, so one record changes every other record's
weight: record-level DP-SGD's clip bound does not cover that, and :class:`~insitu.plan.Plan`
refuses the pairing (fixed numeric weights remain available there).
"""
from __future__ import annotations

import enum
import math

import torch


class ClassBalance(str, enum.Enum):
    """A class-weighting rule each site applies to its own training labels."""

    BALANCED = "balanced"
    LOGIT_ADJUST = "logit-adjust"


def label_counts(y: torch.Tensor, num_classes: int) -> list[int]:
    """How many training records of each class ``y`` holds (binary: [negative, positive])."""
    return [int(c) for c in torch.bincount(y.reshape(-1).long(), minlength=num_classes)[:num_classes]]


def balanced_weights(y: torch.Tensor, num_classes: int) -> tuple[float, ...]:
    """``n / (K · n_c)`` for each class present in ``y``; 1 for an absent class (no record uses it)."""
    counts = label_counts(y, num_classes)
    n = sum(counts)
    return tuple(n / (num_classes * c) if c else 1.0 for c in counts)


def log_prior(y: torch.Tensor, num_classes: int) -> tuple[float, ...]:
    """``log π_c`` with π_c = (n_c + 1) / (n + K): finite even for a class the site lacks."""
    counts = label_counts(y, num_classes)
    n = sum(counts)
    return tuple(math.log((c + 1) / (n + num_classes)) for c in counts)


__all__ = ["ClassBalance", "balanced_weights", "label_counts", "log_prior"]
