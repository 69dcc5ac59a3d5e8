"""How far honest sites' updates stray from the round's median: the evidence for ``update_norm_factor``.

Under ``protection = plain`` the coordinator refuses a site's per-record update whose L2 norm is
above ``update_norm_factor`` × the round's median (insitu.federation.robust).  This runs honest
federations of the project's recipes and prints, for each, the largest norm / median ratio any
site reached in any round (Scaffold: the larger of its model and control-variate parts), beside the
default factor, as a ratio: the margin an honest run keeps.  A run that refused an honest update
would show it in the last column.

    nice -n 10 python bench/honest_update_ratios.py [--only heart-demo,scaffold] [--physionet-rounds 5]

Each run is a normal ``insitu simulate`` (one torch thread); only the screen is observed.
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from insitu.federation import robust

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

CASES: dict[str, dict] = {
    "heart-demo": {"recipe": "consortium"},  # `make demo`: fedyogi, federated z-scoring, 30 rounds
    "heart-flamby": {},  # the deployed recipe: fedavg, 30 rounds
    "heart-fedprox": {"strategy": "fedprox", "mu": 0.1},
    "heart-scaffold": {"strategy": "scaffold"},
    "heart-dp-record": {"dp": "record", "epsilon": 1.0},
    "heart-topk": {"compress": "topk:0.1"},
    "heart-int8": {"compress": "int8"},
    "pneumoniamnist-10": {"dataset": "pneumoniamnist", "data": str(DATA / "pneumoniamnist.npz"), "rounds": 10},
    "pneumoniamnist-scaffold": {"dataset": "pneumoniamnist", "data": str(DATA / "pneumoniamnist.npz"), "rounds": 10,
                                "strategy": "scaffold", "optimizer": "sgd", "select": "last"},
    "physionet-small": {"dataset": "physionet2012", "data": str(DATA / "physionet2012"), "rounds": 5},
    "heart-dp-site": {"dp": "site", "epsilon": 5.0},
    "heart-8-sites-iid": {"sites": 8, "partition": "iid"},
    "pneumoniamnist-dirichlet0.3-8": {"dataset": "pneumoniamnist", "data": str(DATA / "pneumoniamnist.npz"), "rounds": 5,
                                       "sites": 8, "partition": "dirichlet:0.3", "select": "last"},
    "pneumoniamnist-dp-record": {"dataset": "pneumoniamnist", "data": str(DATA / "pneumoniamnist.npz"), "rounds": 5,
                                 "dp": "record", "epsilon": 8.0},
    # cross-device (insitu cross-device): 1,000 synthetic wearables, 5 % sampled a round, 10 % offline
    "crossdevice": {"crossdevice": True, "rounds": 30},
    "crossdevice-topk": {"crossdevice": True, "rounds": 30, "compress": "topk:0.1"},
}


class Observer:
    """Wraps UpdateScreen.screen: records every round's ratios and refusals."""

    def __init__(self) -> None:
        self.ratios: list[float] = []
        self.refused: list[str] = []
        self.rounds = 0
        self._orig = robust.UpdateScreen.screen

    def __enter__(self) -> "Observer":
        obs, orig = self, self._orig

        def screen(self_, plan, updates):
            out = orig(self_, plan, updates)
            if len(updates) >= robust.MIN_SCREENED:
                obs.ratios.extend(self_.ratios(updates).values())
                obs.rounds += 1
            obs.refused.extend(f"round {plan.round} {s}: {why}" for s, why in out.items())
            return out

        robust.UpdateScreen.screen = screen
        return self

    def __exit__(self, *exc) -> None:
        robust.UpdateScreen.screen = self._orig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help="comma-separated case names (default: all)")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds")
    ap.add_argument("--physionet-rounds", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from insitu.apps.simulate import simulate

    names = [n for n in args.only.split(",") if n] or list(CASES)
    factor = robust.DEFAULT_NORM_FACTOR
    print(f"{'case':28s} {'seed':>4s} {'rounds':>6s} {'max ratio':>10s} {'p99 ratio':>10s} {'factor/max':>10s} {'refused':>7s} {'s':>6s}")
    overall = 0.0
    for name in names:
        opts = dict(CASES[name])
        if name.startswith("physionet"):
            opts["rounds"] = args.physionet_rounds
        for seed in (int(s) for s in args.seeds.split(",")):
            t0 = time.perf_counter()
            with Observer() as obs:
                if opts.get("crossdevice"):
                    from insitu.compress.crossdevice import CrossDeviceConfig, cross_device

                    cross_device(CrossDeviceConfig(**{k: v for k, v in opts.items() if k != "crossdevice"}, seed=seed))
                else:
                    simulate(**opts, seed=seed, baselines=False, write=False)
            r = sorted(obs.ratios)
            top = r[-1] if r else math.nan
            p99 = r[min(len(r) - 1, int(0.99 * len(r)))] if r else math.nan
            overall = max(overall, top) if r else overall
            print(f"{name:28s} {seed:4d} {obs.rounds:6d} {top:10.3f} {p99:10.3f} {factor / top:10.1f} {len(obs.refused):7d} "
                  f"{time.perf_counter() - t0:6.1f}", flush=True)
            for line in obs.refused[:3]:
                print(f"    refused: {line}")
    print(f"largest honest ratio over all cases: {overall:.3f}; default update_norm_factor {factor:g} "
          f"= {factor / overall:.1f}x that")


if __name__ == "__main__":
    main()
