"""A deployed job against a site that sends a finite, absurd update every round (1e30 × its update).

The real coordinator service (its round loop, SQLite job store, blame and exclusion) and the real
site nodes (site.toml, approvals, certificates from the sandbox CA), joined by the in-process
transport instead of mTLS so that everything runs in this process.  The hostile hospital is
refused in each round it is asked, with a reason naming its norm and the bound; after
``exclude_after`` such rounds it is left out; the job finishes, and its model is finite and
exactly the model the three honest hospitals make alone.  The same harness checks that a hospital
whose channel is lost after the last round is waited for (bounded) before the final evaluation.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import replace

import numpy as np
import pytest

from insitu.coordinator.jobs import JobSpec
from insitu.coordinator.service import CoordinatorConfig, CoordinatorService, job_coordinator
from insitu.errors import RoundAborted
from insitu.federation.messages import MessageKind
from insitu.federation.transport import InProcessTransport
from insitu.net import sandbox
from insitu.net.pki import Identity, Role

SITES = sandbox.SITES
HOSTILE = "va-long-beach"
SECRETS = {s: bytes([i + 1]) * 32 for i, s in enumerate(SITES)}
JOB = {"name": "mallory-1e30", "dataset": "heart", "rounds": 5, "seed": 0, "min_sites": 3, "local_steps": 5,
       "exclude_after": 2, "approval_timeout": 0, "eval_every": 1}


class Scaled:
    """The real site node; every TRAIN reply's update multiplied by 1e30 (finite in float32)."""

    def __init__(self, node):
        self.node = node

    def handle(self, msg):
        reply = self.node.handle(msg)
        if reply.kind is MessageKind.TRAIN_REPLY:
            reply = replace(reply, tensors={**reply.tensors, "update": reply.tensors["update"] * np.float32(1e30)})
        return reply


class Loopback(InProcessTransport):
    """The in-process transport with the calls the service makes of a network transport besides exchange."""

    def wait_for(self, names, count, timeout):
        return sorted(self.sites())

    def connections(self):
        return []


def nodes(sb, plan_hash: str, state: str, sites=SITES) -> dict:
    from insitu.data.heart import FEATURES
    from insitu.site.node import SiteNode, load_site_data
    from insitu.site.policy import SitePolicy

    out = {}
    for s in sites:
        policy = SitePolicy.load(sb.write_site_config(s, approved=[plan_hash]))
        policy = dataclasses.replace(policy, state=sb.root / "state" / state / s)
        out[s] = SiteNode(policy, s, load_site_data(policy), schema=tuple(FEATURES))
    return out


def attacked_service(tmp_path, job: dict):
    """A coordinator service whose sites are real site nodes in this process, the hostile one scaling its
    updates, with ``job`` submitted; returns (sandbox, the job's plan hash, the service)."""
    sb = sandbox.create(tmp_path, SITES, fixed_secrets=SECRETS)
    h = JobSpec.from_dict(job).plan.content_hash()
    svc = CoordinatorService(CoordinatorConfig.load(sb.write_coordinator_config()))
    sites = nodes(sb, h, "attacked")
    sites[HOSTILE] = Scaled(sites[HOSTILE])
    svc.server.transport = Loopback(sites)
    svc.operator("submit", {"job": job}, Identity("ops", Role.OPERATOR, 1))
    return sb, h, svc


@pytest.mark.slow
def test_a_site_sending_huge_updates_is_refused_then_excluded_and_the_model_is_the_honest_one(tmp_path):
    spec = JobSpec.from_dict(JOB)
    sb, h, svc = attacked_service(tmp_path, JOB)
    try:
        svc.run_job(svc.store.job(JOB["name"]))
        row = svc.store.job(JOB["name"])
        rounds = svc.store.rounds(JOB["name"])
        assert row.status.value == "done", row.public()
        assert [r["status"] for r in rounds] == ["applied"] * 5
        for r in rounds[:2]:  # asked, refused with its norm and the bound, the round applied with the others
            assert sorted(r["participants"]) == sorted(set(SITES) - {HOSTILE})
            why = r["dropped"][HOSTILE]
            assert re.search(r"^refused update: per-record update norm \d\.\d+e\+\d\d is [\d.e+]+× the round's median "
                             r"[\d.e-]+ \(bound: update_norm_factor 50 × median = [\d.e-]+\)$", why), why
        for r in rounds[2:]:  # excluded: never asked again
            assert sorted(r["participants"]) == sorted(set(SITES) - {HOSTILE}) and not r["dropped"]
        assert svc.store.blame(JOB["name"]) == {HOSTILE: [1, 2]}
        assert svc.excluded[JOB["name"]] == {HOSTILE: "named as the cause of refused updates in rounds 1, 2 (exclude_after = 2)"}
        _, _, params, _ = svc.store.latest_model(JOB["name"])
    finally:
        svc.stop()
        svc.store.close()
    assert np.all(np.isfinite(params)) and float(np.abs(params).max()) < 10
    # the honest hospitals alone, same plan, same secrets: the same model
    coord, _, _ = job_coordinator(spec, JOB["name"], InProcessTransport(nodes(sb, h, "honest", [s for s in SITES if s != HOSTILE])))
    for r in range(1, 6):
        coord.run_round(r)
    assert np.array_equal(np.asarray(params, np.float32), coord.params)


