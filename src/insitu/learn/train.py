"""Local training and evaluation at one site (plain SGD/Adam, FedProx term, Scaffold correction)."""
from __future__ import annotations

import contextlib
import enum
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from insitu.errors import ConfigError, parse_choice
from insitu.learn.balance import ClassBalance, balanced_weights, log_prior


class OptimizerName(str, enum.Enum):
    SGD = "sgd"
    SGDM = "sgdm"  # SGD with heavy-ball momentum 0.9 (the buffer starts at zero every round)
    ADAM = "adam"


@dataclass(frozen=True)
class TrainConfig:
    lr: float = 0.01
    steps: int = 50
    batch_size: int = 4
    optimizer: OptimizerName = OptimizerName.SGD
    prox_mu: float = 0.0
    weight_decay: float = 0.0
    augment_shift: int = 0  # images: random translation by up to this many pixels (0 = off)
    #: loss weight of each class (binary: [normal, positive]), or a rule the site applies to its own
    #: training labels (:class:`~insitu.learn.balance.ClassBalance`); None: every record weighs the same
    class_weights: tuple[float, ...] | ClassBalance | None = None
    #: images: (max rotation in degrees, max scale change, max contrast change) drawn per image; None = off
    augment_jitter: tuple[float, float, float] | None = None

    def __post_init__(self) -> None:
        if not (self.lr > 0 and np.isfinite(self.lr)):
            raise ConfigError(f"learning rate must be a positive number, got {self.lr!r}")
        if self.steps < 1:
            raise ConfigError(f"local steps must be at least 1, got {self.steps!r}")
        if self.batch_size < 1:
            raise ConfigError(f"batch size must be at least 1, got {self.batch_size!r}")
        if self.prox_mu < 0:
            raise ConfigError(f"FedProx mu must be >= 0, got {self.prox_mu!r}")
        object.__setattr__(self, "optimizer", OptimizerName(self.optimizer))
        if self.class_weights is not None:
            object.__setattr__(self, "class_weights", check_class_weights(self.class_weights))
        if self.augment_jitter is not None:
            object.__setattr__(self, "augment_jitter", check_jitter(self.augment_jitter))


def check_jitter(value: object) -> tuple[float, float, float]:
    """``augment_jitter`` as (degrees 0-45, scale 0-0.5, contrast 0-0.9), refused naming the value."""
    ok = isinstance(value, (list, tuple)) and len(value) == 3 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in value)
    if not ok or not (0 <= value[0] <= 45 and 0 <= value[1] <= 0.5 and 0 <= value[2] <= 0.9) or not any(value):
        raise ConfigError("augment_jitter must be three numbers ROTATION,SCALE,CONTRAST: the largest rotation in degrees (0-45), "
                          f"scale change (0-0.5) and contrast change (0-0.9), not all zero (e.g. 10,0.1,0.2), got {value!r}")
    return (float(value[0]), float(value[1]), float(value[2]))


