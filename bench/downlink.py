"""Bytes down per site per round for each ``downlink`` setting, beside dense float32 in the same run.

    .venv/bin/python bench/downlink.py                 # heart: logistic regression (the default demo) and the MLP
    .venv/bin/python bench/downlink.py --images        # also PneumoniaMNIST, small CNN, 10 rounds

Every row runs the real round engine (``insitu.apps.simulate.simulate``) with the same data, seed and
site secrets; only ``downlink`` changes.  "bytes down" is what the in-process transport encoded for the
round's messages to each site (the TRAIN request: header, the approved plan, the round instructions and
the model, dense or as a delta), i.e. what a deployment sends, averaged over the rounds.  "model part"
leaves out the plan's JSON, which every TRAIN carries whatever the downlink.  Accuracy is the final mean
site accuracy (FLamby's metric) and the accuracy on all test records pooled; the baseline is dense.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from insitu.apps.simulate import simulate

SETTINGS = ("dense", "delta", "delta:int8")
SECRETS = {s: bytes([i + 1]) * 32 for i, s in enumerate(["cleveland", "hungary", "switzerland", "va-long-beach"])}
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "pneumoniamnist.npz"


def run(name: str, downlink: str, options: dict, secrets: dict | None) -> dict:
    t0 = time.perf_counter()
    out = Path(tempfile.mkdtemp(prefix="bench-downlink-")) / "run"
    s = simulate(**options, downlink=downlink, baselines=False, out=str(out), site_secrets=secrets)
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    shutil.rmtree(out.parent, ignore_errors=True)
    later = [v["bytes_down"] for h in rounds if h["status"] == "ok" and h["round"] > 1 for v in h["sites"].values()]
    fin = s["final"]
    plan_bytes = len(json.dumps(s["plan"], separators=(",", ":")))
    down = float(np.mean(list(fin["bytes_down_per_round_per_site"].values())))
    return {"task": name, "downlink": downlink, "bytes_down": down, "model_part": down - plan_bytes,
            "bytes_down_after_round_1": float(np.mean(later)) if later else float("nan"),
            "bytes_up": float(np.mean(list(fin["bytes_up_per_round_per_site"].values()))),
            "mean_site_accuracy": fin["mean_site_accuracy"], "pooled_accuracy": fin["pooled_accuracy"],
            "rounds": fin["rounds_completed"], "seconds": time.perf_counter() - t0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=30, help="heart rounds (the simulate default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--images", action="store_true", help="also PneumoniaMNIST with the small CNN (55,041 parameters)")
    ap.add_argument("--image-rounds", type=int, default=10)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="PneumoniaMNIST .npz (with --images)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    tasks = [("heart · logreg (14 params)", {"dataset": "heart", "model": "logreg", "normalize": "site"}, SECRETS),
             ("heart · mlp (481 params)", {"dataset": "heart", "model": "mlp", "normalize": "site"}, SECRETS)]
    for _, opts, _ in tasks:
        opts.update(rounds=args.rounds, seed=args.seed)
    if args.images:
        if not args.data.exists():
            print(f"no data at {args.data}; pass --data PATH to pneumoniamnist.npz", file=sys.stderr)
            return 2
        tasks.append(("pneumoniamnist · cnn (55,041 params)", {"dataset": "pneumoniamnist", "data": str(args.data),
                      "rounds": args.image_rounds, "seed": args.seed}, {f"hospital-{i}": bytes([i]) * 32 for i in range(1, 5)}))
    con = Console(width=200)
    results = []
    for name, opts, secrets in tasks:
        for dl in SETTINGS:
            r = run(name, dl, opts, secrets)
            results.append(r)
            con.print(f"{name:>38} {dl:>10}: {r['bytes_down']:>9,.0f} B down/site/round  mean site accuracy "
                      f"{r['mean_site_accuracy']:.4f}  ({r['seconds']:.1f} s)")
    t = Table(title=f"downlink · 4 sites · FedAvg · seed {args.seed} · one run each", title_justify="left")
    for col in ("task", "downlink", "bytes down / site / round", "× fewer than dense", "rounds ≥ 2", "× fewer", "model part (no plan JSON)", "× fewer",
                "bytes up / site / round", "mean site accuracy", "Δ points", "pooled accuracy"):
        t.add_column(col, justify="left" if col in ("task", "downlink") else "right")
    for name, _, _ in tasks:
        rows = [r for r in results if r["task"] == name]
        dense = rows[0]
        for r in rows:
            r["ratio"] = dense["bytes_down"] / r["bytes_down"]
            r["model_ratio"] = dense["model_part"] / r["model_part"]
            r["ratio_after_round_1"] = dense["bytes_down_after_round_1"] / r["bytes_down_after_round_1"]
            r["delta_points"] = 100 * (r["mean_site_accuracy"] - dense["mean_site_accuracy"])
            t.add_row(name if r is dense else "", r["downlink"] + (" (baseline)" if r is dense else ""), f"{r['bytes_down']:,.0f}",
                      f"{r['ratio']:.2f}×", f"{r['bytes_down_after_round_1']:,.0f}", f"{r['ratio_after_round_1']:.2f}×", f"{r['model_part']:,.0f}", f"{r['model_ratio']:.2f}×", f"{r['bytes_up']:,.0f}",
                      f"{r['mean_site_accuracy']:.4f}", f"{r['delta_points']:+.2f}", f"{r['pooled_accuracy']:.4f}")
        t.add_section()
    con.print(t)
    con.print("Round one always goes dense (no site holds a base yet): the first columns include it, 'rounds ≥ 2' does not.")
    if args.json:
        args.json.write_text(json.dumps({"seed": args.seed, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
