"""Bounded influence of one hostile site on a plain round (insitu.federation.robust).

The screen by itself (weights, sizes, Scaffold's halves, the DP clip), then through the round
engine with real heart sites over the in-process transport: a site that sends a finite but absurd
update, or claims an absurd weight, is dropped with a reason naming the value and the bound, is
named a culprit, and the global model is the one the honest sites alone would have made.
"""
from __future__ import annotations

from dataclasses import replace

import re

import numpy as np
import pytest

from insitu.builder import build_federation, build_protocol
from insitu.data.heart import load_heart
from insitu.errors import ConfigError, ProtocolError
from insitu.federation.instructions import RoundInstructions
from insitu.federation.messages import MessageKind
from insitu.federation.protocol import RoundPlan
from insitu.builder import dp_clip_bound
from insitu.federation.robust import DEFAULT_MAX_RECORDS, DEFAULT_NORM_FACTOR, UpdateScreen
from insitu.federation.task import TaskSpec
from insitu.plan import DPSpec, Plan, StrategySpec

SECRETS = {s: bytes([i + 1]) * 32 for i, s in enumerate(("cleveland", "hungary", "switzerland", "va-long-beach"))}
HOSTILE = "va-long-beach"


def round_plan(size: int, dp_clip: float | None = None, round_: int = 1) -> RoundPlan:
    return RoundPlan("j", round_, (), size, 1.0, 1, {}, RoundInstructions(group=4, dp_clip=dp_clip), {})


def honest(rng: np.random.Generator, sites=("a", "b", "c", "d"), size: int = 50) -> dict[str, tuple[np.ndarray, float]]:
    """Heterogeneous honest updates: per-record norms spread over 3x, weights over 20x."""
    out = {}
    for i, s in enumerate(sites):
        w = float([40, 200, 800, 123][i % 4])
        u = rng.normal(size=size) * (0.01 * (1 + i))
        out[s] = (w * u, w)
    return out


# -- the screen -----------------------------------------------------------------------------------------


def test_honest_heterogeneous_updates_pass():
    rng = np.random.default_rng(0)
    screen = UpdateScreen()
    for r in range(1, 6):
        ups = honest(rng)
        for s, (_, w) in ups.items():
            assert screen.check_weight(s, w) == w
        assert screen.screen(round_plan(50, round_=r), ups) == {}


def test_a_huge_finite_update_is_refused_naming_its_norm_and_the_bound():
    ups = honest(np.random.default_rng(1))
    vec, w = ups["c"]
    ups["c"] = (np.full_like(vec, 1e30), w)
    refused = UpdateScreen().screen(round_plan(50), ups)
    assert list(refused) == ["c"]
    assert "per-record update norm 8.83883e+27" in refused["c"] and f"update_norm_factor {DEFAULT_NORM_FACTOR:g} × median" in refused["c"]
    # a modest blow-up passes the default and is refused by a tighter plan factor
    ups["c"] = (vec * 20, w)
    assert UpdateScreen().screen(round_plan(50), ups) == {}
    assert list(UpdateScreen(norm_factor=5.0).screen(round_plan(50), ups)) == ["c"]


def test_weights_must_be_whole_capped_and_constant():
    screen = UpdateScreen(max_records=5_000)
    with pytest.raises(ProtocolError, match=r"weight 1000000000000000 from x is above the plan's max_site_records = 5,000"):
        screen.check_weight("x", 1e15)
    with pytest.raises(ProtocolError, match="weight 1000000000000000 from x is above the plan's max_site_records"):
        UpdateScreen().check_weight("x", 10**15)
    with pytest.raises(ProtocolError, match="not a whole number of training records"):
        screen.check_weight("x", 12.5)
    for bad in (0, -3, float("nan"), float("inf"), True, 10**400, "12"):
        with pytest.raises(ProtocolError, match="is not a positive number"):
            screen.check_weight("x", bad)
    assert screen.check_weight("x", 300) == 300.0
    with pytest.raises(ProtocolError, match="weight 301 from x differs from the 300 it sent earlier in this job"):
        screen.check_weight("x", 301)
    assert screen.check_weight("x", 300.0) == 300.0 and screen.check_weight("y", 301) == 301.0  # each site its own reference
    with pytest.raises(ProtocolError, match="the plan weights every site 1"):
        UpdateScreen(uniform=True).check_weight("x", 2)