def parse_jitter(value: object) -> tuple[float, float, float] | None:
    """``--augment-jitter`` as given on the command line (``"10,0.1,0.2"``) or in a job file (a list);
    None or ``"none"``: off."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
        return None
    if isinstance(value, str):
        try:
            value = [float(x) for x in value.split(",")]
        except ValueError:
            raise ConfigError(f"augment_jitter must be three numbers ROTATION,SCALE,CONTRAST (e.g. 10,0.1,0.2), got {value!r}") from None
    return check_jitter(value)


def check_class_weights(weights: object, num_classes: int | None = None) -> tuple[float, ...] | ClassBalance:
    """``weights`` as a tuple of positive finite floats, one per class, or a rule's name
    (``balanced``, ``logit-adjust``: :mod:`insitu.learn.balance`); refused naming the value."""
    if isinstance(weights, str):
        return parse_choice(ClassBalance, weights, "class_weights", choices="numbers, one per class (e.g. 1,0.5), or a rule each site applies "
                            f"to its own training labels ({', '.join(r.value for r in ClassBalance)})")
    if not isinstance(weights, (list, tuple)) or not 2 <= len(weights) <= 100_000 or not all(
            isinstance(w, (int, float)) and not isinstance(w, bool) and np.isfinite(w) and w > 0 for w in weights):
        raise ConfigError(f"class_weights must be a list of 2 or more positive numbers (one per class), got {weights!r}")
    if num_classes is not None and len(weights) != num_classes:
        raise ConfigError(f"class_weights gives {len(weights)} weight(s), the task has {num_classes} classes")
    return tuple(float(w) for w in weights)


def parse_class_weights(value: object) -> tuple[float, ...] | ClassBalance | None:
    """``--class-weights`` as given on the command line (``"1,0.4"``, ``"balanced"``) or in a job file
    (a list or a rule's name); None or ``"none"``: no weighting."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
        return None
    if isinstance(value, str) and value.strip().lower() in {r.value for r in ClassBalance}:
        return ClassBalance(value.strip().lower())
    if isinstance(value, str):
        try:
            value = [float(x) for x in value.split(",")]
        except ValueError:
            raise ConfigError(f"class_weights must be numbers separated by commas (one per class, e.g. 1,0.4) or a rule each site "
                              f"applies to its own training labels ({', '.join(r.value for r in ClassBalance)}), got {value!r}") from None
    return check_class_weights(value)


def loss_fn(num_outputs: int, class_weights: tuple[float, ...] | None = None, logit_offsets: tuple[float, ...] | None = None):
    """Binary tasks use one logit and BCE; others cross-entropy over classes.  With
    ``class_weights`` each record's loss is multiplied by its class's weight (mean over the batch);
    with ``logit_offsets`` (one per class) they are added to the logits before the loss (a binary
    task's single logit gets offset[1] − offset[0])."""
    if logit_offsets is not None:
        base = loss_fn(num_outputs, class_weights)
        off = torch.tensor(logit_offsets, dtype=torch.float32)
        if num_outputs == 1:
            shift = float(off[1] - off[0])
            return lambda out, y: base(out + shift, y)
        return lambda out, y: base(out + off, y)
    w = torch.tensor(class_weights, dtype=torch.float32) if class_weights is not None else None
    if num_outputs == 1:
        bce = nn.BCEWithLogitsLoss(reduction="none" if w is not None else "mean")
        if w is None:
            return lambda out, y: bce(out.squeeze(-1), y.float())
        return lambda out, y: (bce(out.squeeze(-1), y.float()) * w[y.long()]).mean()
    if w is None:
        ce = nn.CrossEntropyLoss()
        return lambda out, y: ce(out, y.long())
    ce_each = nn.CrossEntropyLoss(reduction="none")
    return lambda out, y: (ce_each(out, y.long()) * w[y.long()]).mean()


def site_loss(num_outputs: int, class_weights: tuple[float, ...] | ClassBalance | None, y: torch.Tensor):
    """The training loss of a site whose training labels are ``y``: fixed class weights as given, or
    the plan's rule turned into numbers from these labels alone (:mod:`insitu.learn.balance`)."""
    k = max(2, num_outputs)
    if class_weights is ClassBalance.BALANCED:
        return loss_fn(num_outputs, balanced_weights(y, k))
    if class_weights is ClassBalance.LOGIT_ADJUST:
        return loss_fn(num_outputs, None, log_prior(y, k))
    return loss_fn(num_outputs, class_weights)


#: heavy-ball momentum of ``sgdm`` (torch.optim.SGD's convention: m ← βm + g, w ← w − lr·m)
MOMENTUM = 0.9


class _Optimizer:
    """Plain SGD, SGD with momentum, or Adam over a parameter list.

    Written out (a few tensor ops) rather than taken from ``torch.optim``: on the first
    step ``torch.optim`` imports the dynamo compiler stack, several seconds of start-up
    that a 13-parameter logistic regression at a hospital site should not pay.
    """

    def __init__(self, params: list[torch.Tensor], cfg: TrainConfig):
        self.params = params
        self.cfg = cfg
        self.t = 0
        if cfg.optimizer is OptimizerName.ADAM:
            self.m = [torch.zeros_like(p) for p in params]
            self.v = [torch.zeros_like(p) for p in params]
        elif cfg.optimizer is OptimizerName.SGDM:
            self.m = [torch.zeros_like(p) for p in params]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        self.update()

    def update(self) -> None:
        """:meth:`step` for a caller that already holds ``torch.no_grad()`` (one context per loop, not per step)."""
        cfg = self.cfg
        self.t += 1
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            g = p.grad
            if cfg.weight_decay:
                g = g.add(p, alpha=cfg.weight_decay)
            if cfg.optimizer is OptimizerName.ADAM:
                b1, b2, eps = 0.9, 0.999, 1e-8
                self.m[i].mul_(b1).add_(g, alpha=1 - b1)
                self.v[i].mul_(b2).addcmul_(g, g, value=1 - b2)
                mhat = self.m[i] / (1 - b1**self.t)
                vhat = self.v[i] / (1 - b2**self.t)
                p.addcdiv_(mhat, vhat.sqrt_().add_(eps), value=-cfg.lr)
            elif cfg.optimizer is OptimizerName.SGDM:
                self.m[i].mul_(MOMENTUM).add_(g)
                p.add_(self.m[i], alpha=-cfg.lr)
            else:
                p.add_(g, alpha=-cfg.lr)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> _Optimizer:
    return _Optimizer(list(model.parameters()), cfg)


def train_local(
    model: nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    cfg: TrainConfig,
    generator: torch.Generator,
    *,
    num_outputs: int,
    correction: list[torch.Tensor] | None = None,
    autograd: bool = False,
    track_loss: bool = True,
) -> dict[str, float]:
    """Run ``cfg.steps`` minibatch steps from the model's current parameters.

    ``correction`` (Scaffold's c − cᵢ, one tensor per parameter) is added to every gradient;
    ``cfg.prox_mu`` adds FedProx's μ/2·‖w − w_global‖² with w_global = the starting point.
    A logistic regression takes its gradient without autograd (:func:`_logistic_gradient`, the same
    bits); ``autograd=True`` forces autograd (the tests compare the two).  ``track_loss=False``: the
    mean training loss is not needed (baselines score the model only) and reported as NaN; the
    logistic regression then skips computing it, which changes nothing else.
    """
    n = X.shape[0]
    if n == 0:
        raise ConfigError("cannot train on a site with no training records")
    crit = site_loss(num_outputs, cfg.class_weights, y)
    opt = make_optimizer(model, cfg)
    anchor = [p.detach().clone() for p in model.parameters()] if cfg.prox_mu > 0 else None
    direct = None if autograd else _logistic_gradient(model, num_outputs, cfg)
    model.train()
    total = 0.0
    bs = min(cfg.batch_size, n)
    if direct is not None:
        with torch.no_grad():  # no graph anywhere: one context for the whole loop
            for _ in range(cfg.steps):
                idx = torch.randint(0, n, (bs,), generator=generator)
                xb = X[idx]
                if cfg.augment_shift and xb.dim() == 4:
                    xb = random_shift(xb, cfg.augment_shift, generator)
                loss = direct(xb, y[idx], track_loss)
                if correction is not None:
                    for p, c in zip(opt.params, correction):
                        p.grad.add_(c)
                opt.update()
                if track_loss:
                    total += float(loss)
        return {"train_loss": total / cfg.steps if track_loss else float("nan"), "num_samples": int(n), "steps": cfg.steps}
    for _ in range(cfg.steps):
        idx = torch.randint(0, n, (bs,), generator=generator)
        opt.zero_grad(set_to_none=True)
        xb = X[idx]
        if cfg.augment_shift and xb.dim() == 4:
            xb = random_shift(xb, cfg.augment_shift, generator)
        if cfg.augment_jitter is not None and xb.dim() == 4:
            xb = random_jitter(xb, cfg.augment_jitter, generator)
        loss = crit(model(xb), y[idx])
        if anchor is not None:
            prox = sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor))
            loss = loss + 0.5 * cfg.prox_mu * prox
        loss.backward()
        if correction is not None:
            for p, c in zip(model.parameters(), correction):
                p.grad.add_(c)
        opt.step()
        total += float(loss.detach())
    return {"train_loss": total / cfg.steps if track_loss else float("nan"), "num_samples": int(n), "steps": cfg.steps}


