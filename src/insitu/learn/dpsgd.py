"""Record-level DP-SGD (Abadi et al. 2016) with fast per-sample clipping.

One step: Poisson-sample a batch (each record independently with probability q, which is
what the accountant's subsampled-Gaussian analysis assumes), clip every record's gradient to
L2 norm C, sum, add N(0, (zC)²), divide by the *expected* batch size qn, and let the optimizer
step.

Why it is fast — the "book-keeping" trick (Bu et al. 2022, after Goodfellow 2015 and the ghost
clipping of Li et al. 2021): for a Linear or Conv2d layer the per-sample gradient is a product
of the layer's input activations ``a`` (kept by a forward hook) and the gradient of the loss
with respect to the layer's output ``g`` (one ``autograd.grad`` call to the layer outputs,
which skips every weight gradient).  From ``a`` and ``g`` we get

* per-sample norms:  Linear  ‖gᵢ aᵢᵀ‖² = ‖aᵢ‖²‖gᵢ‖²  (no per-sample gradient at all);
  layers with T positions (Conv2d via unfold, sequence Linear) either as the ghost norm
  Σ_{t,t'} (aᵢₜ·aᵢₜ')(gᵢₜ·gᵢₜ') when 2T² < (in × out), or from the per-sample gradient
  (a batched matmul) otherwise — whichever is cheaper, per layer;
* the clipped sum:  Σᵢ sᵢ gᵢ aᵢᵀ = (s ⊙ G)ᵀ A, one matmul, *without a second backward pass*.

So a step costs one forward, one backward without weight gradients, and a few small
matmuls, instead of Opacus's per-sample gradient materialisation for every layer.

Supported parameterised layers: ``nn.Linear``, ``nn.Conv2d`` (groups = 1, numeric padding,
zero padding mode) and :class:`insitu.learn.sequence.Diagonal` (an elementwise affine map).
Any other layer with trainable parameters is refused (BatchNorm in particular mixes records and
breaks per-sample clipping).

Recurrent models: a Linear layer may run several times in one forward pass (the hidden-to-hidden
layer of an LSTM or GRU cell, once per time step).  Its weight is shared across the calls, so a
record's gradient is the sum over calls of gᵢₖ aᵢₖᵀ — exactly a sequence Linear whose positions
are the calls, and it is handled as one (ghost norm or per-sample gradient).  Every call must
see the whole batch, one row per record, in the same order.
"""
from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from insitu.errors import ConfigError
from insitu.learn.sequence import Diagonal
from insitu.learn.train import TrainConfig, make_optimizer


