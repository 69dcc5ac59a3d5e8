"""One DP-SGD step: plain SGD vs Opacus vs insitu, same run, for two models.

* SmallCNN, batch 64, 28×28 images: Opacus's default per-sample mode and its ghost clipping.
* LSTM, batch 64, PhysioNet-2012-shaped records (48 hourly steps × 132 inputs, the models'
  hidden size, 32; ``--hidden``):
  insitu's LSTM (Linear cells; the recurrent layer's per-sample gradient is summed over the 48
  steps) against Opacus's ``DPLSTM`` (its per-sample-gradient LSTM, same sizes, Linear head).

    .venv/bin/python bench/dpsgd.py            # 200 timed steps each (CNN), 100 (LSTM)
    .venv/bin/python bench/dpsgd.py --quick    # 40 / 20 steps each
    .venv/bin/python bench/dpsgd.py --only lstm

Steps of the variants are interleaved (plain, opacus, ours, plain, ...) so that load from other
processes on the 2 shared cores hits all of them alike; the figure is the ratio of median step
times.  Baselines (BENCHMARKS.md, CNN): Opacus 2.7–3.4× plain (per-sample gradients), Opacus
ghost clipping about 2.0× plain, torch.func ~2.4×.
Target for insitu: ≤ 2.0× plain (CNN); faster than Opacus's DPLSTM (LSTM).
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings
from typing import Callable

import torch

from insitu.learn.dpsgd import ClippedGradients, DPSGDConfig, dp_sgd_step, per_sample_loss
from insitu.learn.models import build_model
from insitu.learn.sequence import GRUD, HIDDEN, LSTMClassifier


def timed(variants: dict[str, Callable[[], None]], steps: int, warmup: int = 5) -> dict[str, float]:
    """Median seconds per step of each variant, steps interleaved."""
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    for _ in range(steps):
        for name, fn in variants.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def report(title: str, med: dict[str, float], plain: str, ours: str, opacus: str) -> float:
    print(title)
    print(f"{'variant':<22}{'median ms/step':>16}{'× plain':>10}")
    for name, m in med.items():
        print(f"{name:<22}{m * 1e3:>16.2f}{m / med[plain]:>10.2f}")
    ratio = med[opacus] / med[ours]
    print(f"insitu vs {opacus}: {ratio:.2f}× faster ({med[ours] / med[plain]:.2f}× plain against {med[opacus] / med[plain]:.2f}×)\n")
    return ratio


def _ours(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, g: torch.Generator) -> Callable[[], None]:
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    clipper = ClippedGradients(model)
    loss = per_sample_loss(1)
    B = x.shape[0]
    dp = DPSGDConfig(noise_multiplier=1.0, clip=1.0, sampling_rate=B / 1000)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        dp_sgd_step(clipper, opt, x, y, loss, dp, float(B), g)

    return step


def _plain(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    bce = torch.nn.BCEWithLogitsLoss()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        bce(model(x).squeeze(-1), y.float()).backward()
        opt.step()

    return step


def _opacus(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    """GradSampleModule + DPOptimizer: the objects ``PrivacyEngine.make_private`` builds."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    warnings.filterwarnings("ignore")
    gsm = GradSampleModule(model)
    opt = DPOptimizer(torch.optim.SGD(gsm.parameters(), lr=0.01), noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=x.shape[0])
    bce = torch.nn.BCEWithLogitsLoss()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        bce(gsm(x).squeeze(-1), y.float()).backward()
        opt.step()

    return step