def _logistic_gradient(model: nn.Module, num_outputs: int, cfg: TrainConfig):
    """For a logistic regression (a flatten, then one linear layer with bias and one output, BCE loss,
    no class weights, no FedProx term): a function ``(xb, yb, with_loss) -> loss or None`` that sets the
    parameters' ``.grad`` without autograd (call it under ``torch.no_grad()``).  None for any other
    model or setting (autograd trains those).

    A heart step is a 4×13 product; autograd's graph and engine cost ~4× the arithmetic.  These
    are the very kernels autograd runs, in its order (``addmm`` forward; BCE-with-logits backward
    ``(σ(z) − y)·1 / n``; ``addmm``'s backward ``gᵀ·x`` for a transposed weight and a sum over
    the batch for the bias), so the parameters come out bit-identical: tests/learn/
    test_train_direct.py holds the two paths to ``torch.equal`` over thousands of steps.
    """
    if num_outputs != 1 or cfg.class_weights is not None or cfg.prox_mu > 0:
        return None
    from insitu.learn.spec import SpecModel

    layers = list(model.layers) if type(model) is SpecModel else list(model) if type(model) is nn.Sequential else []
    if len(layers) != 2 or type(layers[0]) is not nn.Flatten or type(layers[1]) is not nn.Linear:
        return None
    flat, lin = layers
    if (flat.start_dim, flat.end_dim) != (1, -1) or lin.bias is None or lin.out_features != 1:
        return None
    if any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for m in (model, flat, lin)):
        return None
    weight, bias = lin.weight, lin.bias
    bce = nn.functional.binary_cross_entropy_with_logits

    def step(xb: torch.Tensor, yb: torch.Tensor, with_loss: bool) -> torch.Tensor | None:
        x = xb.flatten(1)
        z = torch.addmm(bias, x, weight.t()).squeeze(-1)
        t = yb.float()
        loss = bce(z, t) if with_loss else None
        g = ((z.sigmoid() - t) / z.numel()).unsqueeze(-1)
        weight.grad = g.t().mm(x)
        bias.grad = g.sum(0)
        return loss

    return step


