"""Personalisation after federation (``--personalize STEPS``): a site fine-tunes the final global model
on its own records, keeps the checkpoint its own validation split prefers (the global model included),
and only that model's test scores leave the site."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from insitu.apps.simulate import SimulationConfig, simulate
from insitu.builder import build_federation
from insitu.data.dataset import FederatedData, SiteData
from insitu.errors import ConfigError, ProtocolError
from insitu.federation.egress import PERSONALIZE_REPLY
from insitu.federation.messages import Message, MessageKind
from insitu.federation.site import Site
from insitu.learn.models import build_model, get_flat
from insitu.learn.personalize import _val_score, fine_tune
from insitu.learn.train import TrainConfig


def _site(name: str, shift: float, n: int, g: torch.Generator) -> SiteData:
    """Binary records whose decision boundary differs by site (non-IID: personalisation has something to fit)."""
    def split(m: int) -> tuple[torch.Tensor, torch.Tensor]:
        X = torch.randn(m, 6, generator=g)
        logit = 2.0 * X[:, 0] + shift * X[:, 1] - 0.5
        y = (torch.rand(m, generator=g) < torch.sigmoid(logit)).long()
        return X, y

    (Xt, yt), (Xv, yv), (Xs, ys) = split(n), split(n // 2), split(n // 2)
    return SiteData(name, Xt, yt, Xs, ys, Xv, yv)


@pytest.fixture(scope="module")
def data() -> FederatedData:
    g = torch.Generator().manual_seed(3)
    sites = tuple(_site(f"h{i}", s, 160, g) for i, s in enumerate((-2.0, 0.0, 2.5)))
    return FederatedData("synthetic", sites, (6,), 2, tuple(f"x{i}" for i in range(6)))


def test_the_kept_checkpoint_is_never_worse_on_validation_than_the_global_model(data):
    s = data.sites[0]
    start = build_model("mlp", (6,), 1, seed=1)
    before = get_flat(start).copy()
    # validation labels the global model ranks perfectly (AUROC 1): no step can beat it, so step 0 is kept, exactly
    from insitu.learn.clinical import risk_scores

    r = risk_scores(start, s.X_val)
    y_val = torch.from_numpy((r > np.median(r)).astype(np.int64))
    kept, ft = fine_tune(start, s.X_train, s.y_train, s.X_val, y_val, TrainConfig(lr=0.05, steps=1, batch_size=8, optimizer="adam"),
                         torch.Generator().manual_seed(0), num_outputs=1, steps=20, every=5)
    assert ft.metric == "auroc" and ft.val_start == 1.0 and ft.best_step == 0 and ft.val_best == ft.val_start
    assert np.array_equal(get_flat(kept), before)
    assert np.array_equal(get_flat(start), before)  # the caller's model is left untouched
    # a sane one moves, and what it keeps scores what it says, at least the global model's score
    tuned, ft = fine_tune(start, s.X_train, s.y_train, s.X_val, s.y_val, TrainConfig(lr=0.05, steps=1, batch_size=16, optimizer="adam"),
                          torch.Generator().manual_seed(0), num_outputs=1, steps=60, every=10)
    assert ft.best_step > 0 and ft.val_best > ft.val_start
    assert _val_score(tuned, s.X_val, s.y_val, 1) == ("auroc", pytest.approx(ft.val_best))


def test_fine_tuned_parameters_never_leave_a_site(data, monkeypatch):
    """Every message every site sends in a run is recorded; the parameters fine-tuning kept are in none."""
    sent: list[Message] = []
    kept: list[np.ndarray] = []
    handle = Site.handle
    monkeypatch.setattr(Site, "handle", lambda self, msg: sent.append(handle(self, msg)) or sent[-1])
    import insitu.learn.personalize as P

    real = P.fine_tune

    def spy(*a, **k):
        model, ft = real(*a, **k)
        kept.append(get_flat(model).copy())
        return model, ft

    monkeypatch.setattr(P, "fine_tune", spy)
    summary = simulate(data=data, model="mlp", rounds=3, local_steps=5, optimizer="adam", lr=0.01, personalize=40, baselines=False,
                       write=False, site_secrets={s.name: bytes([i]) * 32 for i, s in enumerate(data.sites)})
    per = summary["final"]["personalized"]
    assert len(kept) == 3 and any(r["best_step"] > 0 for r in per["sites"].values())  # something was fine-tuned
    replies = [m for m in sent if m.kind is MessageKind.PERSONALIZE_REPLY]
    assert len(replies) == 3 and all(not m.tensors for m in replies)
    assert all(isinstance(v, (int, float, str)) for m in replies for v in m.meta.values())  # scores, never arrays
    assert all(set(m.meta) <= set(PERSONALIZE_REPLY.meta) for m in replies)
    for theta in kept:
        for m in sent:
            for t in m.tensors.values():
                arr = np.asarray(t).reshape(-1)
                assert arr.size != theta.size or not np.allclose(arr.astype(np.float64), theta, atol=1e-6)


def test_the_egress_refuses_parameters_in_a_personalize_reply(data):
    cfg = SimulationConfig(model="mlp", rounds=1, local_steps=3, sites=None, personalize=5).resolved(own=data)
    plan = cfg.plan_for(data.input_shape, data.num_outputs, data.schema)
    coord, sites = build_federation(plan, data.sites)
    site = sites["h0"]
    leak = Message(MessageKind.PERSONALIZE_REPLY, 2, coord.job, {"n": 80, "accuracy": 0.8}, {"params": np.zeros(site.size, np.float32)})
    with pytest.raises(ProtocolError, match="undeclared tensor"):
        site.egress.check(leak)
    with pytest.raises(ProtocolError, match="undeclared field"):
        site.egress.check(Message(MessageKind.PERSONALIZE_REPLY, 2, coord.job, {"n": 80, "weights": [0.1, 0.2]}))


def test_a_site_refuses_a_bad_personalize_request(data):
    cfg = SimulationConfig(model="mlp", rounds=1, local_steps=3).resolved(own=data)
    plan = cfg.plan_for(data.input_shape, data.num_outputs, data.schema)
    coord, sites = build_federation(plan, data.sites)
    coord.run_round(1)
    site, plan_meta = sites["h1"], coord.round_plan(2).plan
    for steps in (-3, 0, 2.5, "10", True):
        with pytest.raises(ProtocolError, match="steps"):
            site.handle(Message(MessageKind.PERSONALIZE, 2, coord.job, {"plan": plan_meta, "steps": steps}, {"params": coord.params}))
    with pytest.raises(ProtocolError, match="undeclared field"):
        site.handle(Message(MessageKind.PERSONALIZE, 2, coord.job, {"plan": plan_meta, "steps": 5, "seed": 1}, {"params": coord.params}))
    for lr in (0.0, -1.0, 5.0, "0.1", float("nan")):
        with pytest.raises(ProtocolError, match="lr must be"):
            site.handle(Message(MessageKind.PERSONALIZE, 2, coord.job, {"plan": plan_meta, "steps": 5, "lr": lr}, {"params": coord.params}))
    # the evaluation oracle: fine-tuning and scoring arbitrary parameters is refused like evaluating them
    refused = 0
    for v in (0.1, 0.2, 0.3, 0.4):
        try:
            site.handle(Message(MessageKind.PERSONALIZE, 2, coord.job, {"plan": plan_meta, "steps": 2},
                                {"params": np.full(site.size, v, np.float32)}))
        except ProtocolError as exc:
            assert "never sent to this site" in str(exc)
            refused += 1
    assert refused >= 2


def test_the_option_is_refused_where_it_cannot_apply(data):
    with pytest.raises(ConfigError, match=r"--personalize .*-1"):
        SimulationConfig(personalize=-1).resolved(own=data)
    with pytest.raises(ConfigError, match="validation split; the heart data has none"):
        SimulationConfig(personalize=10).resolved()
    with pytest.raises(ConfigError, match="without DP"):
        SimulationConfig(personalize=10, dp="record", epsilon=3.0).resolved(own=data)
    nodata = FederatedData("noval", tuple(SiteData(s.name, s.X_train, s.y_train, s.X_test, s.y_test) for s in data.sites),
                           data.input_shape, 2, data.schema)
    summary = simulate(data=nodata, model="mlp", rounds=1, local_steps=2, personalize=5, baselines=False, write=False)
    per = summary["final"]["personalized"]  # a site without a validation split says why it gives no figure
    assert per["sites"] == {} and all("validation split" in why for why in per["dropped"].values()) and len(per["dropped"]) == 3
    assert SimulationConfig().resolved().personalize == 0  # off unless asked
    with pytest.raises(ConfigError, match="--personalize-lr given without --personalize"):
        SimulationConfig(personalize_lr=1e-3).resolved(own=data)
    with pytest.raises(ConfigError, match=r"--personalize-lr must be .* got -0.1"):
        SimulationConfig(personalize=5, personalize_lr=-0.1).resolved(own=data)


def test_cli_refuses_a_negative_step_count_in_one_line(tmp_path):
    res = subprocess.run([sys.executable, "-m", "insitu", "simulate", "--personalize", "-5", "--rounds", "1", "--out", str(tmp_path / "r")],
                         capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"}, timeout=120)
    assert res.returncode == 2 and "--personalize" in res.stderr and "-5" in res.stderr and "Traceback" not in res.stderr


def test_summary_and_table_carry_the_personalised_section(data, tmp_path):
    summary = simulate(data=data, model="mlp", rounds=2, local_steps=5, optimizer="adam", lr=0.01, personalize=20, out=str(tmp_path / "run"))
    written = json.loads((tmp_path / "run" / "summary.json").read_text())
    per = written["final"]["personalized"]
    assert per["steps"] == 20 and per["lr"] == 0.01 and set(per["sites"]) == {"h0", "h1", "h2"} and per["dropped"] == {}
    for name, m in per["sites"].items():
        assert {"accuracy", "auroc", "auprc", "score1", "threshold", "best_step", "val_start", "val_best"} <= set(m)
        assert m["val_best"] >= m["val_start"] and 0 <= m["best_step"] <= 20 and m["n"] == 80
        assert m["threshold_source"] == "site validation" and per["site_accuracy"][name] == m["accuracy"]
    assert per["mean_site_auroc"] == pytest.approx(np.mean([m["auroc"] for m in per["sites"].values()]))
    assert "site_accuracy" in written["final"] and "personalized" not in simulate(data=data, model="mlp", rounds=1, write=False)["final"]
    from rich.console import Console

    from insitu.report.tables import summary_table

    con = Console(record=True, width=250)
    con.print(summary_table(summary))
    assert "federated + local fine-tuning" in con.export_text()


def test_a_dp_site_refuses_to_personalise(data):
    """--personalize is refused with --dp by the config; a DP site refuses the request itself too."""
    from insitu.privacy import Budget, PrivacyLedger

    cfg = SimulationConfig(model="mlp", rounds=1, local_steps=2, dp="record", noise_multiplier=1.0).resolved(own=data)
    plan = cfg.plan_for(data.input_shape, data.num_outputs, data.schema)
    ledger = PrivacyLedger(":memory:")
    for s in data.sites:
        ledger.set_budget(s.name, Budget(1e6))
    coord, sites = build_federation(plan, data.sites, ledger=ledger)
    coord.run_round(1)
    with pytest.raises(ProtocolError, match="differentially private plan"):
        sites["h0"].handle(Message(MessageKind.PERSONALIZE, 2, coord.job, {"plan": coord.round_plan(2).plan, "steps": 5},
                                   {"params": coord.params}))


def test_mean_risk_is_the_mean_of_the_two_models_probabilities():
    from insitu.learn.personalize import MeanRisk

    torch.manual_seed(0)
    a, b, X = torch.nn.Linear(6, 1), torch.nn.Linear(6, 1), torch.randn(50, 6) * 4
    with torch.no_grad():
        want = (torch.sigmoid(a(X)) + torch.sigmoid(b(X))) / 2
        assert torch.allclose(torch.sigmoid(MeanRisk(a, b, 1)(X)), want, atol=1e-6)
        a3, b3 = torch.nn.Linear(6, 3), torch.nn.Linear(6, 3)
        want3 = (torch.softmax(a3(X), -1) + torch.softmax(b3(X), -1)) / 2
        assert torch.allclose(torch.softmax(MeanRisk(a3, b3, 3)(X), -1), want3, atol=1e-6)


@pytest.mark.parametrize("mode", ["ensemble", "complement"])
def test_ensemble_mode_mixes_the_global_model_with_one_the_site_trains_alone_and_sends_neither(data, monkeypatch, mode):
    """--personalize-mode ensemble / complement: the site's own model starts from scratch (not from the
    global model), is early-stopped on its validation split, and the reply scores the mean risk of it and
    the global model; the own model's parameters are in no message."""
    import insitu.learn.personalize as P
    from insitu.learn.clinical import risk_scores
    from insitu.learn.metrics import auroc

    sent: list[Message] = []
    made: list[tuple] = []
    handle = Site.handle
    monkeypatch.setattr(Site, "handle", lambda self, msg: sent.append(handle(self, msg)) or sent[-1])
    real = P.own_model_mixture

    def spy(global_model, fresh, *a, **k):
        start = get_flat(fresh).copy()
        mixture, ft = real(global_model, fresh, *a, **k)
        made.append((get_flat(global_model).copy(), start, mixture))
        return mixture, ft

    monkeypatch.setattr(P, "own_model_mixture", spy)
    secrets = {s.name: bytes([i + 1]) * 32 for i, s in enumerate(data.sites)}
    summary = simulate(data=data, model="mlp", rounds=3, local_steps=5, optimizer="adam", lr=0.01, personalize=40,
                       personalize_mode=mode, baselines=False, write=False, site_secrets=secrets)
    per = summary["final"]["personalized"]
    assert per["mode"] == mode and len(made) == 3 and set(per["sites"]) == {"h0", "h1", "h2"}
    for (glob, start, mixture), s in zip(made, data.sites):
        assert not np.allclose(start, glob)  # a fresh initialisation, not the global model
        own = get_flat(mixture.second)
        assert np.array_equal(get_flat(mixture.first), glob) and not np.allclose(own, glob) and not np.allclose(own, start)
        m = per["sites"][s.name]
        risk = (risk_scores(mixture.first, s.X_test) + risk_scores(mixture.second, s.X_test)) / 2
        assert m["auroc"] == pytest.approx(auroc(s.y_test.numpy().astype(int), risk), abs=1e-6)
        assert m["val_start"] == pytest.approx(auroc(s.y_val.numpy().astype(int), risk_scores(mixture.first, s.X_val)))
        for msg in sent:
            for t in msg.tensors.values():
                arr = np.asarray(t).reshape(-1)
                assert arr.size != own.size or not np.allclose(arr.astype(np.float64), own, atol=1e-6)
    replies = [m for m in sent if m.kind is MessageKind.PERSONALIZE_REPLY]
    assert len(replies) == 3 and all(not m.tensors and set(m.meta) <= set(PERSONALIZE_REPLY.meta) for m in replies)
    with pytest.raises(ConfigError, match="--personalize-mode"):
        SimulationConfig(personalize=5, personalize_mode="average").resolved(own=data)
    with pytest.raises(ConfigError, match="--personalize-mode given without --personalize"):
        SimulationConfig(personalize_mode="ensemble").resolved(own=data)


