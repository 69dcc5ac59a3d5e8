"""``insitu export``: a run's global model → a small ONNX model, checked by onnxruntime.

Steps, in this order (each optional): distil into a small student → magnitude-prune
(optionally fine-tune with the mask held) → export to ONNX → int8 post-training
quantization (dynamic: int8 weights; or static: activations calibrated on
training images too) → check with onnxruntime against the PyTorch model it came from.

The float ONNX model must reproduce PyTorch's outputs to 1e-4; the int8 model
cannot, so it is checked for agreement of the predicted class with its float
source instead, and its accuracy is reported beside the original's.  The
exporter is torch's TorchScript-based one (``dynamo=False``): it runs offline
with what is installed, while the dynamo exporter needs ``onnxscript``.
"""
from __future__ import annotations

import enum
import gzip
import io
import json
import statistics
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from insitu.compress.model import DistillConfig, count_params, distill, prune, sparsity
from insitu.errors import ConfigError, DataError, parse_choice
from insitu.federation.task import TaskSpec
from insitu.learn.models import set_flat

#: the float ONNX graph must match PyTorch this closely (max absolute difference of logits)
FLOAT_TOLERANCE = 1e-4
#: the int8 graph must predict the same class as its float source on at least this share of records
INT8_MIN_AGREEMENT = 0.95


class ExportFormat(str, enum.Enum):
    ONNX = "onnx"


class Quantization(str, enum.Enum):
    """``int8``: weights stored as int8, activations quantized at run time from their own range
    (onnxruntime dynamic quantization) — needs no calibration records, and on PneumoniaMNIST
    keeps every prediction of the float model.  ``int8-static``: activations too, with ranges
    calibrated on one site's training records (QDQ) — int8 end to end, a few points less accurate."""

    NONE = "none"
    INT8 = "int8"
    INT8_STATIC = "int8-static"


@dataclass(frozen=True)
class ExportOptions:
    prune: float = 0.0
    quantize: Quantization = Quantization.NONE
    distill: bool = False
    format: ExportFormat = ExportFormat.ONNX
    finetune_steps: int = 0  # fine-tuning on one site's records drifted toward that site in our runs
    finetune_lr: float = 1e-3  # small: recover from pruning without drifting toward one site's data
    distill_config: DistillConfig = field(default_factory=DistillConfig)
    calibration_records: int = 512
    latency_runs: int = 200
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "quantize", parse_choice(Quantization, self.quantize, "--quantize"))
        object.__setattr__(self, "format", parse_choice(ExportFormat, self.format, "--format"))
        if not 0.0 <= self.prune < 1.0:
            raise ConfigError(f"--prune must be a fraction in [0, 1), got {self.prune}")


@dataclass(frozen=True)
class ModelReport:
    """Size, speed and quality of one model form; written once."""

    name: str
    params: int
    nonzero_params: int
    bytes: int
    gzip_bytes: int
    latency_ms: float  # median onnxruntime latency for one record (batch 1), or PyTorch for the original
    accuracy: float | None


@dataclass(frozen=True)
class ExportResult:
    out: str
    original: ModelReport
    exported: ModelReport
    steps: tuple[str, ...]
    max_abs_diff_float: float  # float ONNX vs its PyTorch source
    int8_agreement: float | None  # int8 ONNX vs float source, share of equal predictions
    sparsity: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- loading a run ---------------------------------------------------------------------------


def load_run_model(run_dir: str | Path) -> tuple[nn.Module, TaskSpec]:
    """The global model a simulation saved (``model.npz`` + ``task.json``)."""
    run = Path(run_dir)
    task_path, model_path = run / "task.json", run / "model.npz"
    if not task_path.exists() or not model_path.exists():
        raise DataError(f"{str(run)!r} is not a finished run directory: it needs task.json and model.npz (run `insitu simulate` first)")
    try:
        task = TaskSpec.from_meta(json.loads(task_path.read_text()))
        with np.load(model_path, allow_pickle=False) as z:
            params = z["params"]
    except (ValueError, KeyError, OSError) as exc:
        raise DataError(f"cannot read the model of run {str(run)!r}: {exc}") from None
    model = task.build_model()
    try:
        set_flat(model, params)
    except ConfigError as exc:
        raise DataError(f"run {str(run)!r}: model.npz does not fit task.json's model: {exc}") from None
    model.eval()
    return model, task