def test_fewer_than_three_updates_only_weight_and_dp_rules_apply():
    ups = dict(list(honest(np.random.default_rng(2)).items())[:2])
    vec, w = ups["b"]
    ups["b"] = (np.full_like(vec, 1e30), w)
    assert UpdateScreen().screen(round_plan(50), ups) == {}  # no majority to compare with
    bound = lambda plan: 0.5  # noqa: E731 - a site-level DP plan's clip
    refused = UpdateScreen(clip_bound=bound).screen(round_plan(50), ups)
    assert sorted(refused) == ["a", "b"] and "above the bound 0.5 the plan's site-level DP clip promises" in refused["b"]
    with pytest.raises(ProtocolError, match="max_site_records"):
        UpdateScreen().check_weight("b", 1e15)


def test_scaffold_control_variate_half_is_screened_on_its_own():
    rng = np.random.default_rng(3)
    ups = {}
    for i, s in enumerate("abcd"):
        w = float(10 * (i + 1))
        dy, dc = rng.normal(size=20) * 0.01, rng.normal(size=20) * 5.0  # Δc is naturally ~Δy/(K·lr): much longer
        ups[s] = (w * np.concatenate([dy, dc]), w)
    assert UpdateScreen(scaffold=True).screen(round_plan(40), ups) == {}
    vec, w = ups["d"]
    ups["d"] = (np.concatenate([vec[:20], vec[20:] * 1e6]), w)  # only the control variate is poisoned
    refused = UpdateScreen(scaffold=True).screen(round_plan(40), ups)
    assert list(refused) == ["d"] and "per-record control-variate update norm" in refused["d"]
    # screened as one vector, the longer Δc half would hide a poisoned Δy half
    ups["d"] = (np.concatenate([vec[:20] * 200, vec[20:]]), w)
    assert UpdateScreen(scaffold=False).screen(round_plan(40), ups) == {}
    assert "per-record model update norm" in UpdateScreen(scaffold=True).screen(round_plan(40), ups)["d"]


# -- the plan -------------------------------------------------------------------------------------------


def _task(data):
    return TaskSpec("logreg", data.input_shape, 1, data.schema, lr=0.05, local_steps=5, batch_size=4)


@pytest.fixture(scope="module")
def heart():
    return load_heart()


def test_plan_fields_are_hashed_only_when_set_and_checked(heart):
    base = Plan(_task(heart))
    assert "update_norm_factor" not in base.to_meta() and "max_site_records" not in base.to_meta()
    assert Plan.from_meta(base.to_meta()) == base
    tight = replace(base, update_norm_factor=8.0, max_site_records=5_000)
    assert tight.content_hash() != base.content_hash()
    assert tight.to_meta()["update_norm_factor"] == 8.0 and tight.to_meta()["max_site_records"] == 5_000
    assert Plan.from_meta(tight.to_meta()) == tight
    assert replace(base, update_norm_factor=DEFAULT_NORM_FACTOR, max_site_records=DEFAULT_MAX_RECORDS).content_hash() == base.content_hash()
    for bad in (1.0, 0.5, float("inf"), True, "10"):
        with pytest.raises(ConfigError, match="update_norm_factor must be a number > 1"):
            replace(base, update_norm_factor=bad)
    for bad in (0, 2.5, -1, 10**16, True):
        with pytest.raises(ConfigError, match="max_site_records must be an integer from 1 to 10\\^15"):
            replace(base, max_site_records=bad)


