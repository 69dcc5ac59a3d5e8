"""Site-local personalisation: fine-tune the federated model on one site's own records.

FedAvg + local fine-tuning (a standard personalised-FL baseline): after federation, each site
starts from the final global model and takes up to ``steps`` minibatch steps on its own training
split with the task's optimiser and learning rate (the ones it trained with in every round; a
fresh optimiser state, as each round starts with one).  Every ``every`` steps it scores the model
on its OWN validation split and keeps the best checkpoint; step 0 (the global model itself) is a
candidate, and a later checkpoint replaces it only if strictly better, so personalisation never
makes a site's validation score worse than the global model's.

The validation score is AUROC for a binary task whose validation split holds both classes (the
clinical tasks' figure), accuracy otherwise.  The fine-tuned model stays where it was made: this
module returns it to its caller (the site), and only its test metrics are reported.

:class:`PersonalMode` ``ensemble`` is the other personalisation: a mixture of a global and a local
expert (as in Peterson et al. 2019, "Private federated learning with domain adaptation", with
fixed weights).  The site trains a model of its own from a fresh initialisation on its own records
(the same loop, its checkpoint chosen on its own validation split: early stopping, as a
local-only model is trained) and predicts with the mean of the two models' predicted
probabilities (:class:`MeanRisk`).  The weights are fixed at one half, not chosen: on a unit with
a few deaths in its validation split a chosen weight follows that split's noise, the failure of
checkpoint choice that fine-tuning shows on the PhysioNet cardiac-surgery unit.

:class:`PersonalMode` ``complement`` is the same mixture with one choice moved: the site keeps the
checkpoint of its own model with which the *mixture* scores best on its own validation split,
instead of the one that scores best alone.  The own model is early-stopped for the job it does (to
complement the global model), and the validation split chooses exactly one thing, as it does for
``ensemble``: a checkpoint, never a weight.  Step 0 (the fresh initialisation) is not a candidate:
an untrained model's risk is not constant, so keeping it re-ranks records at random (on PhysioNet the
first version kept it at 2 of 20 site-seeds and lost 0.01-0.02 AUROC against the global model there:
docs/guide/ehr.md).
"""
from __future__ import annotations

import copy
import enum
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from insitu.errors import ConfigError
from insitu.learn.models import get_flat, set_flat
from insitu.learn.train import TrainConfig, loss_fn, make_optimizer, random_shift

#: the most fine-tuning steps a site accepts in one request (a typo of 10⁹ would hold the site for days)
MAX_PERSONALIZE_STEPS = 1_000_000


def check_steps(steps: object, what: str = "--personalize") -> int:
    """``steps`` as a count of fine-tuning steps (0 = off), or a ConfigError naming the value."""
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 0 <= int(steps) <= MAX_PERSONALIZE_STEPS:
        raise ConfigError(f"{what} takes a whole number of local fine-tuning steps from 0 (off) to {MAX_PERSONALIZE_STEPS:,}, got {steps!r}")
    return int(steps)


class PersonalMode(str, enum.Enum):
    """How a site makes its personal model from the final global model (``--personalize-mode``)."""

    FINETUNE = "finetune"  # fine-tune a copy of the global model, checkpoint chosen on the site's validation split
    ENSEMBLE = "ensemble"  # the mean risk of the global model and a model the site trains alone (early-stopped)
    COMPLEMENT = "complement"  # the same mean risk; the own model's checkpoint is the one whose MIXTURE scores best on validation


class MeanRisk(nn.Module):
    """The equal-weight mixture of two models' predicted probabilities, as a model whose output is the
    mixture's logit (one output: ``logit((σ(a) + σ(b)) / 2)``) or log-probabilities (several: ``log((softmax(a)
    + softmax(b)) / 2)``), so that everything that scores a model scores the mixture unchanged."""

    def __init__(self, first: nn.Module, second: nn.Module, num_outputs: int):
        super().__init__()
        self.first, self.second, self.num_outputs = first, second, num_outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.first(x), self.second(x)
        if self.num_outputs == 1:
            return torch.logit((torch.sigmoid(a) + torch.sigmoid(b)) / 2)
        return torch.log((torch.softmax(a, -1) + torch.softmax(b, -1)) / 2)


@dataclass(frozen=True)
class FineTuned:
    """The outcome of one site's fine-tuning: which checkpoint its validation split chose and why."""

    best_step: int  # 0: the global model itself was kept
    steps_run: int
    metric: str  # "auroc" or "accuracy"
    val_start: float  # the global model's validation score (step 0)
    val_best: float  # the kept checkpoint's validation score (≥ val_start)


@torch.no_grad()
def _val_score(model: nn.Module, X: torch.Tensor, y: torch.Tensor, num_outputs: int) -> tuple[str, float]:
    from insitu.learn.clinical import risk_scores
    from insitu.learn.metrics import auroc

    model.eval()
    yy = y.reshape(-1).long().numpy()
    if num_outputs == 1 and 0 < yy.sum() < len(yy):
        return "auroc", auroc(yy, risk_scores(model, X))
    out = model(X)
    pred = (out.squeeze(-1) > 0).long() if num_outputs == 1 else out.argmax(-1)
    return "accuracy", float((pred.numpy() == yy).mean())


