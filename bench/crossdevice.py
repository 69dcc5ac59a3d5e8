"""Cross-device set-up time and peak memory: devices made when sampled, against the eager build.

    .venv/bin/python bench/crossdevice.py                             # 1,000,000 devices, 5 %, 1 round
    .venv/bin/python bench/crossdevice.py --devices 100000 --rounds 2
    .venv/bin/python bench/crossdevice.py --before 9c1a83b --before-devices 20000

Target (issue 19): 1,000,000 devices, 5 % sampled per round: set-up under 10 s, peak memory under 2 GB.
Each configuration runs in a fresh process (``insitu.compress.crossdevice.cross_device`` with the
synthetic wearable population, one torch thread); reported: set-up seconds (everything before the
first round), wall seconds of the whole run, peak resident memory (``ru_maxrss``), devices made.
The baseline is the same function at ``--before`` (a git commit of this repository, extracted with
``git archive``), which built every device's data, model and generator up front; it runs at
``--before-devices`` because a million eager devices do not fit (the issue measured 100,000 at 69 s
and 2.9 GB), and both are also given per 1,000 devices.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys, time
import torch
torch.set_num_threads(1)
from insitu.compress.crossdevice import CrossDeviceConfig, cross_device
devices, fraction, rounds, steps = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
t0 = time.perf_counter()
s = cross_device(CrossDeviceConfig(devices=devices, fraction=fraction, rounds=rounds, local_steps=steps, eval_devices=200, seed=0))
f = s["final"]
print(json.dumps({"setup_s": f["setup_seconds"], "wall_s": time.perf_counter() - t0, "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "accuracy": f["accuracy"], "per_round": s["devices_per_round"], "made": f.get("devices_made")}))
"""


def run(src: Path, devices: int, fraction: float, rounds: int, steps: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(devices), str(fraction), str(rounds), str(steps)], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"cross-device run failed ({src}, {devices} devices):\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--devices", type=int, default=1_000_000)
    ap.add_argument("--fraction", type=float, default=0.05)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--local-steps", type=int, default=10)
    ap.add_argument("--before", default=None, help="git commit of the eager implementation to compare with")
    ap.add_argument("--before-devices", type=int, default=20_000)
    args = ap.parse_args()
    rows = [("after (this tree)", args.devices, run(ROOT / "src", args.devices, args.fraction, args.rounds, args.local_steps))]
    if args.before:
        with tempfile.TemporaryDirectory() as tmp:
            archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.before, "src"], capture_output=True, check=True).stdout
            subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
            rows.append((f"before ({args.before})", args.before_devices, run(Path(tmp) / "src", args.before_devices, args.fraction, args.rounds, args.local_steps)))
    print(f"cross-device, {args.fraction:.0%} sampled per round, {args.rounds} round(s) of {args.local_steps} local steps, 200 devices evaluated")
    print(f"{'':22}{'devices':>10}{'per round':>10}{'set-up s':>10}{'wall s':>9}{'peak MB':>9}{'set-up ms / 1k dev':>20}{'MB / 1k dev':>13}{'made':>9}{'accuracy':>10}")
    for name, n, r in rows:
        print(f"{name:22}{n:10d}{r['per_round']:10d}{r['setup_s']:10.2f}{r['wall_s']:9.1f}{r['rss_mb']:9.0f}{r['setup_s'] * 1e6 / n:20.2f}{r['rss_mb'] * 1e3 / n:13.2f}"
              f"{r['made'] if r['made'] is not None else n:>9}{r['accuracy']:10.3f}")
    if len(rows) == 2:
        (_, n1, a), (_, n0, b) = rows
        print(f"set-up per device: {b['setup_s'] / n0 / (a['setup_s'] / n1):.0f}× less; peak memory per device: {b['rss_mb'] / n0 / (a['rss_mb'] / n1):.0f}× less")
    print("target (issue 19): 1,000,000 devices, 5 % per round: set-up < 10 s, peak memory < 2 GB")


if __name__ == "__main__":
    main()