def test_dp_clip_bound_follows_the_plan(heart):
    task = _task(heart)
    assert dp_clip_bound(Plan(task)) is None
    assert dp_clip_bound(Plan(task, dp=DPSpec(level="record", noise_multiplier=1.0))) is None
    central = dp_clip_bound(Plan(task, dp=DPSpec(level="site", noise_multiplier=1.0, clip=0.5)))
    assert central(round_plan(14)) == pytest.approx(0.5, rel=1e-4)
    adaptive = dp_clip_bound(Plan(task, dp=DPSpec(level="site", noise_multiplier=1.0, adaptive_clip=True)))
    assert adaptive(round_plan(14, dp_clip=0.03)) == pytest.approx(0.03, rel=1e-4)
    for compression in ("int8", "topk:0.5", "shared:0.5+int8", "topk:0.5+int8"):  # central noise: the site sends at most C
        bound = dp_clip_bound(Plan(task, dp=DPSpec(level="site", noise_multiplier=1.0, clip=0.5), compression=compression))
        assert bound(round_plan(14)) == pytest.approx(0.5, rel=1e-4), compression
    dist = Plan(task, dp=DPSpec(level="site", noise_multiplier=1.0, clip=0.5, placement="distributed"), min_sites=4)
    std = dist.dp.site_noise(dist.rounds) * 2 * 0.5 / 2  # z · 2C / √m
    assert dp_clip_bound(dist)(round_plan(14)) == pytest.approx((0.5 + std * (14**0.5 + 12)), rel=1e-4)
    noisy = 0.5 + std * (14**0.5 + 12)
    int8 = dp_clip_bound(replace(dist, compression="int8"))  # distributed noise, then rounding: √256/127 of slack
    assert int8(round_plan(14)) == pytest.approx(noisy * (1 + 16 / 127), rel=1e-4)
    topk8 = dp_clip_bound(replace(dist, compression="topk:0.5+int8"))  # top-k rounds its 7 kept values as one block
    assert topk8(round_plan(14)) == pytest.approx(noisy * (1 + 7**0.5 / 127), rel=1e-4)


# -- through the round engine ---------------------------------------------------------------------------


class Hostile:
    """The real site; for ``HOSTILE`` its TRAIN reply is altered by ``alter(reply)``."""

    def __init__(self, site, alter):
        self.site, self.site_id, self.alter = site, site.site_id, alter

    def handle(self, msg):
        reply = self.site.handle(msg)
        if self.site_id == HOSTILE and reply.kind is MessageKind.TRAIN_REPLY:
            return self.alter(reply)
        return reply


def scaled(reply):
    return replace(reply, tensors={"update": reply.tensors["update"] * np.float32(1e30)})


def weighted(w):
    return lambda reply: replace(reply, meta={**reply.meta, "weight": w})


def run(plan, sites, alter=None, rounds=3):
    coord, _ = build_federation(plan, sites, secrets=SECRETS, seed=0, wrap=(lambda s: Hostile(s, alter)) if alter else None)
    recs = [coord.run_round(r) for r in range(1, rounds + 1)]
    return coord, recs


@pytest.mark.parametrize("alter, match", [
    (scaled, r"refused update: per-record update norm [0-9.e+]+ is [0-9.e+]+× the round's median"),
    (weighted(1e15), r"bad update: weight 1000000000000000 from va-long-beach is above the plan's max_site_records = 1,000,000,000"),
], ids=["update-1e30", "weight-1e15"])
def test_a_hostile_site_is_dropped_named_and_the_model_is_the_honest_sites(heart, alter, match):
    plan = Plan(_task(heart), min_sites=3)
    coord, recs = run(plan, heart.sites, alter)
    honest_sites = [s for s in heart.sites if s.name != HOSTILE]
    ref, _ = run(plan, honest_sites)
    for rec in recs:
        assert HOSTILE not in rec.participants and len(rec.participants) == 3
        assert rec.dropped[HOSTILE].startswith(("refused update", "bad update")), rec.dropped
        assert re.search(match, rec.dropped[HOSTILE]), rec.dropped[HOSTILE]
    assert np.all(np.isfinite(coord.params)) and np.array_equal(coord.params, ref.params)


