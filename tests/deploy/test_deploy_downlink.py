"""Downlink compression on a real consortium over 127.0.0.1 (mTLS, a coordinator process, four site
processes): a job with ``downlink = "delta:int8"`` gives the simulation's model, its status reports bytes
down per site per round (every request: TRAIN and EVALUATE) beside bytes up, the same as the simulation's, and a
site process killed and started again gets the whole plan and the dense model."""
from __future__ import annotations

import pytest

from insitu.coordinator.jobs import JobSpec
from insitu.net import sandbox

pytestmark = pytest.mark.slow

SECRETS = {s: bytes([i + 1]) * 32 for i, s in enumerate(sandbox.SITES)}
JOB = {"name": "dl-int8", "dataset": "heart", "model": "mlp", "rounds": 3, "seed": 0, "min_sites": 4, "downlink": "delta:int8",
       "round_timeout": 60.0}
# long enough rounds that the restarted site is back before the job ends; min_sites 4 waits for it
RESTART = {**JOB, "name": "dl-restart", "rounds": 5, "seed": 1, "local_steps": 1000, "lr": 0.001, "wait_for_sites": 120.0}


@pytest.fixture(scope="module")
def dep(tmp_path_factory, consortium_running):
    root = tmp_path_factory.mktemp("downlink")
    sb = sandbox.create(root, approved=[JobSpec.from_dict(j).plan.content_hash() for j in (JOB, RESTART)], fixed_secrets=SECRETS)
    yield from consortium_running(sb)


def test_int8_downlink_job_matches_simulation_and_reports_bytes_down(dep):
    from insitu.apps.simulate import simulate

    dep.operator("submit", {"job": JOB})
    st = dep.wait_job("dl-int8", timeout=120)
    assert st["status"] == "done", st
    sim = simulate(**{k: v for k, v in JOB.items() if k not in ("name", "round_timeout")}, normalize="site", write=False,
                   baselines=False, site_secrets=SECRETS)
    assert st["final"]["site_accuracy"] == pytest.approx(sim["final"]["site_accuracy"], abs=1e-12)
    first, *later = st["rounds"]
    for s in dep.sites:
        # round one: the whole plan and the dense model; then the plan's hash and deltas (evaluation included)
        assert first["bytes_down"][s] > 1.5 * later[0]["bytes_down"][s]
        assert all(r["bytes_up"][s] > 0 for r in st["rounds"])
    tr = st["traffic"]
    assert tr["downlink"] == "delta:int8" and 0 < tr["bytes_down_per_site_round"] < first["bytes_down"][dep.sites[0]]
    # the same messages as in simulate, whose job is named sim-0: each header names its job, two requests a round
    named = len(JOB["name"]) - len("sim-0")
    final_eval = sim["final"]["evaluation_bytes_down"]
    assert st["final"]["evaluation_bytes_down"] == {s: v + named for s, v in final_eval.items()} and len(final_eval) == 4
    assert tr["bytes_down_per_site_round"] == pytest.approx(sum(sim["final"]["bytes_down_per_round_per_site"].values()) / 4 + 2 * named)


def test_a_restarted_site_process_gets_the_dense_model(dep):
    dep.operator("submit", {"job": RESTART})
    dep.wait_job("dl-restart", rounds=2, timeout=120)
    dep.kill("site-hungary")
    dep.start_site("hungary")
    st = dep.wait_job("dl-restart", timeout=240)
    assert st["status"] == "done", st
    applied = [r for r in st["rounds"] if r["status"] == "applied"]
    dense = applied[0]["bytes_down"]["hungary"]
    assert applied[1]["bytes_down"]["hungary"] < dense / 1.5  # before the restart: deltas
    after = [r for r in applied[2:] if "hungary" in r["participants"]]
    resent = [r for r in after if r["bytes_down"]["hungary"] >= dense / 1.5]
    # after the restart it is sent the whole plan and the dense model once (alone, or after refusing the plan's
    # hash), then the hash and deltas again; the sites that never left get the hash and deltas throughout
    assert len(resent) == 1 and resent[0] is after[0], [(r["round"], r["bytes_down"]) for r in applied]
    assert all(r["bytes_down"][s] < dense / 1.5 for r in applied[1:] for s in r["participants"] if s != "hungary")