def load_run_data(run_dir: str | Path, data: str | None = None, site: str | None = None) -> tuple[str, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(site name, that site's train X, y, all sites' test X, y), rebuilt from the run's own
    splits (``summary.json``'s config); ``data`` overrides the path to the data file.

    Distillation, fine-tuning and int8 calibration use *one* site's training records (by
    default the largest site), because in a deployment the export runs at one hospital that
    may only use its own data; the test records of all sites only measure accuracy.
    """
    from insitu.apps.simulate import SimulationConfig, load_federated

    summary = Path(run_dir) / "summary.json"
    if not summary.exists():
        raise DataError(f"{str(summary)!r} is missing; export needs the run's summary to find its data (or pass --data)")
    cfg_dict = json.loads(summary.read_text()).get("config", {})
    known = {f.name for f in fields(SimulationConfig)}
    cfg = SimulationConfig(**{k: v for k, v in cfg_dict.items() if k in known})
    if data is not None:
        cfg = SimulationConfig(**{**asdict(cfg), "data": data})
    fd = load_federated(cfg.resolved())
    by_name = {s.name: s for s in fd.sites}
    if site is None:
        chosen = max(fd.sites, key=lambda s: s.n_train)
    elif site in by_name:
        chosen = by_name[site]
    else:
        raise ConfigError(f"run has no site {site!r}; its sites are {sorted(by_name)}")
    Xte, yte = fd.pooled_test()
    return chosen.name, chosen.X_train, chosen.y_train, Xte, yte


# -- ONNX --------------------------------------------------------------------------------------


def to_onnx(model: nn.Module, example: torch.Tensor) -> bytes:
    """Serialize with a dynamic batch dimension; input ``x``, output ``logits``."""
    buf = io.BytesIO()
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (example,), buf, dynamo=False, input_names=["x"], output_names=["logits"],
            dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17,
        )
    return buf.getvalue()


def _session(blob: bytes):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(blob, opts, providers=["CPUExecutionProvider"])


def run_onnx(blob: bytes, X: torch.Tensor, batch: int = 1024) -> np.ndarray:
    sess = _session(blob)
    x = X.numpy().astype(np.float32)
    return np.concatenate([sess.run(None, {"x": x[i : i + batch]})[0] for i in range(0, len(x), batch)])


def quantize_dynamic_int8(blob: bytes) -> bytes:
    """Weights int8 (per tensor), activations quantized on the fly; no data needed."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "float.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(blob)
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
        return dst.read_bytes()


def quantize_int8(blob: bytes, calibration: torch.Tensor) -> bytes:
    """Static post-training int8 (QDQ): weights int8 per channel, activations uint8 (asymmetric,
    so ReLU outputs use all 256 levels) with ranges calibrated on records."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self, X: np.ndarray):
            self._it = iter([{"x": X[i : i + 32]} for i in range(0, len(X), 32)])

        def get_next(self):
            return next(self._it, None)

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "float.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(blob)
        quantize_static(
            str(src), str(dst), Reader(calibration.numpy().astype(np.float32)),
            quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
        )
        return dst.read_bytes()


def _predictions(logits: np.ndarray) -> np.ndarray:
    logits = np.asarray(logits)
    return (logits.reshape(-1) > 0).astype(int) if logits.shape[-1] == 1 else logits.argmax(-1)


def _accuracy(logits: np.ndarray, y: torch.Tensor) -> float:
    return float(np.mean(_predictions(logits) == y.numpy().astype(int)))


def onnx_latency_ms(blob: bytes, example: torch.Tensor, runs: int) -> float:
    """Median wall time of one batch-1 inference through onnxruntime, single thread."""
    sess = _session(blob)
    x = example[:1].numpy().astype(np.float32)
    for _ in range(10):
        sess.run(None, {"x": x})
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(None, {"x": x})
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


@torch.no_grad()
def torch_latency_ms(model: nn.Module, example: torch.Tensor, runs: int) -> float:
    model.eval()
    x = example[:1]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(10):
            model(x)
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t)
    finally:
        torch.set_num_threads(threads)
    return 1000 * statistics.median(times)


def _torch_bytes(model: nn.Module) -> bytes:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getvalue()


def _report(name: str, model: nn.Module, blob: bytes, latency: float, acc: float | None) -> ModelReport:
    total, nonzero = count_params(model)
    return ModelReport(name, total, nonzero, len(blob), len(gzip.compress(blob, 9)), latency, acc)


def export_model(model: nn.Module, task: TaskSpec, options: ExportOptions, out: str | Path, *,
                 X_train: torch.Tensor, y_train: torch.Tensor, X_test: torch.Tensor | None = None, y_test: torch.Tensor | None = None) -> ExportResult:
    """Compress ``model`` as ``options`` say, write ONNX to ``out`` and report what it became.

    Raises :class:`ConfigError` if the ONNX graph disagrees with PyTorch beyond tolerance
    (nothing is written then).
    """
    out = Path(out)
    torch.manual_seed(options.seed)
    steps: list[str] = []
    nout = task.num_outputs
    example = X_train[:1]
    with torch.no_grad():
        orig_logits_test = model(X_test).numpy() if X_test is not None else None
    original = _report(
        "original (PyTorch, float32)", model, _torch_bytes(model), torch_latency_ms(model, example, options.latency_runs),
        _accuracy(orig_logits_test, y_test) if orig_logits_test is not None else None,
    )
    work = model
    if options.distill:
        work = distill(work, X_train, y_train, num_outputs=nout, config=options.distill_config)
        steps.append(f"distilled into {type(work).__name__} ({count_params(work)[0]} parameters)")
    if options.prune > 0:
        work = prune(work, options.prune, X=X_train, y=y_train, num_outputs=nout, finetune_steps=options.finetune_steps, lr=options.finetune_lr, seed=options.seed)
        steps.append(f"magnitude-pruned {options.prune:.0%} of weights" + (f", fine-tuned {options.finetune_steps} steps (Adam, lr {options.finetune_lr:g}) with the mask held" if options.finetune_steps else ""))
    blob = to_onnx(work, example)
    check_X = X_test if X_test is not None else X_train[:512]
    with torch.no_grad():
        ref = work(check_X).numpy()
    got = run_onnx(blob, check_X)
    max_diff = float(np.max(np.abs(got - ref)))
    if not max_diff <= FLOAT_TOLERANCE:
        raise ConfigError(f"ONNX export disagrees with PyTorch: max |Δlogit| = {max_diff:.2e} > {FLOAT_TOLERANCE:.0e}; not written")
    steps.append(f"exported to ONNX (max |Δlogit| vs PyTorch {max_diff:.1e})")
    agreement = None
    if options.quantize is not Quantization.NONE:
        if options.quantize is Quantization.INT8_STATIC:
            rng = np.random.default_rng(options.seed)
            calib = X_train[torch.from_numpy(rng.permutation(X_train.shape[0])[: options.calibration_records])]
            qblob, how = quantize_int8(blob, calib), "static (QDQ, per-channel weights, calibrated activations)"
        else:
            qblob, how = quantize_dynamic_int8(blob), "dynamic (int8 weights, activations quantized at run time)"
        qlogits = run_onnx(qblob, check_X)
        agreement = float(np.mean(_predictions(qlogits) == _predictions(ref)))
        if agreement < INT8_MIN_AGREEMENT:
            raise ConfigError(f"int8 model agrees with its float source on only {agreement:.1%} of records (< {INT8_MIN_AGREEMENT:.0%}); not written")
        steps.append(f"int8 {how}, {agreement:.1%} same predictions as float")
        blob, final_logits = qblob, qlogits
    else:
        final_logits = got
    acc = _accuracy(final_logits, y_test) if X_test is not None and y_test is not None else None
    exported = _report(f"exported ({out.name})", work, blob, onnx_latency_ms(blob, example, options.latency_runs), acc)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    tmp.write_bytes(blob)
    tmp.replace(out)
    return ExportResult(str(out), original, exported, tuple(steps), max_diff, agreement, sparsity(work))


def export_run(run_dir: str | Path, out: str | Path, options: ExportOptions, data: str | None = None, site: str | None = None) -> ExportResult:
    """``insitu export``: load the run's model and one site's data, compress, export, check."""
    model, task = load_run_model(run_dir)
    name, Xtr, ytr, Xte, yte = load_run_data(run_dir, data, site)
    res = export_model(model, task, options, out, X_train=Xtr, y_train=ytr, X_test=Xte, y_test=yte)
    return replace(res, steps=(f"training records of {name} ({Xtr.shape[0]}) used for distillation, fine-tuning and calibration",) + res.steps)


__all__ = ["ExportOptions", "ExportResult", "ModelReport", "ExportFormat", "Quantization", "export_model", "export_run",
           "load_run_model", "load_run_data", "to_onnx", "run_onnx", "quantize_int8", "quantize_dynamic_int8"]
