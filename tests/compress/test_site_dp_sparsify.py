"""Site-level DP with a sparsifying compressor: what a site sends stays within the clip the noise is sized for.

Site-level DP (DP-FedAvg) adds noise for an update of norm at most C.  A sparsifier with error
feedback would add the coordinates it did not send in earlier rounds to the next update, after the
clip: what leaves the site could then be several times C, unnoised in proportion, and the ε the run
reports would not hold (under secure aggregation the same excess also overflowed the fixed-point
bound and aborted rounds).  So under site-level DP a site keeps no residual: each round it sends
part of its clipped update and drops the rest.  Real heart sites over the in-process transport.
"""
from __future__ import annotations

import numpy as np
import pytest

from insitu.builder import build_federation
from insitu.data.heart import load_heart
from insitu.federation.messages import MessageKind
from insitu.federation.task import TaskSpec
from insitu.plan import DPSpec, Plan
from insitu.privacy import Budget, PrivacyLedger

SECRETS = {s: bytes([i + 1]) * 32 for i, s in enumerate(("cleveland", "hungary", "switzerland", "va-long-beach"))}
CLIP = 0.02  # small enough that the clip binds on every heart update


class Watch:
    """The real site; records the norm of the values each TRAIN reply carries."""

    def __init__(self, site, norms: dict[str, list[float]]):
        self.site, self.site_id, self.norms = site, site.site_id, norms

    def handle(self, msg):
        reply = self.site.handle(msg)
        if reply.kind is MessageKind.TRAIN_REPLY:
            values = np.asarray(reply.tensors["values"], dtype=np.float64)
            self.norms.setdefault(self.site_id, []).append(float(np.linalg.norm(values)))
        return reply


@pytest.fixture(scope="module")
def heart():
    return load_heart()


def _run(heart, plan: Plan, rounds: int = 8) -> dict[str, list[float]]:
    ledger = PrivacyLedger(":memory:")
    for s in heart.sites:
        ledger.set_budget(s.name, Budget(1e6))
    norms: dict[str, list[float]] = {}
    coord, _ = build_federation(plan, heart.sites, secrets=SECRETS, seed=0, ledger=ledger, wrap=lambda s: Watch(s, norms))
    for r in range(1, rounds + 1):
        rec = coord.run_round(r)
        assert len(rec.participants) == 4, rec.dropped
    return norms


@pytest.mark.parametrize("compression", ["shared:0.1", "topk:0.1"])
def test_site_level_dp_sends_no_more_than_the_clip_in_any_round(heart, compression):
    task = TaskSpec("logreg", heart.input_shape, 1, heart.schema, lr=0.05, local_steps=5, batch_size=4)
    plan = Plan(task, dp=DPSpec(level="site", noise_multiplier=1.0, clip=CLIP), compression=compression)
    norms = _run(heart, plan)
    assert sorted(norms) == sorted(SECRETS) and all(len(v) == 8 for v in norms.values())
    worst = max(n for v in norms.values() for n in v)
    assert worst <= CLIP * (1 + 1e-5), f"a site sent an update of norm {worst:.4g} under a clip of {CLIP}: {norms}"
    assert worst > CLIP * 0.5  # the clip binds here, so a residual riding along would have shown


def test_only_site_level_dp_drops_the_residual(heart):
    """DP-SGD noises every step, so a record-level update is already private and its residual is
    post-processing: it keeps error feedback, as a run without DP does."""
    from insitu.builder import build_site

    task = TaskSpec("logreg", heart.input_shape, 1, heart.schema, lr=0.05, local_steps=5, batch_size=4)
    site = heart.sites[0]
    ledger = PrivacyLedger(":memory:")
    ledger.set_budget(site.name, Budget(1e6))
    feedback = {}
    for dp in (DPSpec(), DPSpec(level="record", noise_multiplier=1.0), DPSpec(level="site", noise_multiplier=1.0, clip=CLIP)):
        built = build_site(Plan(task, dp=dp, compression="shared:0.1"), site.name, site, secret=SECRETS[site.name], ledger=ledger)
        feedback[dp.level.value if dp.level else "off"] = built.pipeline.compress.uses_feedback
    assert feedback == {"off": True, "record": True, "site": False}


class Decoded(Watch):
    """The real site; records the norm of the update each TRAIN reply decodes to (any encoding)."""

    def handle(self, msg):
        from insitu.compress.codec import decode_update

        reply = self.site.handle(msg)
        if reply.kind is MessageKind.TRAIN_REPLY:
            vec = decode_update(reply.meta, reply.tensors, msg.tensors["params"].size, msg.job, msg.round)
            self.norms.setdefault(self.site_id, []).append(float(np.linalg.norm(vec)))
        return reply


@pytest.mark.parametrize("compression", ["int8", "topk:0.6+int8", "shared:0.9+int8"])
def test_central_site_level_dp_with_int8_sends_no_more_than_the_clip(heart, compression):
    """Stochastic int8 rounding lengthens a vector by up to √block/127 of its norm; with the noise
    added centrally (sized for C) the site scales a rounded update longer than C back to C."""
    task = TaskSpec("logreg", heart.input_shape, 1, heart.schema, lr=0.05, local_steps=5, batch_size=4)
    plan = Plan(task, dp=DPSpec(level="site", noise_multiplier=1.0, clip=CLIP), compression=compression)
    norms: dict[str, list[float]] = {}
    ledger = PrivacyLedger(":memory:")
    for s in heart.sites:
        ledger.set_budget(s.name, Budget(1e6))
    coord, _ = build_federation(plan, heart.sites, secrets=SECRETS, seed=0, ledger=ledger, wrap=lambda s: Decoded(s, norms))
    for r in range(1, 9):
        rec = coord.run_round(r)
        assert len(rec.participants) == 4, rec.dropped
        assert not any("dp_reclipped" in m for m in rec.train.values())  # the norm before re-clipping stays at the site
    worst = max(n for v in norms.values() for n in v)
    assert worst <= CLIP * (1 + 1e-5), f"a site sent an update of norm {worst:.6g} under a clip of {CLIP}"
    assert worst > CLIP * 0.95  # the clip binds, so rounding that lengthened it would have shown
