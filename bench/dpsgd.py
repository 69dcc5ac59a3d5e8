"""One DP-SGD step of the SmallCNN (batch 64, 28×28): plain SGD vs Opacus (both modes) vs insitu, same run.

    .venv/bin/python bench/dpsgd.py            # 200 timed steps each
    .venv/bin/python bench/dpsgd.py --quick    # 40 steps each

Steps of the three variants are interleaved (plain, opacus, ours, plain, ...) so that load
from other processes on the 2 shared cores hits all three alike; the figure is the ratio of
median step times.  Baselines (BENCHMARKS.md): Opacus 2.7–3.4× plain (per-sample gradients),
Opacus ghost clipping about 2.0× plain, torch.func ~2.4×.
Target for insitu: ≤ 2.0× plain.
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

from insitu.learn.dpsgd import ClippedGradients, DPSGDConfig, dp_sgd_step, per_sample_loss
from insitu.learn.models import build_model


def opacus_ghost_variant(x: torch.Tensor, y: torch.Tensor, batch: int):
    """Opacus 1.6's ghost clipping (``make_private(..., grad_sample_mode="ghost")`` builds these
    three objects): per-sample gradient norms from activations and backprops without per-sample
    gradients, then a second backward of the loss reweighted by the clipping coefficients."""
    from opacus.grad_sample import GradSampleModuleFastGradientClipping
    from opacus.optimizers import DPOptimizerFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

    model = GradSampleModuleFastGradientClipping(build_model("cnn", (1, 28, 28), 1, seed=0), max_grad_norm=1.0, use_ghost_clipping=True,
                                                 loss_reduction="mean")
    opt = DPOptimizerFastGradientClipping(torch.optim.SGD(model.parameters(), lr=0.01), noise_multiplier=1.0, max_grad_norm=1.0,
                                          expected_batch_size=batch, loss_reduction="mean")
    criterion = DPLossFastGradientClipping(model, opt, torch.nn.BCEWithLogitsLoss(reduction="mean"), loss_reduction="mean")

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        criterion(model(x).squeeze(-1), y.float()).backward()  # both backward passes
        opt.step()

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="40 steps instead of 200")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 keeps the shared box quiet and timings stable)")
    args = ap.parse_args()
    steps = args.steps or (40 if args.quick else 200)
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    B = args.batch
    x = torch.randn(B, 1, 28, 28, generator=g)
    y = torch.randint(0, 2, (B,), generator=g)

    # plain SGD
    plain = build_model("cnn", (1, 28, 28), 1, seed=0)
    plain_opt = torch.optim.SGD(plain.parameters(), lr=0.01)
    bce = torch.nn.BCEWithLogitsLoss()

    def plain_step() -> None:
        plain_opt.zero_grad(set_to_none=True)
        bce(plain(x).squeeze(-1), y.float()).backward()
        plain_opt.step()

    # Opacus (GradSampleModule + DPOptimizer, the objects make_private builds)
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    warnings.filterwarnings("ignore")
    op_model = GradSampleModule(build_model("cnn", (1, 28, 28), 1, seed=0))
    op_opt = DPOptimizer(torch.optim.SGD(op_model.parameters(), lr=0.01), noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=B)

    def opacus_step() -> None:
        op_opt.zero_grad(set_to_none=True)
        bce(op_model(x).squeeze(-1), y.float()).backward()
        op_opt.step()

    # insitu
    ours = build_model("cnn", (1, 28, 28), 1, seed=0)
    ours_opt = torch.optim.SGD(ours.parameters(), lr=0.01)
    clipper = ClippedGradients(ours)
    loss = per_sample_loss(1)
    dp = DPSGDConfig(noise_multiplier=1.0, clip=1.0, sampling_rate=B / 1000)

    def ours_step() -> None:
        ours_opt.zero_grad(set_to_none=True)
        dp_sgd_step(clipper, ours_opt, x, y, loss, dp, float(B), g)

    variants = {"plain SGD": plain_step, "Opacus 1.6": opacus_step, "Opacus ghost": opacus_ghost_variant(x, y, B), "insitu DP-SGD": ours_step}
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(10):  # warm-up
        for fn in variants.values():
            fn()
    for _ in range(steps):
        for name, fn in variants.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    base = statistics.median(times["plain SGD"])
    print(f"SmallCNN, batch {B}, {steps} steps each, torch threads {args.threads}")
    print(f"{'variant':<16}{'median ms/step':>16}{'× plain':>10}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:<16}{med * 1e3:>16.2f}{med / base:>10.2f}")
    ours_r = statistics.median(times["insitu DP-SGD"]) / base
    op_r = statistics.median(times["Opacus 1.6"]) / base
    ghost_r = statistics.median(times["Opacus ghost"]) / base
    print(f"insitu vs Opacus: {op_r / ours_r:.2f}× faster (per-sample mode), {ghost_r / ours_r:.2f}× faster (ghost clipping); "
          f"target ≤ 2.0× plain: {'met' if ours_r <= 2.0 else 'NOT met'} ({ours_r:.2f}×)")


if __name__ == "__main__":
    main()
