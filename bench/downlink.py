"""Bytes down per site per round for each ``downlink`` setting, the plan sent whole or by hash, beside dense.

    .venv/bin/python bench/downlink.py                 # heart: logistic regression (the default demo) and the MLP
    .venv/bin/python bench/downlink.py --images        # also PneumoniaMNIST, small CNN, 10 rounds

Every row runs the real round engine (``insitu.apps.simulate.simulate``) with the same data, seed and
site secrets; only ``downlink`` and ``plan_by_hash`` change.  "bytes down" is every byte the in-process
transport encoded for the coordinator's requests to each site in a round: the TRAIN request (header,
the approved plan or its hash, the round instructions, the model dense or as a delta) and the round's
EVALUATE request (the model to score, dense or as a lossless delta), i.e. what a deployment sends,
averaged over the rounds (the summary's ``bytes_down_per_round_per_site``).  "whole plan" sends the
plan's JSON in every request (as before plans went by hash); "by hash" sends it whole only until the
site has checked it.  The baseline is dense with the whole plan; accuracy is the final mean site
accuracy (FLamby's metric) and the accuracy on all test records pooled.
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


def run(name: str, downlink: str, by_hash: bool, options: dict, secrets: dict | None) -> dict:
    t0 = time.perf_counter()
    out = Path(tempfile.mkdtemp(prefix="bench-downlink-")) / "run"
    s = simulate(**options, downlink=downlink, baselines=False, out=str(out), site_secrets=secrets, plan_by_hash=by_hash)
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    shutil.rmtree(out.parent, ignore_errors=True)
    later = [v["bytes_down"] for h in rounds if h["status"] == "ok" and h["round"] > 1 for v in h["sites"].values()]
    fin = s["final"]
    return {"task": name, "downlink": downlink, "plan_by_hash": by_hash,
            "bytes_down": float(np.mean(list(fin["bytes_down_per_round_per_site"].values()))),
            "bytes_down_after_round_1": float(np.mean(later)) if later else float("nan"),
            "bytes_up": float(np.mean(list(fin["bytes_up_per_round_per_site"].values()))),
            "plan_json_bytes": len(json.dumps(s["plan"], separators=(",", ":"))),
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
    con = Console(width=220)
    results = []
    for name, opts, secrets in tasks:
        for dl in SETTINGS:
            for by_hash in (False, True):
                r = run(name, dl, by_hash, opts, secrets)
                results.append(r)
                con.print(f"{name:>38} {dl:>10} {'plan by hash' if by_hash else 'whole plan':>12}: {r['bytes_down']:>9,.0f} B down/site/round  "
                          f"mean site accuracy {r['mean_site_accuracy']:.4f}  ({r['seconds']:.1f} s)")
    t = Table(title=f"bytes down per site per round (TRAIN + EVALUATE) · 4 sites · FedAvg · seed {args.seed} · one run each",
              title_justify="left")
    for col in ("task", "downlink", "whole plan", "by hash", "× fewer (hash)", "× fewer than dense, whole plan",
                "rounds ≥ 2: whole plan", "by hash", "× fewer", "bytes up / site / round", "mean site accuracy", "Δ points", "pooled accuracy"):
        t.add_column(col, justify="left" if col in ("task", "downlink") else "right")
    for name, _, _ in tasks:
        pairs = [([r for r in results if r["task"] == name and r["downlink"] == dl and not r["plan_by_hash"]][0],
                  [r for r in results if r["task"] == name and r["downlink"] == dl and r["plan_by_hash"]][0]) for dl in SETTINGS]
        base = pairs[0][0]
        for whole, hashed in pairs:
            hashed["ratio_vs_whole_plan"] = whole["bytes_down"] / hashed["bytes_down"]
            hashed["ratio_vs_baseline"] = base["bytes_down"] / hashed["bytes_down"]
            whole["ratio_vs_baseline"] = base["bytes_down"] / whole["bytes_down"]
            hashed["delta_points"] = 100 * (hashed["mean_site_accuracy"] - base["mean_site_accuracy"])
            t.add_row(name if whole is base else "", whole["downlink"] + (" (baseline: whole plan)" if whole is base else ""),
                      f"{whole['bytes_down']:,.0f}", f"{hashed['bytes_down']:,.0f}", f"{hashed['ratio_vs_whole_plan']:.2f}×",
                      f"{hashed['ratio_vs_baseline']:.2f}×",
                      f"{whole['bytes_down_after_round_1']:,.0f}", f"{hashed['bytes_down_after_round_1']:,.0f}",
                      f"{whole['bytes_down_after_round_1'] / hashed['bytes_down_after_round_1']:.2f}×", f"{hashed['bytes_up']:,.0f}",
                      f"{hashed['mean_site_accuracy']:.4f}", f"{hashed['delta_points']:+.2f}", f"{hashed['pooled_accuracy']:.4f}")
        t.add_section()
    con.print(t)
    con.print("Round one always sends the model dense and the plan whole (no site holds either yet): the first columns include it, "
              "'rounds ≥ 2' does not.  The plan's JSON is "
              + ", ".join(sorted({f"{r['plan_json_bytes']:,} B ({r['task'].split(' (')[0]})" for r in results if r["downlink"] == "dense"})) + ".")
    if args.json:
        args.json.write_text(json.dumps({"seed": args.seed, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