def test_a_site_whose_weight_changes_is_refused_from_then_on(heart):
    plan = Plan(_task(heart), min_sites=3)
    calls = {"n": 0}

    def grow(reply):
        calls["n"] += 1
        return replace(reply, meta={**reply.meta, "weight": reply.meta["weight"] + (calls["n"] > 1)})

    _, recs = run(plan, heart.sites, grow)
    assert HOSTILE in recs[0].participants
    for rec in recs[1:]:
        assert "differs from the 85 it sent earlier in this job" in rec.dropped[HOSTILE] and "weight 86 " in rec.dropped[HOSTILE]


def test_culprits_reach_the_result_and_honest_plain_dp_and_scaffold_rounds_refuse_nobody(heart):
    task = _task(heart)
    proto = build_protocol(Plan(task, min_sites=3))
    coord, _ = build_federation(Plan(task, min_sites=3), heart.sites, secrets=SECRETS, wrap=lambda s: Hostile(s, scaled), protocol=proto)
    res = proto.collect(coord.round_plan(1), coord.transport)
    assert res.culprits == (HOSTILE,) and HOSTILE in res.dropped
    from insitu.privacy import Budget, PrivacyLedger

    for plan in (Plan(task, StrategySpec("scaffold")), Plan(task, StrategySpec("fedprox", mu=0.5)), Plan(task, compression="topk:0.2"),
                 Plan(task, dp=DPSpec(level="site", noise_multiplier=0.5)),
                 Plan(task, dp=DPSpec(level="site", noise_multiplier=0.5, adaptive_clip=True)),
                 Plan(task, dp=DPSpec(level="site", noise_multiplier=0.5, placement="distributed"), min_sites=4),
                 Plan(task, dp=DPSpec(level="site", noise_multiplier=0.5), compression="int8"),
                 Plan(task, dp=DPSpec(level="record", noise_multiplier=1.0))):
        ledger = PrivacyLedger(":memory:")
        for s in heart.sites:
            ledger.set_budget(s.name, Budget(1e6))
        coord, _ = build_federation(plan, heart.sites, secrets=SECRETS, ledger=ledger)
        for r in range(1, 4):
            rec = coord.run_round(r)
            assert len(rec.participants) == 4 and not rec.dropped, (plan.strategy, plan.dp, plan.compression, rec.dropped)


def test_a_site_level_dp_site_that_skips_its_clip_is_refused_even_alone(heart):
    plan = Plan(_task(heart), dp=DPSpec(level="site", noise_multiplier=0.5, clip=0.5))
    from insitu.privacy import Budget, PrivacyLedger

    ledger = PrivacyLedger(":memory:")
    for s in heart.sites:
        ledger.set_budget(s.name, Budget(1e6))
    two = [s for s in heart.sites if s.name in ("cleveland", HOSTILE)]
    coord, _ = build_federation(plan, two, secrets=SECRETS, ledger=ledger, wrap=lambda s: Hostile(s, lambda r: replace(
        r, tensors={"update": r.tensors["update"] * np.float32(1e3)})))
    rec = coord.run_round(1)
    assert rec.participants == ("cleveland",)
    assert "above the bound 0.500005 the plan's site-level DP clip promises" in rec.dropped[HOSTILE]


def test_a_round_of_zero_updates_refuses_any_other_and_ratios_match_the_rule():
    ups = {s: (np.zeros(5), 10.0) for s in "abc"}
    ups["d"] = (np.full(5, 1e-3), 10.0)
    refused = UpdateScreen().screen(round_plan(5), ups)
    assert list(refused) == ["d"] and "norm 0.000223607 while the round's median is 0 (bound: update_norm_factor 50 × median = 0)" in refused["d"]
    rng = np.random.default_rng(4)
    ups = honest(rng)
    ratios = UpdateScreen().ratios(ups)
    assert sorted(ratios) == sorted(ups) and 1.0 <= max(ratios.values()) < DEFAULT_NORM_FACTOR
    tight = UpdateScreen(norm_factor=max(ratios.values()) * 0.99).screen(round_plan(50), ups)
    assert list(tight) == [max(ratios, key=ratios.get)]  # the rule refuses exactly what its ratio exceeds
