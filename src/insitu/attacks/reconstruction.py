"""Reconstruction of training records from model updates, as the coordinator sees them.

Two attackers:

* **analytic recovery through a linear layer.**  For a first layer ``z = W x + b`` the gradient of
  any loss on one record is ``∂L/∂W = (∂L/∂z) xᵀ`` and ``∂L/∂b = ∂L/∂z``, so every row j with
  ``∂L/∂b_j ≠ 0`` gives ``x = (∂L/∂W)_j / (∂L/∂b)_j`` exactly.  A site update is a sum of such
  gradients times −lr; when it comes from one record (one step, or several steps on the same
  record) the ratio is still exactly that record.  With several records it is a weighted blend,
  and the rows stop agreeing with each other — the attacker can see that.
* **gradient matching** (DLG, Zhu et al. 2019; "Inverting Gradients", Geiping et al. 2020): start
  from noise and move a dummy image until its gradient points the way the observed update
  points (cosine loss), with a total-variation prior that favours natural images.  The label of a
  single record is read off the last bias' gradient first (iDLG, Zhao et al. 2020).

* **feature inversion** (linear-layer leakage, e.g. Fowl et al. 2022, "Robbing the Fed"): when a
  convolutional front end feeds a dense layer with a bias, the analytic ratio above recovers the
  *features* ``h`` that reached the dense layer exactly; the attacker then looks for the image
  whose features are ``h`` (a least-squares problem with a TV prior, far better posed than
  matching the whole gradient's direction).  The attacker keeps whichever estimate, this or
  gradient matching, has the gradient that best matches the update: it never sees the record.

The same attacker runs against what secure aggregation reveals (only the sum of the sites'
updates) and against DP (clipped, noised updates); success is measured against a *guess*: the
mean of records the attacker could have from elsewhere, so "no better than a guess" has a number.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from insitu.attacks.metrics import psnr, ssim
from insitu.errors import ConfigError, DataError
from insitu.learn.models import num_params


# ---------------------------------------------------------------------------------------------
# analytic recovery through the first linear layer
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LinearRecovery:
    """The attacker's estimate and how much the rows of the first layer agree on it."""

    estimate: np.ndarray
    row: int  # the row whose bias gradient was largest
    disagreement: float  # relative spread of per-row estimates; ≈ 0 for a single record


def _first_linear(model: nn.Module) -> tuple[int, nn.Linear]:
    """Offset (in the flat parameter vector) and module of the first linear layer with a bias."""
    offset = 0
    for module in model.modules():
        own = list(module.parameters(recurse=False))
        if isinstance(module, nn.Linear) and module.bias is not None:
            return offset, module
        if own and not isinstance(module, nn.Linear):
            raise ConfigError(f"analytic recovery needs the model to start with a linear layer; it starts with {type(module).__name__}")
        offset += sum(p.numel() for p in own)
    raise ConfigError("analytic recovery needs a linear layer with a bias; the model has none")


def analytic_linear(update: np.ndarray, model: nn.Module) -> LinearRecovery:
    """Recover the input of the model's first linear layer from a flat update (or gradient)."""
    vec = np.asarray(update, dtype=np.float64).reshape(-1)
    n = num_params(model)
    if vec.shape[0] < n:
        raise DataError(f"update has {vec.shape[0]} values; the model has {n} parameters")
    offset, lin = _first_linear(model)
    out, d = lin.weight.shape
    dW = vec[offset : offset + out * d].reshape(out, d)
    db = vec[offset + out * d : offset + out * d + out]
    if not np.any(np.abs(db) > 0):
        return LinearRecovery(np.zeros(d), -1, float("inf"))
    j = int(np.argmax(np.abs(db)))
    est = dW[j] / db[j]
    strong = np.abs(db) > 1e-3 * np.abs(db[j])
    rows = dW[strong] / db[strong, None]
    spread = float(np.max(np.linalg.norm(rows - est, axis=1)) / (np.linalg.norm(est) + 1e-12)) if rows.shape[0] > 1 else float("nan")
    return LinearRecovery(est, j, spread)


@dataclass(frozen=True)
class TabularScore:
    """How close the attacker got to the records behind an update, next to a guess."""

    exact: bool  # every feature of some target record recovered within tolerance
    distance: float  # RMS error (per feature) to the closest target record
    guess_distance: float  # same for the guess
    nearest: int

    @property
    def better_than_guess(self) -> bool:
        return self.distance < self.guess_distance