def test_a_site_refuses_an_unknown_personalize_mode(data):
    cfg = SimulationConfig(model="mlp", rounds=1, local_steps=3).resolved(own=data)
    plan = cfg.plan_for(data.input_shape, data.num_outputs, data.schema)
    coord, sites = build_federation(plan, data.sites)
    coord.run_round(1)
    with pytest.raises(ProtocolError, match="personalize request mode: unknown value 'blend'"):
        sites["h0"].handle(Message(MessageKind.PERSONALIZE, 2, coord.job, {"plan": coord.round_plan(2).plan, "steps": 5, "mode": "blend"},
                                   {"params": coord.params}))


def _checkpoints(data, stop_on_mixture: bool):
    """One site's own-model training, run twice from the same generator: once by own_model_mixture, once by
    fine_tune with a scorer that records every checkpoint and scores it independently (numpy means of the
    two models' risks; never the test split)."""
    from insitu.learn.clinical import risk_scores
    from insitu.learn.metrics import auroc
    from insitu.learn.personalize import own_model_mixture

    s = data.sites[2]
    glob = build_model("mlp", (6,), 1, seed=11)
    cfg = TrainConfig(lr=0.05, steps=1, batch_size=16, optimizer="adam")
    yv, gv = s.y_val.numpy().astype(int), risk_scores(glob, s.X_val)
    mixture, ft = own_model_mixture(glob, build_model("mlp", (6,), 1, seed=12), s.X_train, s.y_train, s.X_val, s.y_val, cfg,
                                    torch.Generator().manual_seed(5), num_outputs=1, steps=60, every=5, stop_on_mixture=stop_on_mixture)
    seen: list[tuple[float, float, np.ndarray]] = []  # (mixture AUROC, own AUROC, parameters) at each check

    def record(m):
        own = risk_scores(m, s.X_val)
        seen.append((auroc(yv, (gv + own) / 2), auroc(yv, own), get_flat(m).copy()))
        return "auroc", seen[-1][0 if stop_on_mixture else 1]

    fine_tune(build_model("mlp", (6,), 1, seed=12), s.X_train, s.y_train, s.X_val, s.y_val, cfg, torch.Generator().manual_seed(5),
              num_outputs=1, steps=60, every=5, score=record)
    return mixture, ft, seen


