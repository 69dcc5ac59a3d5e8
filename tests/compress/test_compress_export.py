"""Model compression and ONNX export: sparsity reached, ONNX matches PyTorch, int8 is smaller."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from insitu.compress.export import ExportOptions, export_model, export_run, load_run_model, run_onnx, to_onnx
from insitu.compress.model import DistillConfig, TinyCNN, distill, prune, sparsity
from insitu.errors import ConfigError, DataError
from insitu.federation.task import TaskSpec
from insitu.learn.models import build_model, get_flat
from insitu.learn.train import TrainConfig, train_local


def _images(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    pattern = torch.ones(1, 28, 28)
    pattern[..., 14:] = -1  # left half brighter than right: learnable by an MLP and a tiny CNN
    X = torch.randn(n, 1, 28, 28, generator=g) + 0.1 * torch.randn(n, 1, 1, 1, generator=g) * pattern
    y = ((X * pattern).sum((1, 2, 3)) > 0).float()
    return X, y


@pytest.fixture(scope="module")
def trained():
    torch.set_num_threads(1)
    task = TaskSpec(model="mlp", input_shape=(1, 28, 28), num_outputs=1, schema=("image",), lr=0.05, local_steps=300, batch_size=32)
    model = build_model("mlp", (1, 28, 28), 1, seed=0)
    X, y = _images(1200)
    train_local(model, X[:1000], y[:1000], TrainConfig(lr=0.05, steps=300, batch_size=32), torch.Generator().manual_seed(0), num_outputs=1)
    model.eval()
    return model, task, X[:1000], y[:1000], X[1000:], y[1000:]


def test_magnitude_pruning_reaches_sparsity_and_keeps_mask(trained):
    model, _, X, y, _, _ = trained
    for amount in (0.5, 0.9):
        p = prune(model, amount, X=X, y=y, num_outputs=1, finetune_steps=5)
        s = sparsity(p)
        assert amount <= s < amount + 0.01, (amount, s)
    assert sparsity(model) < 0.01  # the original is untouched
    # the smallest weights went, not random ones
    p = prune(model, 0.5)
    w0, w1 = model[1].weight.detach().abs(), p[1].weight.detach()
    assert float(w0[w1 == 0].max()) <= float(w0[w1 != 0].min()) + 1e-12
    with pytest.raises(ConfigError):
        prune(model, 1.0)


def test_onnx_matches_pytorch():
    for model in (build_model("cnn", (1, 28, 28), 1, seed=1), TinyCNN((1, 28, 28), 3)):
        model.eval()
        X, _ = _images(64, seed=2)
        blob = to_onnx(model, X[:1])
        with torch.no_grad():
            ref = model(X).numpy()
        got = run_onnx(blob, X)
        assert got.shape == ref.shape
        assert np.max(np.abs(got - ref)) < 1e-4


@pytest.mark.slow
def test_distilled_student_is_small_and_learns_from_teacher(trained):
    model, _, X, y, Xte, yte = trained
    student = distill(model, X, y, num_outputs=1, config=DistillConfig(steps=150, lr=0.01))
    assert sum(p.numel() for p in student.parameters()) * 10 < sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        agree = float(((student(Xte) > 0) == (model(Xte) > 0)).float().mean())
    assert agree > 0.75


def test_export_prune_int8_smaller_and_checked(trained, tmp_path):
    model, task, X, y, Xte, yte = trained
    plain = export_model(model, task, ExportOptions(latency_runs=20), tmp_path / "f.onnx", X_train=X, y_train=y, X_test=Xte, y_test=yte)
    small = export_model(model, task, ExportOptions(prune=0.5, quantize="int8-static", finetune_steps=50, latency_runs=20), tmp_path / "q.onnx",
                         X_train=X, y_train=y, X_test=Xte, y_test=yte)
    dyn = export_model(model, task, ExportOptions(quantize="int8", latency_runs=20), tmp_path / "d.onnx", X_train=X, y_train=y, X_test=Xte, y_test=yte)
    assert dyn.exported.bytes * 3 < plain.exported.bytes and dyn.int8_agreement >= 0.95
    assert "MatMulInteger" in {n.op_type for n in __import__("onnx").load(str(tmp_path / "d.onnx")).graph.node}
    assert plain.max_abs_diff_float < 1e-4 and (tmp_path / "f.onnx").stat().st_size == plain.exported.bytes
    assert abs(plain.exported.accuracy - plain.original.accuracy) < 1e-9  # float export changes nothing
    assert small.exported.bytes * 3 < plain.exported.bytes  # int8 weights: about a quarter
    assert small.exported.gzip_bytes < plain.exported.gzip_bytes
    assert small.sparsity >= 0.5 and small.int8_agreement >= 0.95
    # every pixel carries signal in this synthetic task, so half the weights gone costs a few points
    assert small.exported.accuracy > plain.exported.accuracy - 0.1 and small.exported.accuracy > 0.75
    import onnx

    onnx.checker.check_model(onnx.load(str(tmp_path / "q.onnx")))
    ops = {n.op_type for n in onnx.load(str(tmp_path / "q.onnx")).graph.node}
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops


def test_export_run_reads_a_run_dir(trained, tmp_path):
    model, task, *_ = trained
    run = tmp_path / "run"
    run.mkdir()
    np.savez(run / "model.npz", params=get_flat(model))
    (run / "task.json").write_text(json.dumps(task.to_meta()))
    loaded, t = load_run_model(run)
    assert t == task and np.array_equal(get_flat(loaded), get_flat(model))
    with pytest.raises(DataError, match="summary"):
        export_run(run, tmp_path / "x.onnx", ExportOptions())
    with pytest.raises(DataError, match="task.json"):
        load_run_model(tmp_path)


@pytest.mark.slow
def test_simulate_then_export_heart(tmp_path):
    """End to end: a real (short) heart simulation, then `insitu export` on its run dir."""
    from insitu.cli import main
    from insitu.apps.simulate import simulate

    run = tmp_path / "run"
    simulate(dataset="heart", rounds=2, baselines=False, out=str(run))
    out = tmp_path / "heart.onnx"
    res = export_run(run, out, ExportOptions(prune=0.5, quantize="int8", finetune_steps=20, latency_runs=20))
    assert out.exists() and res.sparsity >= 0.5 and res.int8_agreement >= 0.95
    assert res.exported.accuracy > 0.6
    with pytest.raises(SystemExit) as exc:
        main(["export", str(run), "--prune", "0.5", "--quantize", "int4", "--out", str(tmp_path / "bad.onnx")])
    assert exc.value.code == 2 and not (tmp_path / "bad.onnx").exists()