def score_tabular(estimate: np.ndarray, targets: np.ndarray, guess: np.ndarray, tol: float = 1e-3) -> TabularScore:
    """``tol`` is per feature, in the units the model sees (z-scores for heart: 1e-3 sd)."""
    t = np.atleast_2d(np.asarray(targets, dtype=np.float64))
    e = np.asarray(estimate, dtype=np.float64).reshape(-1)
    if t.shape[1] != e.shape[0]:
        raise DataError(f"estimate has {e.shape[0]} features, records have {t.shape[1]}")
    if not np.all(np.isfinite(e)):
        e = np.nan_to_num(e, nan=0.0, posinf=0.0, neginf=0.0)
    err = np.sqrt(np.mean((t - e) ** 2, axis=1))
    k = int(np.argmin(err))
    exact = bool(np.max(np.abs(t[k] - e)) <= tol)
    g = np.sqrt(np.mean((t - np.asarray(guess, dtype=np.float64).reshape(-1)) ** 2, axis=1)).min()
    return TabularScore(exact, float(err[k]), float(g), k)


# ---------------------------------------------------------------------------------------------
# gradient matching
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MatchConfig:
    """Kept cheap on purpose: a small batch and a few hundred Adam steps on 28×28 images."""

    iterations: int = 300
    lr: float = 0.1
    tv_weight: float = 1e-2
    bounds: tuple[float, float] = (0.0, 1.0)  # the range of the model's inputs
    restarts: int = 1

    def __post_init__(self) -> None:
        if self.iterations < 1 or self.restarts < 1:
            raise ConfigError(f"gradient matching needs iterations and restarts ≥ 1, got {self.iterations}, {self.restarts}")
        if not self.bounds[0] < self.bounds[1]:
            raise ConfigError(f"input bounds must be (low, high) with low < high, got {self.bounds}")


def infer_labels(update: np.ndarray, model: nn.Module, num_images: int = 1) -> torch.Tensor:
    """Labels from the last layer's bias (iDLG).  Direction of descent is −update.

    One binary logit: ∂L/∂b = σ(z) − y is negative exactly when y = 1.  Classes: the most
    negative entries of ∂L/∂b are the labels present.
    """
    g = -np.asarray(update, dtype=np.float64)[: num_params(model)]
    last = list(model.parameters())[-1]
    db = g[-last.numel() :]
    if db.shape[0] == 1:
        return torch.full((num_images,), 1.0 if db[0] < 0 else 0.0)
    order = np.argsort(db)
    return torch.from_numpy(np.resize(order[: max(1, int((db < 0).sum()))], num_images)).long()


def _loss(num_outputs: int):
    if num_outputs == 1:
        return lambda out, y: nn.functional.binary_cross_entropy_with_logits(out.reshape(-1), y.float())
    return lambda out, y: nn.functional.cross_entropy(out, y.long())


def _tv(x: torch.Tensor) -> torch.Tensor:
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()


def gradient_matching(
    update: np.ndarray,
    model: nn.Module,
    input_shape: tuple[int, ...],
    *,
    num_images: int = 1,
    labels: torch.Tensor | None = None,
    config: MatchConfig = MatchConfig(),
    seed: int = 0,
) -> np.ndarray:
    """Images (num_images, *input_shape) whose gradient best matches ``update`` in direction.

    ``model`` must hold the parameters the update was computed at (the global model of that
    round: the coordinator sent it).
    """
    n = num_params(model)
    target = -torch.as_tensor(np.asarray(update, dtype=np.float32)[:n])
    if not torch.isfinite(target).all():
        raise DataError("the update holds NaN or infinite values")
    num_outputs = list(model.parameters())[-1].numel()
    y = infer_labels(update, model, num_images) if labels is None else labels
    crit = _loss(num_outputs)
    params = [p for p in model.parameters()]
    lo, hi = config.bounds
    gen = torch.Generator().manual_seed(seed)
    best, best_loss = None, float("inf")
    model.eval()
    tnorm = target.norm() + 1e-12
    for _ in range(config.restarts):
        x = (lo + (hi - lo) * torch.rand((num_images, *input_shape), generator=gen)).requires_grad_(True)
        opt = torch.optim.Adam([x], lr=config.lr * (hi - lo))
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[int(config.iterations * f) for f in (0.375, 0.625, 0.875)], gamma=0.1)
        for _ in range(config.iterations):
            opt.zero_grad()
            grads = torch.autograd.grad(crit(model(x), y), params, create_graph=True)
            g = torch.cat([t.reshape(-1) for t in grads])
            rec = 1 - (g @ target) / (g.norm() * tnorm + 1e-12)
            loss = rec + config.tv_weight * _tv(x)
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                x.clamp_(lo, hi)
        if float(rec.detach()) < best_loss:
            best_loss, best = float(rec.detach()), x.detach().clone()
    return best.numpy()


