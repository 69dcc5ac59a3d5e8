"""Start-up cost of the default ``insitu simulate``: import time, peak memory and wall time, against an
earlier commit of this repository, in the same run.

    .venv/bin/python bench/startup.py --before 9c1a83b          # this tree against that commit
    .venv/bin/python bench/startup.py --before 9c1a83b --runs 3 --threads 1

Each run is a fresh process: ``python -X importtime -m insitu simulate --out DIR`` under
``/usr/bin/time -v``.  Reported per tree: the summed top-level import time (µs lines of
``-X importtime``), which heavy libraries were imported at all, the maximum resident set size, and the
wall time of the whole command (medians over ``--runs``, alternating the trees so that load on a shared
machine hits both alike).  ``--threads 1`` sets OMP_NUM_THREADS=1 for both trees (one torch thread).
The baseline is the same command at ``--before``, extracted with ``git archive`` into a temporary
directory; both use this virtualenv.
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "pandas", "sklearn", "scipy", "matplotlib", "sqlalchemy", "tenseal", "phe", "opacus", "dp_accounting")


def run_once(src: Path, out: Path, threads: int | None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src)}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = ["/usr/bin/time", "-v", sys.executable, "-X", "importtime", "-m", "insitu", "simulate", "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=out.parent)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    imports, total = set(), 0
    for line in proc.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)", line)
        if m:
            imports.add(m.group(4))
            if len(m.group(3)) == 1:  # top level
                total += int(m.group(2))
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", proc.stderr).group(1)
    parts = [float(p) for p in wall.split(":")]
    seconds = sum(p * 60 ** i for i, p in enumerate(reversed(parts)))
    return {"import_s": total / 1e6, "rss_mb": rss / 1024, "wall_s": seconds, "heavy": sorted(h for h in HEAVY if h in imports)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--before", required=True, help="git commit to compare with (the baseline)")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for both trees (default: unset)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        old = tmp / "before"
        old.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.before, "src"], capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
        trees = {f"before ({args.before})": old / "src", "after (this tree)": ROOT / "src"}
        results: dict[str, list[dict]] = {k: [] for k in trees}
        for i in range(args.runs):
            for name, src in trees.items():
                r = run_once(src, tmp / f"run-{i}-{len(results[name])}-{name[:5]}", args.threads)
                results[name].append(r)
                print(f"{name}: imports {r['import_s']:.2f} s, peak RSS {r['rss_mb']:.0f} MB, wall {r['wall_s']:.1f} s; {', '.join(r['heavy'])}", flush=True)
    med = {k: {f: statistics.median(r[f] for r in v) for f in ("import_s", "rss_mb", "wall_s")} for k, v in results.items()}
    (b, bm), (a, am) = med.items()
    print(f"\ndefault `insitu simulate`, medians of {args.runs} run(s), OMP_NUM_THREADS={args.threads or 'unset'}")
    print(f"{'':24}{'imports s':>12}{'peak RSS MB':>14}{'wall s':>10}")
    for name, m in med.items():
        print(f"{name:24}{m['import_s']:12.2f}{m['rss_mb']:14.0f}{m['wall_s']:10.1f}")
    print(f"{'after / before':24}{am['import_s'] / bm['import_s']:12.2f}{am['rss_mb'] / bm['rss_mb']:14.2f}{am['wall_s'] / bm['wall_s']:10.2f}")


if __name__ == "__main__":
    main()
