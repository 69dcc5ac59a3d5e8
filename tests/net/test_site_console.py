"""The site console over HTTP on 127.0.0.1: login link, Host check, pending task with its ε, approve, refuse."""
from __future__ import annotations

import json
import stat

import httpx
import pytest

from insitu.coordinator.jobs import HEART_SCHEMA as HEART, JobSpec
from insitu.federation.messages import Message, MessageKind
from insitu.kit import write_kit
from insitu.site.console import start_console
from insitu.site.policy import Approvals, SitePolicy


def plan(**kw):
    return JobSpec.from_dict({"name": "p", "dataset": "heart", "lr": 0.05, **kw}).plan


TASK = plan()
DP_TASK = plan(dp="record", noise_multiplier=1.5, clip=1.0)


@pytest.fixture
def console(tmp_path):
    kit = write_kit(tmp_path / "kit", ["hungary"])
    cfg = kit.sites["hungary"]
    text = cfg.read_text().replace("# epsilon_budget = 3.0", "epsilon_budget = 3.0")
    cfg.write_text(text)
    app, server, url = start_console(cfg, port=0)
    try:
        yield app, server, url, cfg
    finally:
        server.stop()


def _login(server, url) -> tuple[httpx.Client, str]:
    c = httpx.Client(base_url=f"http://127.0.0.1:{server.port}", timeout=20)
    r = c.get(url.split(str(server.port), 1)[1])
    assert r.status_code == 303 and "HttpOnly" in r.headers["set-cookie"]
    return c, c.get("/api/session").json()["csrf"]


def test_login_link_is_one_time_private_and_the_host_must_be_loopback(console):
    app, server, url, cfg = console
    link_file = SitePolicy.load(cfg).state / "console.url"
    assert link_file.read_text().strip() == url and stat.S_IMODE(link_file.stat().st_mode) == 0o600
    base = f"http://127.0.0.1:{server.port}"
    assert httpx.get(base + "/").status_code == 401 and httpx.get(base + "/api/state").status_code == 401
    c, csrf = _login(server, url)
    assert httpx.get(url).status_code == 401  # used once
    assert link_file.read_text().strip() != url  # a fresh link replaced it
    assert c.get("/api/state").status_code == 200
    r = c.get("/api/state", headers={"Host": f"rebind.example:{server.port}"})
    assert r.status_code == 403 and "loopback" in r.text
    assert server.server_address[0] == "127.0.0.1"


@pytest.mark.slow  # loads the site's records and the DP accountant (~7 s)
def test_pending_task_with_its_cost_then_approved_and_another_refused(console):
    app, server, url, cfg = console
    policy = SitePolicy.load(cfg)
    ap = Approvals(policy.state)
    ap.remember_refused(DP_TASK, "not approved", count=False, job="heart-dp")
    ap.remember_refused(TASK, "not approved", job="heart-plain")
    c, csrf = _login(server, url)
    st = c.get("/api/state").json()
    assert st["site"] == "hungary" and st["policy"]["epsilon_budget"] == 3.0
    by_job = {t["job"]: t for t in st["pending"]}
    fields = by_job["heart-dp"]["fields"]
    assert fields["dp.noise_multiplier"] == 1.5 and fields["dp.level"] == "record" and fields["task.schema"] == list(HEART)
    assert st["rangeable"] == ["lr", "local_steps", "batch_size", "mu"]
    cost = by_job["heart-dp"]["privacy"]
    assert "σ=1.5" in cost and "first round ε=" in cost and "spent 0 of 3" in cost  # this site's own accountant, its own record count
    assert "refused: this site has a budget" in by_job["heart-plain"]["privacy"]
    h = DP_TASK.content_hash()
    r = c.post(f"/api/tasks/{h}/approve", json={"ranges": {"lr": [0.01, 0.1]}})
    assert r.status_code == 403  # no CSRF header
    r = c.post(f"/api/tasks/{h}/approve", json={"ranges": {"lr": [0.01, 0.1]}}, headers={"X-Insitu-CSRF": csrf})
    assert r.status_code == 200 and r.json()["ranges"] == {"lr": [0.01, 0.1]}
    ap.check(DP_TASK)
    ap.check(plan(dp="record", noise_multiplier=1.5, clip=1.0, lr=0.08))  # within the approved range
    r = c.post(f"/api/tasks/{TASK.content_hash()}/refuse", json={"reason": "no DP, no deal"}, headers={"X-Insitu-CSRF": csrf})
    assert r.status_code == 200
    st = c.get("/api/state").json()
    assert st["pending"] == [] and [a["hash"] for a in st["approved"]] == [h]
    assert st["refused_tasks"][0]["hash"] == TASK.content_hash() and st["refused_tasks"][0]["reason"] == "no DP, no deal"
    with pytest.raises(Exception, match="refused by this site's admin: no DP, no deal"):
        ap.check(TASK)
    # the onboarding check tells the coordinator not to wait for this site
    from insitu.site.onboarding import answer_task_check

    class Node:  # the check SiteNode runs, with this site's approvals
        approvals = ap

        def check_task(self, p):
            ap.check(p)

    reply = answer_task_check(Node(), Message(MessageKind.TASK_CHECK, 0, "heart-plain", {"plan": TASK.to_meta()}))
    assert reply.meta["approved"] is False and reply.meta["refused"] is True and "no DP, no deal" in reply.meta["reason"]
    bad = c.post(f"/api/tasks/{'0' * 64}/approve", json={"ranges": {"model": [0, 1]}}, headers={"X-Insitu-CSRF": csrf})
    assert bad.status_code == 400 and "no range can be set" in bad.json()["error"]