def test_complement_keeps_the_own_checkpoint_whose_mixture_scores_best_on_validation(data):
    """--personalize-mode complement chooses the own model's checkpoint by the MIXTURE's validation AUROC
    (ensemble: by the own model's alone); on this site the two rules keep different checkpoints."""
    kept = {}
    for stop_on_mixture in (True, False):
        mixture, ft, seen = _checkpoints(data, stop_on_mixture)
        assert len(seen) == 13  # step 0 and every 5 steps up to 60
        by = 0 if stop_on_mixture else 1
        first = 1 if stop_on_mixture else 0  # complement: the untrained own model (step 0) is no candidate
        best = max(range(first, len(seen)), key=lambda i: (seen[i][by], -i))  # the first checkpoint with the best score
        assert np.array_equal(get_flat(mixture.second), seen[best][2]) and ft.best_step == 5 * best
        assert ft.val_best == pytest.approx(seen[best][0])  # the reply's val_best is the kept mixture's validation AUROC
        kept[stop_on_mixture] = ft.best_step
    assert kept[True] != kept[False]


def test_complement_never_keeps_the_untrained_own_model(data):
    """A fresh initialisation's risk re-ranks records at random, so step 0 is no candidate: here training
    cannot move the model (a learning rate of 1e-30), every checkpoint ties, and the first TRAINED one is kept
    where a tie would otherwise keep step 0 (ensemble still may)."""
    from insitu.learn.personalize import own_model_mixture

    s = data.sites[2]
    cfg = TrainConfig(lr=1e-30, steps=1, batch_size=16, optimizer="sgd")  # far below float32 resolution: no step moves a weight
    kept = {}
    for stop_on_mixture in (True, False):
        _, ft = own_model_mixture(build_model("mlp", (6,), 1, seed=11), build_model("mlp", (6,), 1, seed=20), s.X_train, s.y_train,
                                  s.X_val, s.y_val, cfg, torch.Generator().manual_seed(0), num_outputs=1, steps=10, every=5,
                                  stop_on_mixture=stop_on_mixture)
        kept[stop_on_mixture] = ft.best_step
    assert kept == {True: 5, False: 0}