def _dense_after_features(model: nn.Module) -> tuple[nn.Module, int, nn.Linear]:
    """(feature extractor, offset of the dense layer in the flat vector, dense layer) of a model
    whose ``features`` module feeds a ``head`` starting (after Flatten) with a Linear with bias."""
    features, head = getattr(model, "features", None), getattr(model, "head", None)
    if not isinstance(features, nn.Module) or not isinstance(head, nn.Sequential):
        raise ConfigError(f"feature inversion needs a model with `features` and a `head`; {type(model).__name__} has not")
    lin = next((m for m in head if isinstance(m, nn.Linear)), None)
    if lin is None or lin.bias is None:
        raise ConfigError("feature inversion needs a dense layer with a bias after the features")
    offset = 0
    for p in model.parameters():
        if p is lin.weight:
            return features, offset, lin
        offset += p.numel()
    raise ConfigError("dense layer not found among the model's parameters")


def feature_inversion(update: np.ndarray, model: nn.Module, input_shape: tuple[int, ...], *, config: MatchConfig = MatchConfig(), seed: int = 0) -> np.ndarray:
    """An image whose features equal those the update's dense layer reveals (one record: exactly)."""
    vec = np.asarray(update, dtype=np.float64).reshape(-1)
    if vec.shape[0] < num_params(model):
        raise DataError(f"update has {vec.shape[0]} values; the model has {num_params(model)} parameters")
    features, offset, lin = _dense_after_features(model)
    out, d = lin.weight.shape
    dW = vec[offset : offset + out * d].reshape(out, d)
    db = vec[offset + out * d : offset + out * d + out]
    lo, hi = config.bounds
    gen = torch.Generator().manual_seed(seed)
    x = (lo + (hi - lo) * torch.rand((1, *input_shape), generator=gen))
    if not np.any(np.abs(db) > 0):
        return x.numpy()
    j = int(np.argmax(np.abs(db)))
    h = torch.as_tensor(dW[j] / db[j], dtype=torch.float32)
    scale = h.norm() + 1e-12
    x.requires_grad_(True)
    opt = torch.optim.Adam([x], lr=config.lr * (hi - lo))
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[int(config.iterations * f) for f in (0.5, 0.75)], gamma=0.1)
    model.eval()
    for _ in range(config.iterations):
        opt.zero_grad()
        f = features(x).reshape(-1)
        loss = ((f - h).norm() / scale) ** 2 + config.tv_weight * _tv(x)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            x.clamp_(lo, hi)
    return x.detach().numpy()


def gradient_mismatch(estimate: np.ndarray, update: np.ndarray, model: nn.Module) -> float:
    """1 − cosine between the update's descent direction and the gradient at ``estimate`` (with the
    label read from the update): the attacker's own score of a candidate, needing no ground truth."""
    n = num_params(model)
    target = -torch.as_tensor(np.asarray(update, dtype=np.float32)[:n])
    y = infer_labels(update, model, 1)
    crit = _loss(list(model.parameters())[-1].numel())
    x = torch.as_tensor(np.asarray(estimate, dtype=np.float32))
    grads = torch.autograd.grad(crit(model(x), y), list(model.parameters()))
    g = torch.cat([t.reshape(-1) for t in grads])
    return float(1 - (g @ target) / (g.norm() * target.norm() + 1e-12))


def reconstruct_image(update: np.ndarray, model: nn.Module, input_shape: tuple[int, ...], *, config: MatchConfig = MatchConfig(), seed: int = 0) -> np.ndarray:
    """The attacker's best image: feature inversion when the model allows it, else (or when its
    gradient matches the update worse) gradient matching."""
    cands = [gradient_matching(update, model, input_shape, config=config, seed=seed)]
    try:
        cands.append(feature_inversion(update, model, input_shape, config=config, seed=seed))
    except ConfigError:
        return cands[0]
    return min(cands, key=lambda c: gradient_mismatch(c, update, model))


