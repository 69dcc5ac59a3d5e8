"""Imaging recipe pieces (issue 20): model selection on the sites' validation splits picks the round
the validation figures rank first and reads the test splits once; worst-site, balanced and AUC
figures are in the summary; class weights and momentum SGD do what they say."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from insitu.data.dataset import FederatedData, SiteData
from insitu.errors import ConfigError
from insitu.federation.coordinator import Coordinator
from insitu.federation.evaluation import Criterion, score
from insitu.federation.task import TaskSpec
from insitu.learn.clinical import model_of
from insitu.learn.train import OptimizerName, TrainConfig, evaluate, loss_fn, train_local


def tiny_images(seed: int = 0) -> FederatedData:
    """Four label-skewed sites of 8×8 images whose class shows as a bright or dark centre."""
    g = torch.Generator().manual_seed(seed)

    def make(n: int, p: float) -> tuple[torch.Tensor, torch.Tensor]:
        y = (torch.rand(n, generator=g) < p).float()
        X = torch.randn(n, 1, 8, 8, generator=g) * 0.8
        X[:, :, 2:6, 2:6] += (2 * y - 1).view(-1, 1, 1, 1) * 0.6
        return X, y

    sites = []
    for i, p in enumerate((0.05, 0.9, 0.5, 0.98)):
        tr, te, va = make(60, p), make(20, p), make(16, p)
        sites.append(SiteData(f"h{i + 1}", *tr, *te, *va))
    return FederatedData("tiny", tuple(sites), (1, 8, 8), 2, ("image",))


@pytest.fixture
def eval_log(monkeypatch):
    """The split of every federated evaluation the coordinator asks for (a spy around the real method)."""
    log: list[str] = []
    real = Coordinator.evaluate

    def spy(self, round_, params=None, split="test"):
        log.append(split)
        return real(self, round_, params, split)

    monkeypatch.setattr(Coordinator, "evaluate", spy)
    return log


@pytest.mark.parametrize("select, criterion", [("best-val-balanced", Criterion.BALANCED_ACCURACY), ("best-val", Criterion.ACCURACY)])
def test_selection_keeps_the_round_validation_ranks_first_and_reads_test_once(tmp_path, eval_log, select, criterion):
    from insitu.apps.simulate import simulate

    data = tiny_images()
    s = simulate(data=data, rounds=6, local_steps=3, lr=0.05, batch_size=16, optimizer="sgd", select=select, baselines=False,
                 seed=1, out=str(tmp_path / "run"), site_secrets={n: bytes([i + 1]) * 32 for i, n in enumerate(["h1", "h2", "h3", "h4"])})
    rounds = [json.loads(line) for line in (tmp_path / "run" / "rounds.jsonl").read_text().splitlines()]
    scores = [r["val_score"] for r in rounds]
    assert s["final"]["selected_round"] == int(np.argmax(scores)) + 1  # the first round with the best validation score
    assert s["final"]["selection"] == {"split": "val", "criterion": criterion.value, "value": max(scores)}
    assert len(set(scores)) > 1  # the rounds differ, so the choice is a real one
    # the test splits are read once, at the end; every round was scored on validation only
    assert eval_log == ["val"] * 6 + ["test"]
    assert all(r["eval_split"] == "val" and all("test_accuracy" not in e for e in r["sites"].values()) for r in rounds)
    # the saved model is the chosen one: its validation score, recomputed here, is the recorded best
    task = TaskSpec.from_meta(json.loads((tmp_path / "run" / "task.json").read_text()))
    params = np.load(tmp_path / "run" / "model.npz")["params"]
    model = model_of(task, params)
    answers = {d.name: evaluate(model, d.X_val, d.y_val, num_outputs=1, by_class=True) for d in data.sites}
    assert score(answers, criterion) == pytest.approx(max(scores))
    # and the reported test figures are that model's
    test = {d.name: evaluate(model, d.X_test, d.y_test, num_outputs=1, by_class=True) for d in data.sites}
    fin = s["final"]
    assert fin["site_accuracy"] == {k: v["accuracy"] for k, v in test.items()}
    assert fin["worst_site_accuracy"] == min(v["accuracy"] for v in test.values())
    assert fin["worst_site"] == min(test, key=lambda k: test[k]["accuracy"])
    assert fin["site_auc"] == {k: v["auc"] for k, v in test.items()}
    aucs = [v["auc"] for v in test.values() if v["auc"] is not None]
    assert fin["mean_site_auc"] == pytest.approx(np.mean(aucs)) and fin["worst_site_auc"] == min(aucs)
    assert 0.0 <= fin["all_records_auc"] <= 1.0 and 0.0 <= fin["balanced_accuracy"] <= 1.0


def test_last_selection_scores_rounds_on_test_as_before(eval_log):
    from insitu.apps.simulate import simulate

    s = simulate(data=tiny_images(), rounds=2, local_steps=2, select="last", baselines=False, write=False)
    assert eval_log == ["test", "test", "test"] and s["final"]["selection"]["split"] == "test"
    assert s["final"]["selected_round"] == 2


def test_class_weights_weigh_each_record_by_its_class():
    out = torch.tensor([[0.3], [-1.2], [2.0]])
    y = torch.tensor([1.0, 0.0, 0.0])
    each = torch.nn.functional.binary_cross_entropy_with_logits(out.squeeze(-1), y, reduction="none")
    w = torch.tensor([2.0, 0.5, 0.5])  # class 0 weighs 0.5, class 1 weighs 2
    assert float(loss_fn(1, (0.5, 2.0))(out, y)) == pytest.approx(float((each * w).mean()))
    assert float(loss_fn(1)(out, y)) == pytest.approx(float(each.mean()))
    logits = torch.randn(4, 3)
    yc = torch.tensor([0, 2, 1, 2])
    each_c = torch.nn.functional.cross_entropy(logits, yc, reduction="none")
    assert float(loss_fn(3, (1.0, 3.0, 0.25))(logits, yc)) == pytest.approx(float((each_c * torch.tensor([1.0, 0.25, 3.0, 0.25])).mean()))


def test_class_weights_are_part_of_the_plan_and_checked():
    from insitu.apps.simulate import SimulationConfig

    base = SimulationConfig(dataset="pneumoniamnist", data="x.npz", class_weights="none").resolved()
    weighted = SimulationConfig(dataset="pneumoniamnist", data="x.npz", class_weights="1,0.5").resolved()
    p0, p1 = base.plan_for((1, 28, 28), 1, ("image",)), weighted.plan_for((1, 28, 28), 1, ("image",))
    assert p1.task.class_weights == (1.0, 0.5) and p1.task.train_config().class_weights == (1.0, 0.5)
    assert p0.task.class_weights is None and "class_weights" not in p0.task.to_meta()  # unweighted plans keep their hash
    assert p0.content_hash() != p1.content_hash()
    assert TaskSpec.from_meta(p1.task.to_meta()) == p1.task
    with pytest.raises(ConfigError, match="class_weights must be numbers"):
        SimulationConfig(dataset="pneumoniamnist", data="x.npz", class_weights="1,heavy").resolved()
    with pytest.raises(ConfigError, match="positive numbers"):
        SimulationConfig(dataset="pneumoniamnist", data="x.npz", class_weights="1,-2").resolved()
    with pytest.raises(ConfigError, match="gives 3 weight"):
        weighted.__class__(**{**weighted.__dict__, "class_weights": "1,1,1"}).plan_for((1, 28, 28), 1, ("image",))


def test_sgd_momentum_known_answer():
    """f(w) = w²/2 (gradient w) from w = 1, lr 0.1, β = 0.9: m₁ = 1, w₁ = 0.9; m₂ = 0.9·1 + 0.9 = 1.8, w₂ = 0.72.
    Plain SGD takes w₂ = 0.81."""
    from insitu.learn.train import make_optimizer

    for name, want in ((OptimizerName.SGDM, 0.72), (OptimizerName.SGD, 0.81)):
        model = torch.nn.Linear(1, 1, bias=False)
        with torch.no_grad():
            model.weight.fill_(1.0)
        opt = make_optimizer(model, TrainConfig(lr=0.1, steps=2, batch_size=1, optimizer=name))
        for _ in range(2):
            opt.zero_grad()
            (0.5 * model.weight.pow(2).sum()).backward()
            opt.step()
        assert float(model.weight.detach()) == pytest.approx(want)


def test_dpsgd_per_record_loss_carries_the_class_weights():
    from insitu.learn.dpsgd import per_sample_loss

    out = torch.tensor([[0.3], [-1.2], [2.0]])
    y = torch.tensor([1.0, 0.0, 0.0])
    each = torch.nn.functional.binary_cross_entropy_with_logits(out.squeeze(-1), y, reduction="none")
    assert float(per_sample_loss(1, (0.5, 2.0))(out, y)) == pytest.approx(float((each * torch.tensor([2.0, 0.5, 0.5])).sum()))
    assert float(per_sample_loss(1)(out, y)) == pytest.approx(float(each.sum()))


def test_summary_table_shows_auc_and_worst_site():
    from rich.console import Console

    from insitu.apps.simulate import simulate
    from insitu.report.tables import summary_table

    s = simulate(data=tiny_images(), rounds=2, local_steps=2, select="best-val-balanced", baselines=True, write=False)
    console = Console(width=200, record=True)
    console.print(summary_table(s))
    text = console.export_text()
    assert "federated AUC" in text and "worst site" in text
    worst_row = next(line for line in text.splitlines() if "worst site" in line)
    assert f"{s['final']['worst_site_accuracy']:.3f}" in worst_row


def test_validation_selection_names_the_sites_a_partition_left_without_validation_records(tmp_path):
    from dataclasses import replace

    from insitu.apps.simulate import simulate

    data = tiny_images()
    sites = tuple(replace(s, X_val=s.X_val[:0], y_val=s.y_val[:0]) if s.name in ("h2", "h4") else s for s in data.sites)
    with pytest.raises(ConfigError, match=r"h2, h4 have no validation records .*--select last"):
        simulate(data=replace(data, sites=sites), rounds=1, select="best-val", baselines=False, out=str(tmp_path / "run"))
