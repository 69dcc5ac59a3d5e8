"""Bytes on the wire vs accuracy for each ``--compress`` setting, against dense float32 in the same run.

    .venv/bin/python bench/compress.py --data ../shared/data/pneumoniamnist.npz          # 30 rounds
    .venv/bin/python bench/compress.py --data ../shared/data/pneumoniamnist.npz --quick  # 10 rounds, 4 settings

Every setting runs the real round engine (``insitu.apps.simulate.simulate``) on
PneumoniaMNIST, 4 hospitals, Dirichlet(0.5) label skew, the small CNN, FedAvg, the same seed;
only ``compress`` changes.  Bytes are what the in-process transport encoded for each
TRAIN_REPLY (site → coordinator), i.e. what a deployment would send.  The target of issue 9:
≥ 10× fewer bytes for ≤ 1 accuracy point lost.  Accuracy is on all 624 official test images;
"last-5" is the mean over the last five rounds: with this label skew the dense run's accuracy
swings by several points from round to round, so the target is checked on both figures.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from insitu.apps.simulate import simulate

SETTINGS = ["none", "int8", "topk:0.1", "topk:0.1+int8", "topk:0.01", "topk:0.01+int8", "shared:0.1+int8", "shared:0.01+int8"]
QUICK = ["none", "int8", "topk:0.1+int8", "topk:0.01+int8"]
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "pneumoniamnist.npz"


def run(setting: str, args: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    out = Path(tempfile.mkdtemp(prefix="bench-compress-")) / setting.replace(":", "_").replace("+", "_")
    s = simulate(dataset="pneumoniamnist", data=str(args.data), rounds=args.rounds, seed=args.seed, compress=setting, baselines=False, out=str(out))
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    curve = [h["pooled_accuracy"] for h in rounds if h["status"] == "ok"]
    shutil.rmtree(out.parent, ignore_errors=True)
    per_site = s["final"]["bytes_up_per_round_per_site"]
    return {
        "setting": setting,
        "bytes_up_per_site_round": float(np.mean(list(per_site.values()))),
        "accuracy": s["final"]["pooled_accuracy"],
        "mean_site_accuracy": s["final"]["mean_site_accuracy"],
        "last5_accuracy": float(np.mean(curve[-5:])),
        "curve": curve,
        "seconds": time.perf_counter() - t0,
        "config": {k: s["config"].get(k) for k in ("model", "optimizer", "lr", "batch_size", "local_steps", "partition", "sites", "lr_schedule")},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="PneumoniaMNIST .npz")
    ap.add_argument("--quick", action="store_true", help="10 rounds, 4 settings")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--settings", default=None, help="comma-separated list (default: all)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--jobs", type=int, default=1, help="settings run in parallel processes (one torch thread each)")
    args = ap.parse_args()
    if not args.data.exists():
        print(f"no data at {args.data}; pass --data PATH to pneumoniamnist.npz", file=sys.stderr)
        return 2
    args.rounds = args.rounds or (10 if args.quick else 30)
    settings = args.settings.split(",") if args.settings else (QUICK if args.quick else SETTINGS)
    if settings[0] != "none":
        settings = ["none"] + [s for s in settings if s != "none"]
    torch.set_num_threads(1)  # tiny models: one thread each is fastest on a shared box
    con = Console()
    with ProcessPoolExecutor(max_workers=max(1, args.jobs), initializer=torch.set_num_threads, initargs=(1,)) as pool:
        futures = {setting: pool.submit(run, setting, args) for setting in settings}
        results = []
        for setting, fut in futures.items():
            r = fut.result()
            results.append(r)
            con.print(f"{setting:>18}: {r['bytes_up_per_site_round']:>10.0f} B/site/round  accuracy {r['accuracy']:.3f}  ({r['seconds']:.0f} s)")
    dense = results[0]
    t = Table(title=f"PneumoniaMNIST · 4 sites dirichlet:0.5 · CNN · FedAvg · {args.rounds} rounds · seed {args.seed}", title_justify="left")
    for col in ("compress", "bytes up / site / round", "× fewer than dense f32", "test accuracy", "Δ points vs dense", "last-5 mean", "Δ last-5", "meets ≥10× & ≤1 pt"):
        t.add_column(col, justify="right" if col != "compress" else "left")
    for r in results:
        ratio = dense["bytes_up_per_site_round"] / r["bytes_up_per_site_round"]
        delta = 100 * (r["accuracy"] - dense["accuracy"])
        delta5 = 100 * (r["last5_accuracy"] - dense["last5_accuracy"])
        r["ratio"], r["delta_points"], r["delta_last5_points"] = ratio, delta, delta5
        ok = "baseline" if r is dense else ("yes" if ratio >= 10 and delta >= -1 and delta5 >= -1 else "no")
        t.add_row(r["setting"] + (" (baseline)" if r is dense else ""), f"{r['bytes_up_per_site_round']:,.0f}", f"{ratio:.1f}×", f"{r['accuracy']:.3f}", f"{delta:+.1f}", f"{r['last5_accuracy']:.3f}", f"{delta5:+.1f}", ok)
    con.print(t)
    con.print("local training: " + ", ".join(f"{k} {v}" for k, v in dense["config"].items() if v is not None))
    if args.json:
        args.json.write_text(json.dumps({"rounds": args.rounds, "seed": args.seed, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