def series_matching(update: np.ndarray, model: nn.Module, input_shape: tuple[int, ...], *, hours_per_bin: float = 1.0,
                    config: MatchConfig = MatchConfig(), seed: int = 0) -> np.ndarray:
    """Gradient matching for one clinical series ``[T, 3V]`` (values, masks, hours since the last
    observation), by an attacker who knows the encoding: it optimises the values and the
    observation pattern (mask logits) and derives the time gaps from the pattern as the loader does,
    starting from the population mean (values 0) with few observations.  Returns ``(1, T, 3V)``."""
    n = num_params(model)
    target = -torch.as_tensor(np.asarray(update, dtype=np.float32)[:n])
    if not torch.isfinite(target).all():
        raise DataError("the update holds NaN or infinite values")
    if len(input_shape) != 2 or input_shape[1] % 3:
        raise ConfigError(f"series matching needs records of shape (T, 3V), got {input_shape}")
    T, V = input_shape[0], input_shape[1] // 3
    y = infer_labels(update, model, 1)
    crit = _loss(list(model.parameters())[-1].numel())
    params = list(model.parameters())
    gen = torch.Generator().manual_seed(seed)
    tnorm = target.norm() + 1e-12
    model.eval()
    best, best_loss = None, float("inf")
    for _ in range(config.restarts):
        values = (0.01 * torch.randn((1, T, V), generator=gen)).requires_grad_(True)
        logits = (-2.0 + 0.01 * torch.randn((1, T, V), generator=gen)).requires_grad_(True)
        opt = torch.optim.Adam([values, logits], lr=config.lr)

        def series() -> torch.Tensor:
            m = torch.sigmoid(logits)
            gaps = [torch.zeros((1, V))]
            for t in range(1, T):
                gaps.append(hours_per_bin + (1 - m[:, t - 1]) * gaps[-1])
            return torch.cat([values * m, m, torch.stack(gaps, dim=1)], dim=2)

        for _ in range(config.iterations):
            opt.zero_grad()
            grads = torch.autograd.grad(crit(model(series()), y), params, create_graph=True)
            g = torch.cat([t.reshape(-1) for t in grads])
            rec = 1 - (g @ target) / (g.norm() * tnorm + 1e-12)
            rec.backward()
            opt.step()
        if float(rec.detach()) < best_loss:
            with torch.no_grad():
                best_loss, best = float(rec.detach()), series().clone()
    return best.numpy()


@dataclass(frozen=True)
class SeriesScore:
    """How close a reconstructed clinical series (``[T, 3V]``: values, masks, gaps) came to a record.

    ``rms`` is the RMS error of the values where the record has an observation (z-units), next to
    the population-mean guess's; ``mask_accuracy`` the share of (hour, variable) cells whose
    observed / unobserved state the estimate gets right (mask thresholded at 0.5)."""

    rms: float
    guess_rms: float
    mask_accuracy: float
    guess_mask_accuracy: float

    def success(self, tol: float = 0.1) -> bool:
        """Recovered: every observed value within ``tol`` z (a reading one could not tell apart) and the
        pattern of observations exact."""
        return self.rms <= tol and self.mask_accuracy == 1.0


def score_series(estimate: np.ndarray, target: np.ndarray, guess: np.ndarray) -> SeriesScore:
    """Score one estimated series against its target record (both ``[T, 3V]``)."""
    v = target.shape[-1] // 3
    est, tg, gs = (np.asarray(a, dtype=np.float64).reshape(target.shape) for a in (estimate, target, guess))
    observed = tg[:, v:2 * v] > 0.5
    if not observed.any():
        observed = np.ones_like(observed)

    def rms(a: np.ndarray) -> float:
        return float(np.sqrt(np.mean((a[:, :v][observed] - tg[:, :v][observed]) ** 2)))

    def mask_acc(a: np.ndarray) -> float:
        return float(np.mean((a[:, v:2 * v] > 0.5) == observed))

    return SeriesScore(rms(est), rms(gs), mask_acc(est), mask_acc(gs))


@dataclass(frozen=True)
class ImageScore:
    psnr: float
    ssim: float
    guess_psnr: float
    guess_ssim: float

    def success(self, threshold: float = 0.7) -> bool:
        """A reconstruction counts as a success when SSIM clears ``threshold`` and beats the guess."""
        return self.ssim >= threshold and self.ssim > self.guess_ssim


def score_images(estimate: np.ndarray, targets: np.ndarray, guess: np.ndarray, bounds: tuple[float, float] = (0.0, 1.0)) -> ImageScore:
    """Best PSNR / SSIM of ``estimate`` against any target image, in [0, 1] pixel units."""
    lo, hi = bounds
    to01 = lambda a: (np.asarray(a, dtype=np.float64).reshape(-1, *np.asarray(a).shape[-2:]) - lo) / (hi - lo)  # noqa: E731
    est = to01(estimate)[0]
    tg = to01(targets)
    gs = to01(guess)[0]
    p = max(psnr(t, est) for t in tg)
    s = max(ssim(t, est) for t in tg)
    gp = max(psnr(t, gs) for t in tg)
    gsim = max(ssim(t, gs) for t in tg)
    return ImageScore(p, s, gp, gsim)