@pytest.mark.slow
def test_a_refused_update_that_leaves_too_few_sites_aborts_the_round_and_still_counts(tmp_path):
    job = {**JOB, "name": "mallory-abort", "min_sites": 4, "rounds": 3, "max_aborted": 2, "sites": list(SITES)}
    _, _, svc = attacked_service(tmp_path, job)
    try:
        with pytest.raises(RoundAborted, match="va-long-beach excluded after causing aborted rounds or refused updates; 3 of the "
                                               "job's sites remain, min_sites is 4"):
            svc.run_job(svc.store.job(job["name"]))  # the service's job loop marks the job failed with this reason
        rounds = svc.store.rounds(job["name"])
        assert [r["status"] for r in rounds] == ["aborted", "aborted"]
        assert all("3 of 4 sites finished" in r["reason"] and r["dropped"][HOSTILE].startswith("refused update") for r in rounds)
        assert svc.store.blame(job["name"]) == {HOSTILE: [1, 2]}
        assert svc.excluded[job["name"]] == {HOSTILE: "named as the cause of aborted rounds 1, 2 (exclude_after = 2)"}
    finally:
        svc.stop()
        svc.store.close()


class Reconnecting(Loopback):
    """A loopback on which ``site`` loses its channel right after the last round's TRAIN and is back
    as soon as the service waits for it (a site re-dialling after a lost channel)."""

    def __init__(self, sites, site: str, last_round: int):
        super().__init__(sites)
        self.site, self.last_round, self.away, self.waited = site, last_round, False, []

    def sites(self):
        return [s for s in super().sites() if not (self.away and s == self.site)]

    def exchange(self, requests, timeout):
        here = {s: m for s, m in requests.items() if not (self.away and s == self.site)}
        ex = super().exchange(here, timeout)
        if any(m.kind is MessageKind.TRAIN and m.round == self.last_round for m in requests.values()):
            self.away = True
        for s in set(requests) - set(here):
            ex.dropped[s] = "not connected"
        return ex

    def wait_for(self, names, count, timeout):
        if self.away and names is not None and self.site in names:
            self.waited.append(timeout)
            self.away = False  # it re-dialled
        return sorted(self.sites())


def test_a_site_reconnecting_as_the_job_ends_is_in_its_final_evaluation(tmp_path):
    """The published figures hold every hospital that took part, even one whose channel was lost after
    the last round: the service waits (bounded) for it to come back before the final evaluation."""
    job = {**JOB, "name": "reconnect", "rounds": 2, "exclude_after": 0}
    sb = sandbox.create(tmp_path, SITES, fixed_secrets=SECRETS)
    h = JobSpec.from_dict(job).plan.content_hash()
    svc = CoordinatorService(CoordinatorConfig.load(sb.write_coordinator_config()))
    try:
        transport = Reconnecting(nodes(sb, h, "reconnect"), HOSTILE, last_round=2)
        svc.server.transport = transport
        svc.operator("submit", {"job": job}, Identity("ops", Role.OPERATOR, 1))
        svc.run_job(svc.store.job(job["name"]))
        row = svc.store.job(job["name"])
        rounds = svc.store.rounds(job["name"])
    finally:
        svc.stop()
        svc.store.close()
    assert row.status.value == "done"
    assert HOSTILE not in rounds[-1]["evaluation"]["sites"]  # the last round's evaluation went without it
    assert transport.waited == [15.0]  # the smaller of the round timeout (60 s) and FINAL_WAIT
    assert sorted(row.public()["final"]["site_accuracy"]) == sorted(SITES)
