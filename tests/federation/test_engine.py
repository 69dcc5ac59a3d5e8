"""The round engine: drop-outs, bad updates, minimum sites, replays — over the real in-process transport."""
from __future__ import annotations

import numpy as np
import pytest

from insitu.data.heart import load_heart
from insitu.errors import ProtocolError, RoundAborted
from insitu.builder import build_federation
from insitu.federation.instructions import RoundInstructions
from insitu.federation.messages import Message, MessageKind
from insitu.federation.task import TaskSpec
from insitu.plan import LRSchedule, Plan, StrategySpec


@pytest.fixture(scope="module")
def heart():
    return load_heart()


def _task(data):
    return TaskSpec("logreg", data.input_shape, 1, data.schema, lr=0.05, local_steps=5, batch_size=4)


def _setup(heart, fail=None, min_sites=1, wrap=None, strategy="fedavg", **plan):
    p = Plan(_task(heart), StrategySpec(strategy), min_sites=min_sites, **plan)
    return build_federation(p, heart.sites, fail=fail, wrap=wrap)


class Wrapped:
    """A site handler around a built site: ``alter(site_id, request, reply)`` may change the reply."""

    def __init__(self, site, alter):
        self.site, self.site_id, self.alter = site, site.site_id, alter

    def handle(self, msg):
        return self.alter(self.site_id, msg, self.site.handle(msg))


def test_round_uses_all_sites_and_changes_model(heart):
    coord, _ = _setup(heart)
    before = coord.params.copy()
    rec = coord.run_round(1)
    assert set(rec.participants) == {s.name for s in heart.sites} and not rec.dropped
    assert not np.allclose(before, coord.params)
    assert all(v > 0 for v in rec.bytes_up.values())


def test_dropped_site_is_reported_and_round_completes(heart):
    coord, _ = _setup(heart, fail=lambda s, r, k: s == "hungary", min_sites=3)
    rec = coord.run_round(1)
    assert "hungary" not in rec.participants and "injected" in rec.dropped["hungary"]
    assert len(rec.participants) == 3


def test_too_few_sites_aborts_and_keeps_model(heart):
    away = {"now": True}
    coord, _ = _setup(heart, fail=lambda s, r, k: away["now"] and s != "cleveland", min_sites=2)
    before = coord.params.copy()
    with pytest.raises(RoundAborted, match="1 of 4 sites finished, --min-sites is 2"):
        coord.run_round(1)
    np.testing.assert_array_equal(before, coord.params)
    # the next round runs once the sites are back
    away["now"] = False
    coord.run_round(2)
    assert not np.array_equal(before, coord.params)


def nan_site(sid, msg, reply):
    if msg.kind is MessageKind.TRAIN and sid == "switzerland":
        bad = np.full_like(reply.tensors["update"], np.nan)
        return Message(reply.kind, reply.round, reply.job, reply.meta, {"update": bad})
    return reply


def test_nan_update_is_dropped_with_reason(heart):
    coord, _ = _setup(heart, wrap=lambda s: Wrapped(s, nan_site))
    rec = coord.run_round(1)
    assert "switzerland" not in rec.participants
    assert "NaN" in rec.dropped["switzerland"]
    assert np.all(np.isfinite(coord.params))


def short_site(sid, msg, reply):
    if msg.kind is MessageKind.TRAIN and sid == "cleveland":
        return Message(reply.kind, reply.round, reply.job, reply.meta, {"update": reply.tensors["update"][:3]})
    return reply


def test_wrong_shape_update_is_dropped(heart):
    coord, _ = _setup(heart, wrap=lambda s: Wrapped(s, short_site))
    rec = coord.run_round(1)
    assert "3 values" in rec.dropped["cleveland"] or "shape (3,)" in rec.dropped["cleveland"]


class CrashSite(Wrapped):
    def handle(self, msg):
        if msg.kind is MessageKind.TRAIN and self.site_id == "va-long-beach":
            raise RuntimeError("disk full")
        return self.site.handle(msg)


def test_crashing_site_does_not_crash_coordinator(heart):
    coord, _ = _setup(heart, wrap=lambda s: CrashSite(s, None))
    rec = coord.run_round(1)
    assert "disk full" in rec.dropped["va-long-beach"]


def test_replayed_round_refused_by_site(heart):
    coord, sites = _setup(heart)
    coord.run_round(1)
    plan = coord.round_plan(1)
    with pytest.raises(ProtocolError, match="replayed"):
        sites["cleveland"].handle(plan.train_request("cleveland"))


