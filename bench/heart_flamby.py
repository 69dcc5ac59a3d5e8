"""Every strategy × 5 seeds on Fed-Heart-Disease, beside FLamby's published figures.

    .venv/bin/python bench/heart_flamby.py            # full: 6 strategies + pooled + local, 5 seeds
    .venv/bin/python bench/heart_flamby.py --quick    # 2 seeds

FLamby figures (owkin/FLamby, Fed-Heart-Disease, mean accuracy over the 4 centres,
± sd over 5 seeds) are quoted from ../shared/BENCHMARKS.md; FLamby itself is not
installed here, so the ratio is ours / published on the same metric, data and splits.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from rich.console import Console
from rich.table import Table

from insitu.apps.simulate import simulate

FLAMBY = {
    "pooled": 0.735, "local (best site)": 0.722, "fedavg": 0.685, "fedprox": 0.685, "scaffold": 0.684,
    "fedadam": 0.726, "fedyogi": 0.731, "fedadagrad": 0.731,
}
STRATEGIES = ["fedavg", "fedprox", "scaffold", "fedadam", "fedyogi", "fedadagrad"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="2 seeds")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--normalize", default="site", help="site (FLamby's recipe, the comparable one) or federated")
    args = ap.parse_args()
    torch.set_num_threads(1)
    seeds = range(2 if args.quick else args.seeds)
    results: dict[str, list[float]] = {k: [] for k in ["pooled", "local (best site)", *STRATEGIES]}
    t0 = time.perf_counter()
    for seed in seeds:
        for i, strat in enumerate(STRATEGIES):
            s = simulate(strategy=strat, seed=seed, rounds=args.rounds, normalize=args.normalize, baselines=(i == 0), write=False)
            results[strat].append(s["final"]["mean_site_accuracy"])
            if i == 0:
                results["pooled"].append(s["baselines"]["pooled"]["mean_site_accuracy"])
                results["local (best site)"].append(s["baselines"]["local_only"]["best_site_model_mean_accuracy"])
    table = Table(title=f"Fed-Heart-Disease ({args.normalize} z-scoring), mean site accuracy over {len(seeds)} seeds ({time.perf_counter() - t0:.0f} s)")
    for col in ("method", "insitu", "± sd", "FLamby", "ratio"):
        table.add_column(col, justify="right" if col != "method" else "left")
    for k, vals in results.items():
        m = statistics.mean(vals)
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        table.add_row(k, f"{m:.3f}", f"{sd:.3f}", f"{FLAMBY[k]:.3f}", f"{m / FLAMBY[k]:.3f}")
    Console().print(table)
    best = max(STRATEGIES, key=lambda k: statistics.mean(results[k]))
    print(f"best federated: {best} {statistics.mean(results[best]):.3f} (target >= 0.731); "
          f"pooled {statistics.mean(results['pooled']):.3f} (>= 0.735); fedavg {statistics.mean(results['fedavg']):.3f} (>= 0.685)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