def random_shift(x: torch.Tensor, s: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``s`` pixels (edge padding): cheap augmentation that keeps
    a small CNN from memorising a site's few hundred X-rays."""
    b, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (s, s, s, s), mode="replicate")
    off = torch.randint(0, 2 * s + 1, (b, 2), generator=generator)
    c = x.shape[1]
    rows = (off[:, 0].view(b, 1, 1, 1) + torch.arange(h).view(1, 1, h, 1)).expand(b, c, h, w + 2 * s)
    cols = (off[:, 1].view(b, 1, 1, 1) + torch.arange(w).view(1, 1, 1, w)).expand(b, c, h, w)
    return torch.gather(torch.gather(padded, 2, rows), 3, cols)


def random_jitter(x: torch.Tensor, jitter: tuple[float, float, float], generator: torch.Generator) -> torch.Tensor:
    """Rotate each image by up to ``jitter[0]`` degrees, scale it by up to ±``jitter[1]`` (border
    padding) and stretch its contrast about its mean by up to ±``jitter[2]``: X-rays from another
    hospital's machine are framed and exposed a little differently."""
    b = x.shape[0]
    u = torch.rand(b, 3, generator=generator) * 2 - 1
    ang = u[:, 0] * (jitter[0] * math.pi / 180)
    inv = 1.0 / (1.0 + u[:, 1] * jitter[1])
    cos, sin = torch.cos(ang) * inv, torch.sin(ang) * inv
    zero = torch.zeros_like(cos)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    out = torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if jitter[2]:
        mean = out.mean(dim=(1, 2, 3), keepdim=True)
        out = (out - mean) * (1 + u[:, 2] * jitter[2]).view(b, 1, 1, 1) + mean
    return out


