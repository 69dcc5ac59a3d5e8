"""Model size, onnxruntime latency and accuracy of each export setting, against the original model.

    .venv/bin/python bench/export.py --run runs/<a PneumoniaMNIST run>      # all settings
    .venv/bin/python bench/export.py --data ../shared/data/pneumoniamnist.npz --quick
                                    # trains a 10-round federated model first, 4 settings

The original is the run's federated global model in PyTorch (float32, ``torch.save``d state
dict, latency of one record through PyTorch on one thread).  Each setting goes through
``insitu.compress.export.export_run`` — the same code as ``insitu export`` — and is checked by
onnxruntime against PyTorch before its figures count.  Distillation, fine-tuning and int8
int8-static calibration use only the largest site's training records; accuracy is on all sites' test
records (the 624 official PneumoniaMNIST test images).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from insitu.compress.export import ExportOptions, export_run
from insitu.compress.model import DistillConfig

SETTINGS = {
    "onnx float32": dict(),
    "int8 (dynamic)": dict(quantize="int8"),
    "int8-static": dict(quantize="int8-static"),
    "prune 0.5": dict(prune=0.5),
    "prune 0.5 + int8": dict(prune=0.5, quantize="int8"),
    "prune 0.8 + int8": dict(prune=0.8, quantize="int8"),
    "prune 0.8 + fine-tune + int8": dict(prune=0.8, finetune_steps=300, quantize="int8"),
    "distill": dict(distill=True),
    "distill + int8": dict(distill=True, quantize="int8"),
}
QUICK = ["onnx float32", "int8 (dynamic)", "prune 0.5 + int8", "distill + int8"]
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "pneumoniamnist.npz"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, default=None, help="run directory of `insitu simulate` (default: train one now)")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="PneumoniaMNIST .npz (to train a run, or if the run's data moved)")
    ap.add_argument("--quick", action="store_true", help="4 settings, shorter distillation/fine-tuning, 10-round run if one is trained")
    ap.add_argument("--rounds", type=int, default=None, help="rounds of the run trained when --run is not given (default 30, quick 10)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger().setLevel(logging.ERROR)  # onnxruntime's quantizer suggests pre-processing on every call
    con = Console()
    tmp = Path(tempfile.mkdtemp(prefix="bench-export-"))
    run = args.run
    if run is None:
        if not args.data.exists():
            print(f"no data at {args.data}; pass --data PATH to pneumoniamnist.npz or --run RUN_DIR", file=sys.stderr)
            return 2
        from insitu.apps.simulate import simulate

        run = tmp / "run"
        rounds = args.rounds or (10 if args.quick else 30)
        con.print(f"training a {rounds}-round federated model on PneumoniaMNIST …")
        simulate(dataset="pneumoniamnist", data=str(args.data), rounds=rounds, baselines=False, out=str(run))
    data = str(args.data) if args.data.exists() else None
    names = QUICK if args.quick else list(SETTINGS)
    steps = dict(finetune_steps=100, distill_config=DistillConfig(steps=500)) if args.quick else {}
    results = {}
    for name in names:
        res = export_run(run, tmp / f"{len(results)}.onnx", ExportOptions(**SETTINGS[name], **steps), data=data)
        results[name] = res
        con.print(f"{name:>28}: {res.exported.bytes:>8,} B  {res.exported.latency_ms:.3f} ms  accuracy {res.exported.accuracy:.3f}")
    orig = next(iter(results.values())).original
    t = Table(title=f"export of {run} · PneumoniaMNIST test set ({'quick' if args.quick else 'full'})", title_justify="left")
    for col in ("model", "parameters", "nonzero", "size", "× smaller", "gzip", "× smaller (gzip)", "latency batch 1", "× faster", "accuracy", "Δ points", "agree w/ float"):
        t.add_column(col, justify="left" if col == "model" else "right")
    t.add_row(orig.name, f"{orig.params:,}", f"{orig.nonzero_params:,}", f"{orig.bytes:,}", "1.0×", f"{orig.gzip_bytes:,}", "1.0×",
              f"{orig.latency_ms:.3f} ms", "1.0×", f"{orig.accuracy:.3f}", "+0.0", "–")
    rows = []
    for name, res in results.items():
        e = res.exported
        t.add_row(name, f"{e.params:,}", f"{e.nonzero_params:,}", f"{e.bytes:,}", f"{orig.bytes / e.bytes:.1f}×", f"{e.gzip_bytes:,}",
                  f"{orig.gzip_bytes / e.gzip_bytes:.1f}×", f"{e.latency_ms:.3f} ms", f"{orig.latency_ms / e.latency_ms:.1f}×",
                  f"{e.accuracy:.3f}", f"{100 * (e.accuracy - orig.accuracy):+.1f}",
                  "–" if res.int8_agreement is None else f"{res.int8_agreement:.1%}")
        rows.append({"setting": name, **res.to_dict()})
    con.print(t)
    con.print("latency: median of 200 single-record inferences, one thread; original = PyTorch eager, others = onnxruntime CPU")
    if args.json:
        args.json.write_text(json.dumps({"run": str(run), "results": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
