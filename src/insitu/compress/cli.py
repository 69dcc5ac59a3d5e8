"""``insitu export`` and ``insitu cross-device``: argument parsing over the compress library.

Registered in :mod:`insitu.cli` as ``app.command("export")(export_command)`` and
``app.command("cross-device")(crossdevice_command)``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from insitu.cliopts import renamed


out = Console()



def _kb(n: int) -> str:
    return f"{n / 1000:.1f} kB"


def export_command(
    run_dir: Path = typer.Argument(..., help="Run directory written by `insitu simulate` (model.npz, task.json, summary.json)."),
    prune: float = typer.Option(0.0, help="Fraction of conv/linear weights to zero by magnitude (one global threshold)."),
    quantize: str = typer.Option("none", help="none; int8 (int8 weights, activations quantized at run time: no data needed); or int8-static (activations too, calibrated on one site's training records)."),
    distill: bool = typer.Option(False, "--distill/--no-distill", help="First distil the model into a ~40x smaller student (images: TinyCNN)."),
    format: str = typer.Option("onnx", "--format", help="Output format (onnx)."),
    out_path: Path = typer.Option(Path("model.onnx"), "--out", "-o", help="Where to write the model."),
    data: Optional[str] = typer.Option(None, help="Path to the run's data if it moved (calibration, fine-tuning, accuracy)."),
    site: Optional[str] = typer.Option(None, help="Whose training records distillation, fine-tuning and calibration may use (default: the largest site)."),
    distill_steps: int = typer.Option(1500, help="Student training steps."),
    finetune_steps: int = typer.Option(0, help="Fine-tune the pruned model this many steps on one site's records (mask held)."),
) -> None:
    """Compress and export the run's model, check it with onnxruntime against PyTorch, and report
    size, latency and accuracy beside the original.

    The float ONNX graph must match PyTorch to 1e-4 and an int8 graph must agree with its float
    source on >= 95 % of predictions, or nothing is written.  Distillation, fine-tuning and
    int8-static calibration use one site's training records (--site, default the largest).
    """
    from insitu.compress.export import ExportOptions, export_run
    from insitu.compress.model import DistillConfig

    opts = ExportOptions(prune=prune, quantize=quantize, distill=distill, format=format, finetune_steps=finetune_steps,
                         distill_config=DistillConfig(steps=distill_steps))
    res = export_run(run_dir, out_path, opts, data=data, site=site)
    t = Table(title=f"export of {run_dir}", title_justify="left")
    for col in ("model", "parameters", "nonzero", "size", "gzip", "latency (batch 1)", "test accuracy"):
        t.add_column(col, justify="left" if col == "model" else "right")
    for r in (res.original, res.exported):
        t.add_row(r.name, f"{r.params:,}", f"{r.nonzero_params:,}", _kb(r.bytes), _kb(r.gzip_bytes), f"{r.latency_ms:.3f} ms",
                  "–" if r.accuracy is None else f"{r.accuracy:.3f}")
    out.print(t)
    for step in res.steps:
        out.print(f"  · {step}")
    out.print(f"wrote [bold]{res.out}[/] ({res.exported.bytes / res.original.bytes:.2f}× the original's size)")


def crossdevice_command(
    devices: int = typer.Option(1000, help="Simulated devices (one person each, synthetic wearable data)."),
    fraction: float = typer.Option(0.05, help="Fraction of devices sampled per round."),
    rounds: int = typer.Option(30, help="Federated rounds."),
    compress: str = typer.Option("none", help="Update compression: int8, topk:F, shared:F, topk:F+int8."),
    offline: float = typer.Option(0.1, help="Probability that a sampled device does not answer."),
    local_steps: int = typer.Option(10, help="Minibatch steps per device per round."),
    seed: int = typer.Option(0, help="Seed for data, sampling and models."),
    backend: str = typer.Option("in-process", help="Where devices are made and trained: in-process (default) or ray (Ray worker processes, on this machine or a cluster; each makes a device only when it is sampled). Needs Ray: pip install 'insitu\\[ray]'."),
    ray_address: Optional[str] = typer.Option(None, help="With --backend ray: join the Ray cluster at this address (its nodes need insitu installed). Default: a private local Ray for the run, dashboard off, every listener on 127.0.0.1."),
    json_out: Optional[Path] = typer.Option(None, "--out", "-o", help="Also write the summary (JSON, with per-round records) to this file."),
    _old_json: Any = renamed("--json", "--out"),
) -> None:
    """Cross-device federation in one process: the same coordinator and site code as `simulate`,
    with a new sample of devices each round and bytes counted per device."""
    import torch

    from insitu.compress.crossdevice import CrossDeviceConfig, cross_device

    torch.set_num_threads(1)
    s = cross_device(CrossDeviceConfig(devices=devices, fraction=fraction, rounds=rounds, compress=compress, offline=offline, local_steps=local_steps, seed=seed,
                                      backend=backend, ray_address=ray_address))
    f = s["final"]
    out.print(f"{s['data']['name']}: {s['data']['devices']} devices, {s['devices_per_round']} sampled per round, model {s['task']['model']} ({s['parameters']} parameters), compress {compress}")
    out.print(f"accuracy {f['accuracy']:.3f} on {f['eval_records']} records of {f['eval_devices']} devices after {f['rounds_completed']} rounds")
    out.print(f"bytes per device per round: up {f['bytes_up_per_device_round']:.0f}, down {f['bytes_down_per_device_round']:.0f} ({f['seconds']:.0f} s)")
    if json_out:
        json_out.write_text(json.dumps(s, indent=2))