def test_site_refuses_a_different_plan_and_undeclared_fields(heart):
    coord, sites = _setup(heart)
    other = Plan(TaskSpec("logreg", (13,), 1, heart.schema, lr=0.5, local_steps=5, batch_size=4))
    ins = RoundInstructions().to_meta()
    msg = Message(MessageKind.TRAIN, 1, "job", {"plan": other.to_meta(), "instructions": ins}, {"params": np.zeros(14, np.float32)})
    with pytest.raises(ProtocolError, match="is not the plan this site runs"):
        sites["cleveland"].handle(msg)
    req = coord.round_plan(1).train_request("cleveland")
    for extra in ({"prox_mu": 5.0}, {"seed": 0}, {"weighting": "uniform"}):
        with pytest.raises(ProtocolError, match=f"undeclared field.*{next(iter(extra))}"):
            sites["cleveland"].handle(Message(req.kind, req.round, req.job, {**req.meta, **extra}, req.tensors))
    for bad, why in (({**ins, "mu": 1.0}, "unknown key"), ({k: v for k, v in ins.items() if k != "group"}, "lacks key"),
                     ({**ins, "group": "4"}, "group"), ({**ins, "dp_clip": float("inf")}, "dp_clip")):
        with pytest.raises(ProtocolError, match=why):
            sites["cleveland"].handle(Message(req.kind, req.round, req.job, {**req.meta, "instructions": bad}, req.tensors))
    assert sites["cleveland"].last_round == -1  # nothing trained


def test_scaffold_round_runs_and_keeps_site_controls(heart):
    coord, sites = _setup(heart, strategy="scaffold")
    coord.run_round(1)
    assert all(s.control is not None and np.any(s.control != 0) for s in sites.values())
    assert np.any(coord.strategy.control != 0)


def test_lr_schedule_lowers_but_never_raises_site_lr(heart):
    coord, sites = _setup(heart, lr_schedule=LRSchedule.COSINE, rounds=3)
    plan = coord.round_plan(3)
    assert plan.instructions.lr_scale == pytest.approx(0.1)
    sites["cleveland"].handle(plan.train_request("cleveland"))
    req = plan.train_request("hungary")
    bad = Message(req.kind, req.round, req.job, {**req.meta, "instructions": {**req.meta["instructions"], "lr_scale": 3.0}}, req.tensors)
    with pytest.raises(ProtocolError, match="lr_scale = 3.0 must be in"):
        sites["hungary"].handle(bad)


def test_random_shift_moves_images_by_at_most_s_pixels():
    import torch

    from insitu.learn.train import random_shift

    x = torch.zeros(64, 1, 9, 9)
    x[:, 0, 4, 4] = 1.0  # one bright pixel in the centre
    y = random_shift(x, 2, torch.Generator().manual_seed(0))
    pos = torch.nonzero(y[:, 0] == 1.0)[:, 1:]
    assert y.shape == x.shape and len(pos) == 64
    assert int((pos - 4).abs().max()) <= 2 and len({tuple(p.tolist()) for p in pos}) > 5


def test_a_site_with_no_test_records_says_so_and_the_others_are_scored(heart):
    from dataclasses import replace

    sites = [replace(s, X_test=s.X_test[:0], y_test=s.y_test[:0]) if s.name == "switzerland" else s for s in heart.sites]
    p = Plan(_task(heart), StrategySpec("fedavg"), min_sites=1)
    coord, _ = build_federation(p, sites)
    coord.run_round(1)
    scores = coord.evaluate(1)
    assert "switzerland" not in scores and len(scores) == len(sites) - 1
    assert "switzerland has no records in its 'test' split" in coord.eval_dropped["switzerland"]


class NanScoreSite(Wrapped):
    def handle(self, msg):
        reply = self.site.handle(msg)
        if msg.kind is MessageKind.EVALUATE and self.site_id == "hungary":
            return Message(reply.kind, reply.round, reply.job, {**reply.meta, "loss": float("nan")}, reply.tensors)
        return reply


def test_a_reply_that_cannot_be_encoded_drops_the_site_not_the_simulation(heart):
    coord, _ = _setup(heart, wrap=lambda s: NanScoreSite(s, None))
    coord.run_round(1)
    scores = coord.evaluate(1)
    assert "hungary" not in scores and len(scores) == 3
    assert "reply cannot be sent" in coord.eval_dropped["hungary"]