def test_complement_choices_never_read_the_test_split(data):
    """Same secrets, same training and validation records, the test labels shuffled: every site keeps the
    same checkpoint with the same validation score; only the test figures move."""
    def run(d):
        s = simulate(data=d, model="mlp", rounds=2, local_steps=5, optimizer="adam", lr=0.01, personalize=30, personalize_mode="complement",
                     baselines=False, write=False, site_secrets={x.name: bytes([i + 7]) * 32 for i, x in enumerate(d.sites)})
        return s

    g = torch.Generator().manual_seed(0)
    shuffled = FederatedData(data.name, tuple(SiteData(s.name, s.X_train, s.y_train, s.X_test, s.y_test[torch.randperm(len(s.y_test), generator=g)],
                                                       s.X_val, s.y_val) for s in data.sites), data.input_shape, 2, data.schema)
    first = run(data)
    a, b = first["final"]["personalized"]["sites"], run(shuffled)["final"]["personalized"]["sites"]
    for name in a:
        assert (a[name]["best_step"], a[name]["val_best"], a[name]["val_start"]) == (b[name]["best_step"], b[name]["val_best"], b[name]["val_start"])
    assert any(a[n]["auroc"] != b[n]["auroc"] for n in a)
    from rich.console import Console

    from insitu.report.tables import summary_table

    con = Console(record=True, width=250)
    con.print(summary_table(first))
    assert "federated + own model stopped for the mix" in con.export_text()