def per_sample_loss(num_outputs: int, class_weights: tuple[float, ...] | None = None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Summed loss, so that its gradient with respect to record i's output is record i's gradient
    (times its class's weight, when the task weighs classes: clipping comes after, so the bound holds)."""
    if isinstance(class_weights, str):  # a rule (balanced, logit-adjust): weights from the data, outside the clip bound
        raise ConfigError(f"DP-SGD takes fixed class weights only, not the data-derived rule {class_weights!r} (the plan refuses it)")
    if class_weights is not None:
        w = torch.tensor(class_weights, dtype=torch.float32)
        if num_outputs == 1:
            return lambda out, y: (F.binary_cross_entropy_with_logits(out.reshape(out.shape[0], -1)[:, 0], y.float(), reduction="none")
                                   * w[y.long()]).sum()
        return lambda out, y: (F.cross_entropy(out, y.long(), reduction="none") * w[y.long()]).sum()
    if num_outputs == 1:
        return lambda out, y: F.binary_cross_entropy_with_logits(out.reshape(out.shape[0], -1)[:, 0], y.float(), reduction="sum")
    return lambda out, y: F.cross_entropy(out, y.long(), reduction="sum")


class _Layer:
    __slots__ = ("module", "acts", "outs")

    def __init__(self, module: nn.Module):
        self.module = module
        self.acts: list[torch.Tensor] = []  # one per call in the forward pass (recurrent layers: per step)
        self.outs: list[torch.Tensor] = []


class ClippedGradients:
    """Computes Σᵢ clip(∇ℓᵢ, C) for a model of Linear/Conv2d/Diagonal layers, plus every per-sample norm."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.layers: list[_Layer] = []
        self._handles: list[Any] = []
        covered: set[int] = set()
        for name, mod in model.named_modules():
            own = [p for p in mod.parameters(recurse=False) if p.requires_grad]
            if not own:
                continue
            if isinstance(mod, nn.Conv2d):
                if mod.groups != 1 or isinstance(mod.padding, str) or mod.padding_mode != "zeros":
                    raise ConfigError(f"DP-SGD supports Conv2d with groups=1 and numeric zero padding; layer {name!r} is {mod}")
            elif not isinstance(mod, (nn.Linear, Diagonal)):
                raise ConfigError(f"DP-SGD cannot clip per-sample gradients of layer {name!r} ({type(mod).__name__}); "
                                  "use Linear/Conv2d layers (no BatchNorm: it mixes records)")
            layer = _Layer(mod)
            self._handles.append(mod.register_forward_hook(self._hook(layer)))
            self.layers.append(layer)
            covered.update(id(p) for p in own)
        missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in covered]
        if missing:
            raise ConfigError(f"DP-SGD found parameters outside supported layers: {missing}")
        self._capturing = False

    def close(self) -> None:
        """Remove the forward hooks (the model is then exactly as before)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> "ClippedGradients":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _hook(self, layer: _Layer):
        def hook(mod: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            if not self._capturing:
                return
            if layer.outs and isinstance(mod, nn.Conv2d):
                raise ConfigError(f"layer {mod} ran twice in one forward pass; only Linear and Diagonal layers may repeat "
                                  "(a recurrent cell, once per time step)")
            layer.acts.append(inputs[0].detach())
            layer.outs.append(out)

        return hook

    def compute(self, x: torch.Tensor, y: torch.Tensor, loss: Callable, clip: float) -> tuple[list[torch.Tensor], torch.Tensor, float]:
        """(clipped-sum gradient per parameter in ``model.parameters()`` order, per-sample norms, summed loss)."""
        if not (clip > 0 and math.isfinite(clip)):
            raise ConfigError(f"clip norm must be a positive number, got {clip!r}")
        self._clear()
        self._capturing = True
        try:
            total = loss(self.model(x), y)
        finally:
            self._capturing = False
        if any(not layer.outs for layer in self.layers):
            self._clear()
            raise ConfigError("a parameterised layer did not run in the forward pass")
        B = x.shape[0]
        for layer in self.layers:
            if len(layer.outs) > 1 and any(a.shape[0] != B for a in layer.acts):
                self._clear()
                raise ConfigError(f"layer {layer.module} ran on a batch of other than {B} rows; a repeated layer must see one row per record")
        outs = [o for layer in self.layers for o in layer.outs]
        backprops = list(torch.autograd.grad(total, outs, allow_unused=True))
        sq = torch.zeros(B, dtype=x.dtype)
        prepared = []
        for layer in self.layers:
            gs = [torch.zeros_like(o) if g is None else g.detach() for o, g in zip(layer.outs, backprops)]
            del backprops[: len(layer.outs)]
            kind, a, g2, per = self._prepare(layer.module, *self._stack(layer.acts, gs))
            sq += self._sq_norms(layer.module, kind, a, g2, per)
            prepared.append((layer.module, kind, a, g2, per))
        norms = sq.sqrt()
        scale = (clip / (norms + 1e-6)).clamp(max=1.0)
        grads: dict[int, torch.Tensor] = {}
        for mod, kind, a, g2, per in prepared:
            w, b = self._clipped_sum(mod, kind, a, g2, per, scale)
            grads[id(mod.weight)] = w.view_as(mod.weight)
            if mod.bias is not None and mod.bias.requires_grad:
                grads[id(mod.bias)] = b
        self._clear()
        ordered = [grads[id(p)] for p in self.model.parameters() if p.requires_grad]
        return ordered, norms, float(total.detach())

    def _clear(self) -> None:
        for layer in self.layers:
            layer.acts, layer.outs = [], []

    # -- per layer ---------------------------------------------------------------------------
    @staticmethod
    def _stack(acts: list[torch.Tensor], grads: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """One call: as it is.  Several calls of a shared layer: all their positions, (B, positions, features)."""
        if len(acts) == 1:
            return acts[0], grads[0]
        B = acts[0].shape[0]
        return (torch.cat([a.reshape(B, -1, a.shape[-1]) for a in acts], 1),
                torch.cat([g.reshape(B, -1, g.shape[-1]) for g in grads], 1))

    @staticmethod
    def _prepare(mod: nn.Module, a: torch.Tensor, g: torch.Tensor):
        """Bring (activation, backprop) into (B, T, K) / (B, T, O) form, or (B, K) / (B, O)."""
        B = a.shape[0]
        if isinstance(mod, Diagonal):  # per-sample gradients (B, F) directly: Σₜ gₜ ⊙ aₜ and Σₜ gₜ
            a = a.reshape(B, -1, a.shape[-1])
            g = g.reshape(B, -1, g.shape[-1])
            return "diagonal", None, g.sum(1), (a * g).sum(1)
        if isinstance(mod, nn.Conv2d):
            a = F.unfold(a, mod.kernel_size, dilation=mod.dilation, padding=mod.padding, stride=mod.stride)  # B, K, T
            g = g.reshape(B, g.shape[1], -1)  # B, O, T
            K, T, O = a.shape[1], a.shape[2], g.shape[1]
            if 2 * T * T < K * O:
                return "ghost_t", a.transpose(1, 2), g.transpose(1, 2), None  # B,T,K / B,T,O
            return "per_sample", a, g, torch.bmm(g, a.transpose(1, 2))  # B, O, K
        if a.dim() == 2:
            return "linear", a, g, None
        a = a.reshape(B, -1, a.shape[-1])
        g = g.reshape(B, -1, g.shape[-1])
        T, K, O = a.shape[1], a.shape[2], g.shape[2]
        if 2 * T * T < K * O:
            return "ghost_t", a, g, None
        return "per_sample", a.transpose(1, 2), g.transpose(1, 2), torch.bmm(g.transpose(1, 2), a)  # B,O,K

    @staticmethod
    def _sq_norms(mod: nn.Module, kind: str, a, g, per) -> torch.Tensor:
        has_bias = mod.bias is not None and mod.bias.requires_grad
        if kind == "diagonal":
            out = (per * per).sum(1)
            return out + (g * g).sum(1) if has_bias else out
        if kind == "linear":
            gg = (g * g).sum(1)
            out = (a * a).sum(1) * gg
            return out + gg if has_bias else out
        if kind == "ghost_t":
            out = (torch.bmm(a, a.transpose(1, 2)) * torch.bmm(g, g.transpose(1, 2))).sum((1, 2))
            if has_bias:
                out = out + (g.sum(1) ** 2).sum(1)
            return out
        out = (per * per).sum((1, 2))
        if has_bias:
            out = out + (g.sum(2) ** 2).sum(1)  # g is B, O, T here
        return out

    @staticmethod
    def _clipped_sum(mod: nn.Module, kind: str, a, g, per, s: torch.Tensor):
        if kind == "diagonal":
            return s @ per, s @ g
        if kind == "linear":
            gs = g * s[:, None]
            return gs.t() @ a, gs.sum(0)
        if kind == "ghost_t":
            gs = g * s[:, None, None]  # B, T, O
            w = torch.einsum("bto,btk->ok", gs, a)
            return w, gs.sum((0, 1))
        B = per.shape[0]
        w = (s @ per.reshape(B, -1)).view(per.shape[1], per.shape[2])
        return w, s @ g.sum(2)


@dataclass(frozen=True)
class DPSGDConfig:
    """Per-site DP-SGD parameters.  ``sampling_rate`` q is batch_size / n_train (Poisson)."""

    noise_multiplier: float
    clip: float
    sampling_rate: float

    def __post_init__(self) -> None:
        if not (self.noise_multiplier > 0 and math.isfinite(self.noise_multiplier)):
            raise ConfigError(f"DP-SGD noise multiplier must be a positive number, got {self.noise_multiplier!r}")
        if not (self.clip > 0 and math.isfinite(self.clip)):
            raise ConfigError(f"DP-SGD clip norm must be a positive number, got {self.clip!r}")
        if not (0 < self.sampling_rate <= 1):
            raise ConfigError(f"DP-SGD sampling rate must be in (0, 1], got {self.sampling_rate!r}")


def dp_sgd_step(clipper: ClippedGradients, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, loss: Callable,
                dp: DPSGDConfig, expected_batch: float, generator: torch.Generator,
                extra: list[torch.Tensor] | None = None) -> tuple[float, torch.Tensor]:
    """One private step on the already-sampled batch (x, y); returns (summed loss, per-sample norms).

    ``extra`` (one tensor per parameter, data-independent: FedProx pull, Scaffold correction) is
    added after the noise; it depends on no record, so it costs no privacy.
    """
    params = [p for p in clipper.model.parameters() if p.requires_grad]
    if x.shape[0] > 0:
        grads, norms, total = clipper.compute(x, y, loss, dp.clip)
    else:
        grads, norms, total = [torch.zeros_like(p) for p in params], torch.zeros(0), 0.0
    std = dp.noise_multiplier * dp.clip
    for p, g in zip(params, grads):
        noise = torch.randn(p.shape, generator=generator, dtype=p.dtype) * std
        p.grad = (g + noise) / expected_batch
    if extra is not None:
        for p, e in zip(params, extra):
            p.grad.add_(e)
    opt.step()
    return total, norms


def dp_sgd_train(
    model: nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    cfg: TrainConfig,
    dp: DPSGDConfig,
    generator: torch.Generator,
    *,
    num_outputs: int,
    correction: list[torch.Tensor] | None = None,
    noise_generator: torch.Generator | None = None,
) -> dict[str, Any]:
    """``cfg.steps`` DP-SGD steps with Poisson sampling at rate ``dp.sampling_rate``.

    ``generator`` draws the Poisson samples; the noise comes from ``noise_generator``, by default
    seeded from the operating system: a noise stream someone can replay protects nothing.

    Accounting for these steps is the caller's (the site's ledger charges
    ``PrivacyEvent(GAUSSIAN, z, q, steps)`` before calling this).
    """
    n = int(X.shape[0])
    if n == 0:
        raise ConfigError("cannot train on a site with no training records")
    noise = noise_generator or torch.Generator().manual_seed(secrets.randbits(63))
    with ClippedGradients(model) as clipper:
        return _train(clipper, model, X, y, cfg, dp, generator, noise, num_outputs, correction)


def _train(clipper, model, X, y, cfg, dp, generator, noise, num_outputs, correction) -> dict[str, Any]:
    n = int(X.shape[0])
    loss = per_sample_loss(num_outputs, cfg.class_weights)
    opt = make_optimizer(model, cfg)
    anchor = [p.detach().clone() for p in model.parameters()] if cfg.prox_mu > 0 else None
    expected = dp.sampling_rate * n
    model.train()
    total_loss, seen, clipped, batch_sizes = 0.0, 0, 0, 0
    for _ in range(cfg.steps):
        mask = torch.rand(n, generator=generator) < dp.sampling_rate
        idx = mask.nonzero(as_tuple=True)[0]
        extra = None
        if anchor is not None or correction is not None:
            extra = [torch.zeros_like(p) for p in model.parameters()]
            if anchor is not None:
                for e, p, a in zip(extra, model.parameters(), anchor):
                    e.add_(cfg.prox_mu * (p.detach() - a))
            if correction is not None:
                for e, c in zip(extra, correction):
                    e.add_(c)
        opt.zero_grad(set_to_none=True)
        lsum, norms = dp_sgd_step(clipper, opt, X[idx], y[idx], loss, dp, expected, noise, extra)
        total_loss += lsum
        seen += int(idx.numel())
        clipped += int((norms > dp.clip).sum())
        batch_sizes += int(idx.numel())
    return {
        "train_loss": total_loss / max(1, seen),
        "num_samples": n,
        "steps": cfg.steps,
        "dp_noise_multiplier": dp.noise_multiplier,
        "dp_clip": dp.clip,
        "dp_sampling_rate": dp.sampling_rate,
        "dp_mean_batch": batch_sizes / cfg.steps,
        "dp_clipped_fraction": clipped / max(1, seen),
    }


__all__ = ["ClippedGradients", "DPSGDConfig", "dp_sgd_step", "dp_sgd_train", "per_sample_loss"]