#: how a checkpoint is scored on the validation split: model → (metric name, score; higher is better)
Scorer = Callable[[nn.Module], tuple[str, float]]


def fine_tune(model: nn.Module, X: torch.Tensor, y: torch.Tensor, X_val: torch.Tensor, y_val: torch.Tensor, cfg: TrainConfig,
              generator: torch.Generator, *, num_outputs: int, steps: int, every: int,
              score: Scorer | None = None, trained_only: bool = False) -> tuple[nn.Module, FineTuned]:
    """A copy of ``model`` fine-tuned for up to ``steps`` steps, at the checkpoint (every ``every`` steps,
    step 0 included unless ``trained_only``) with the best score on (X_val, y_val); ``model`` itself is
    left untouched.  ``score`` scores a checkpoint on the validation split (default: the model's own
    AUROC or accuracy there); it must read no other records."""
    steps = check_steps(steps, "fine-tuning steps")
    if steps == 0:
        raise ConfigError("fine-tuning needs at least one step (0 means personalisation is off)")
    if every < 1:
        raise ConfigError(f"fine-tuning checks its validation split every k ≥ 1 steps, got {every}")
    n = X.shape[0]
    if n == 0:
        raise ConfigError("cannot fine-tune on a site with no training records")
    if X_val is None or X_val.shape[0] == 0:
        raise ConfigError("personalisation chooses its checkpoint on the site's own validation split, and this site has none")
    if score is None:
        score = lambda m: _val_score(m, X_val, y_val, num_outputs)  # noqa: E731
    model = copy.deepcopy(model)
    metric, start = score(model)
    best = (math.nan if trained_only else start, 0, get_flat(model))  # NaN: the first trained checkpoint replaces it
    crit = loss_fn(num_outputs)
    opt = make_optimizer(model, cfg)
    bs = min(cfg.batch_size, n)
    for step in range(1, steps + 1):
        model.train()
        idx = torch.randint(0, n, (bs,), generator=generator)
        xb = X[idx]
        if cfg.augment_shift and xb.dim() == 4:
            xb = random_shift(xb, cfg.augment_shift, generator)
        opt.zero_grad(set_to_none=True)
        crit(model(xb), y[idx]).backward()
        opt.step()
        if step % every == 0 or step == steps:
            _, value = score(model)
            if not math.isnan(value) and (math.isnan(best[0]) or value > best[0]):
                best = (value, step, get_flat(model))
    set_flat(model, best[2])
    model.eval()
    return model, FineTuned(best_step=best[1], steps_run=steps, metric=metric, val_start=float(start), val_best=float(best[0]))


def own_model_mixture(global_model: nn.Module, fresh: nn.Module, X: torch.Tensor, y: torch.Tensor, X_val: torch.Tensor,
                      y_val: torch.Tensor, cfg: TrainConfig, generator: torch.Generator, *, num_outputs: int, steps: int,
                      every: int, stop_on_mixture: bool = False) -> tuple[nn.Module, FineTuned]:
    """:class:`PersonalMode` ``ensemble``: train ``fresh`` (a new initialisation) on the site's records for up to
    ``steps`` steps, checkpoint chosen on (X_val, y_val), and return the equal mixture of ``global_model`` and it.
    With ``stop_on_mixture`` (mode ``complement``) the checkpoint kept is the one with which the mixture scores
    best there; otherwise the one that scores best alone.  In the returned :class:`FineTuned`, ``best_step`` is
    the own model's checkpoint, ``val_start`` the global model's validation score and ``val_best`` the
    mixture's (with ``stop_on_mixture`` the score it was chosen by; otherwise not chosen: it may be lower)."""
    glob = copy.deepcopy(global_model).eval()
    score: Scorer | None = None
    if stop_on_mixture:
        score = lambda m: _val_score(MeanRisk(glob, m, num_outputs), X_val, y_val, num_outputs)  # noqa: E731
    own, ft = fine_tune(fresh, X, y, X_val, y_val, cfg, generator, num_outputs=num_outputs, steps=steps, every=every, score=score,
                        trained_only=stop_on_mixture)
    mixture = MeanRisk(glob, own, num_outputs).eval()
    _, start = _val_score(glob, X_val, y_val, num_outputs)
    _, mixed = _val_score(mixture, X_val, y_val, num_outputs)
    return mixture, FineTuned(best_step=ft.best_step, steps_run=ft.steps_run, metric=ft.metric, val_start=float(start), val_best=float(mixed))


__all__ = ["FineTuned", "MAX_PERSONALIZE_STEPS", "MeanRisk", "PersonalMode", "check_steps", "fine_tune", "own_model_mixture"]