def _opacus_ghost(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    """Opacus 1.6's ghost clipping (``make_private(..., grad_sample_mode="ghost")`` builds these
    three objects): per-sample gradient norms from activations and backprops without per-sample
    gradients, then a second backward of the loss reweighted by the clipping coefficients."""
    from opacus.grad_sample import GradSampleModuleFastGradientClipping
    from opacus.optimizers import DPOptimizerFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

    gsm = GradSampleModuleFastGradientClipping(model, max_grad_norm=1.0, use_ghost_clipping=True, loss_reduction="mean")
    opt = DPOptimizerFastGradientClipping(torch.optim.SGD(gsm.parameters(), lr=0.01), noise_multiplier=1.0, max_grad_norm=1.0,
                                          expected_batch_size=x.shape[0], loss_reduction="mean")
    criterion = DPLossFastGradientClipping(gsm, opt, torch.nn.BCEWithLogitsLoss(reduction="mean"), loss_reduction="mean")

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        criterion(gsm(x).squeeze(-1), y.float()).backward()  # both backward passes
        opt.step()

    return step


class LastStateLSTM(torch.nn.Module):
    """An LSTM over the raw [T, 3V] record (Opacus's DPLSTM, or torch's fused nn.LSTM), last
    hidden state to a Linear head."""

    def __init__(self, inputs: int, hidden: int, dp: bool):
        super().__init__()
        from opacus.layers import DPLSTM

        self.lstm = (DPLSTM if dp else torch.nn.LSTM)(inputs, hidden, batch_first=True)
        self.head = torch.nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


def cnn(B: int, steps: int, g: torch.Generator) -> float:
    x = torch.randn(B, 1, 28, 28, generator=g)
    y = torch.randint(0, 2, (B,), generator=g)
    variants = {
        "plain SGD": _plain(build_model("cnn", (1, 28, 28), 1, seed=0), x, y),
        "Opacus 1.6": _opacus(build_model("cnn", (1, 28, 28), 1, seed=0), x, y),
        "Opacus ghost": _opacus_ghost(build_model("cnn", (1, 28, 28), 1, seed=0), x, y),
        "insitu DP-SGD": _ours(build_model("cnn", (1, 28, 28), 1, seed=0), x, y, g),
    }
    med = timed(variants, steps, warmup=10)
    report(f"SmallCNN, batch {B}, {steps} steps each", med, "plain SGD", "insitu DP-SGD", "Opacus 1.6")
    print(f"insitu vs Opacus ghost clipping: {med['Opacus ghost'] / med['insitu DP-SGD']:.2f}× faster")
    r = med["insitu DP-SGD"] / med["plain SGD"]
    print(f"target ≤ 2.0× plain: {'met' if r <= 2.0 else 'NOT met'} ({r:.2f}×)\n")
    return r


def lstm(B: int, steps: int, g: torch.Generator, T: int = 48, V: int = 44, hidden: int = HIDDEN) -> float:
    mask = (torch.rand(B, T, V, generator=g) < 0.3).float()
    delta = torch.zeros(B, T, V)
    for t in range(1, T):
        delta[:, t] = 1 + (1 - mask[:, t - 1]) * delta[:, t - 1]
    x = torch.cat([torch.randn(B, T, V, generator=g) * mask, mask, delta], -1)
    y = torch.randint(0, 2, (B,), generator=g)
    variants = {
        "plain SGD (ours)": _plain(LSTMClassifier((T, 3 * V), 1, hidden=hidden), x, y),
        "plain SGD nn.LSTM": _plain(LastStateLSTM(3 * V, hidden, dp=False), x, y),  # torch's fused LSTM
        "Opacus 1.6 DPLSTM": _opacus(LastStateLSTM(3 * V, hidden, dp=True), x, y),
        "insitu DP-SGD LSTM": _ours(LSTMClassifier((T, 3 * V), 1, hidden=hidden), x, y, g),
        "insitu DP-SGD GRU-D": _ours(GRUD((T, 3 * V), 1, hidden=hidden), x, y, g),
    }
    med = timed(variants, steps)
    return report(f"LSTM, batch {B}, {T} steps × {3 * V} inputs, hidden {hidden}, {steps} steps each",
                  med, "plain SGD (ours)", "insitu DP-SGD LSTM", "Opacus 1.6 DPLSTM")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="40 CNN / 20 LSTM steps instead of 200 / 100")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per variant (both models)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--only", choices=("all", "cnn", "lstm"), default="all")
    ap.add_argument("--hidden", type=int, default=HIDDEN, help="LSTM hidden size (every variant)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 keeps the shared box quiet and timings stable)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    print(f"torch threads {args.threads}\n")
    if args.only in ("all", "cnn"):
        cnn(args.batch, args.steps or (40 if args.quick else 200), g)
    if args.only in ("all", "lstm"):
        lstm(args.batch, args.steps or (20 if args.quick else 100), g, hidden=args.hidden)


if __name__ == "__main__":
    main()