#: the most classes an evaluation reports per-class counts for (their lists travel in the reply)
MAX_CLASS_COUNTS = 1000


@torch.no_grad()
def evaluate(model: nn.Module, X: torch.Tensor, y: torch.Tensor, *, num_outputs: int, batch: int = 2048,
             by_class: bool = False) -> dict[str, Any]:
    """Loss, number correct and count; accuracy at a 0.5 threshold for binary tasks.

    ``by_class`` adds what worst-site and class-balanced figures need: ``n_by_class`` and
    ``correct_by_class`` (one count per class, up to :data:`MAX_CLASS_COUNTS` classes) and, for a
    binary task, ``auc`` (AUROC of the positive-class score; None when the split holds one class)."""
    model.eval()
    n = int(X.shape[0])
    classes = max(2, num_outputs)
    if n == 0:
        return {"loss": float("nan"), "correct": 0, "n": 0, "accuracy": float("nan")}
    crit = loss_fn(num_outputs)
    loss, correct = 0.0, 0
    hits = torch.zeros(classes, dtype=torch.long)
    scores = []
    for i in range(0, n, batch):
        out = model(X[i : i + batch])
        yb = y[i : i + batch]
        loss += float(crit(out, yb)) * yb.shape[0]
        pred = (out.squeeze(-1) > 0).long() if num_outputs == 1 else out.argmax(-1)
        ok = pred == yb.long()
        correct += int(ok.sum())
        if by_class:
            hits += torch.bincount(yb.long()[ok], minlength=classes)[:classes]
            if num_outputs == 1:
                scores.append(out.reshape(-1).double())
    res: dict[str, Any] = {"loss": loss / n, "correct": correct, "n": n, "accuracy": correct / n}
    if by_class and classes <= MAX_CLASS_COUNTS:
        res["n_by_class"] = torch.bincount(y.long(), minlength=classes)[:classes].tolist()
        res["correct_by_class"] = hits.tolist()
    if by_class and num_outputs == 1:
        from insitu.learn.metrics import auroc

        a = auroc(y.long().numpy(), torch.cat(scores).numpy())
        res["auc"] = a if np.isfinite(a) else None
    return res


@torch.no_grad()
def predict_scores(model: nn.Module, X: torch.Tensor, *, num_outputs: int) -> np.ndarray:
    """Probability of the positive class (binary) or class probabilities."""
    model.eval()
    out = model(X)
    if num_outputs == 1:
        return torch.sigmoid(out.squeeze(-1)).numpy()
    return torch.softmax(out, -1).numpy()


@contextlib.contextmanager
def torch_threads(threads: int = 1):
    """``threads`` torch threads inside the block (intra-op; restored after).  A training worker
    gets one by default: tiny models and thousands of small steps (shadow models, tests, the heart
    demo) run far faster single-threaded on a busy 2-core machine (measured 2.6 s vs 30 s per heart
    shadow model; a heart step 0.3-0.8 ms vs 5-14 ms)."""
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        from insitu.errors import ConfigError

        raise ConfigError(f"torch threads per worker must be a positive integer, got {threads!r}")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def single_thread():
    """One torch thread inside the block (see :func:`torch_threads`)."""
    return torch_threads(1)