def test_rounds_journal_and_refusals_are_shown(console):
    app, server, url, cfg = console
    from insitu.site.journal import record_round

    policy = SitePolicy.load(cfg)
    msg = Message(MessageKind.TRAIN, 4, "heart-1", {})
    reply = Message(MessageKind.TRAIN_REPLY, 4, "heart-1", {"metrics": {"train_loss": 0.5, "num_samples": 172, "epsilon_round": 0.2, "epsilon_total": 0.9}})
    record_round(policy.state, "hungary", msg, reply, TASK.content_hash(), "secagg")
    (policy.state / "refusals.jsonl").write_text(json.dumps({"at": 1.0, "job": "j", "round": 2, "kind": "train", "reason": "would pass budget"}) + "\n")
    c, _ = _login(server, url)
    st = c.get("/api/state").json()
    assert st["rounds"][0]["job"] == "heart-1" and st["rounds"][0]["metrics"]["num_samples"] == 172 and st["rounds"][0]["protocol"] == "secagg"
    assert st["refusals"][0]["reason"] == "would pass budget" and st["ledger"]["budget"] == 3.0


def test_a_session_survives_a_restart_and_only_digests_are_stored(console):
    app, server, url, cfg = console
    c, csrf = _login(server, url)
    sid = c.cookies.get(next(iter(c.cookies.keys())))
    assert c.get("/api/state").status_code == 200
    port = server.port
    server.stop()
    app2, server2, url2 = start_console(cfg, port=port)  # the console restarted: same state directory
    try:
        assert c.get("/api/state").status_code == 200  # the operator is still logged in
        assert c.get("/api/session").json()["csrf"] == csrf
        store = SitePolicy.load(cfg).state / "console-sessions.sqlite"
        assert stat.S_IMODE(store.stat().st_mode) == 0o600
        raw = b"".join(p.read_bytes() for p in store.parent.glob("console-sessions.sqlite*"))
        token = url2.rsplit("token=", 1)[1]
        assert sid.encode() not in raw and token.encode() not in raw  # digests only
    finally:
        server2.stop()


@pytest.mark.slow
def test_site_serve_also_serves_its_console(tmp_path):
    import subprocess
    import sys
    import time

    kit = write_kit(tmp_path / "kit", ["hungary"])
    cfg = kit.sites["hungary"]
    link = SitePolicy.load(cfg).state / "console.url"
    proc = subprocess.Popen([sys.executable, "-m", "insitu", "site", "serve", "--config", str(cfg), "--console-port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 60
        while not link.exists():  # the coordinator is not running: the site retries, its console is up
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read().decode()[-2000:]
            time.sleep(0.2)
        url = link.read_text().strip()
        c = httpx.Client(base_url=url.split("/login")[0], timeout=20)
        r = c.get("/login", params={"token": url.rsplit("token=", 1)[1]})
        assert r.status_code == 303
        st = c.get("/api/state").json()
        assert st["site"] == "hungary"
    finally:
        proc.terminate()
        proc.wait(20)
