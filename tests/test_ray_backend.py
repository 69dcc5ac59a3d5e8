"""The Ray backend: sites and devices as Ray actors in worker processes, the same plan and round engine.

One private local Ray (2 worker CPU slots, every listener on 127.0.0.1) is started for this module
by the backend's own ``start_local`` and shared by its tests; each run's actors are killed when the
run ends.  Exact-equality tests hand both backends the same site secrets, as the README describes.
"""
from __future__ import annotations

import hashlib
import importlib.util
import ipaddress
import json
import os

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="the Ray backend's tests need ray (pip install 'insitu[ray]')")
psutil = pytest.importorskip("psutil")

from insitu.apps import raybackend  # noqa: E402
from insitu.apps.simulate import simulate  # noqa: E402
from insitu.errors import ConfigError  # noqa: E402

HEART = ("cleveland", "hungary", "switzerland", "va-long-beach")
SECRETS = {s: bytes([i + 7]) * 32 for i, s in enumerate(HEART)}
SHORT = {"rounds": 3, "local_steps": 10, "seed": 5, "baselines": False}


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the module, started the way ``--backend ray`` starts it, with 2 CPU slots."""
    if ray.is_initialized():
        ray.shutdown()
    raybackend.start_local(cpus=2)
    yield
    ray.shutdown()


def test_an_unreachable_ray_address_is_one_clear_error_at_once():
    """(First in the module: it needs this process outside any Ray session.)"""
    assert not ray.is_initialized()
    with pytest.raises(ConfigError, match=r"could not join the Ray cluster at --ray-address '127.0.0.1:1': nothing answers"):
        with raybackend.ray_session("127.0.0.1:1"):
            pass


def _rounds(run_dir) -> list[dict]:
    """rounds.jsonl without the timings."""
    rounds = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    for r in rounds:
        r.pop("seconds", None)
    return rounds


def _flat(d, prefix=""):
    out = {}
    for k, v in (d.items() if isinstance(d, dict) else enumerate(d)):
        key = f"{prefix}{k}"
        if isinstance(v, (dict, list)):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def _differences(a: list[dict], b: list[dict]) -> list[str]:
    """Every field that differs between two rounds.jsonl (for a failure message that names it)."""
    fa, fb = _flat(a), _flat(b)
    return [f"{k}: {fa.get(k, '(absent)')!r} != {fb.get(k, '(absent)')!r}" for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)]


@pytest.mark.parametrize("options", [{}, {"secure_aggregation": True}, {"dropout": 0.3, "compress": "int8"}],
                         ids=["plain", "secure-aggregation", "dropout-int8"])
def test_ray_simulation_gives_the_same_site_accuracies_as_in_process(local_ray, options, tmp_path):
    run = {**SHORT, "write": True, **options, "site_secrets": SECRETS}
    here = simulate(**run, out=str(tmp_path / "here"))
    there = simulate(**run, out=str(tmp_path / "there"), backend="ray")
    assert there["config"]["backend"] == "ray" and here["config"]["backend"] == "in-process"
    assert there["final"]["site_accuracy"] == here["final"]["site_accuracy"]
    assert there["plan_hash"] == here["plan_hash"]
    # round by round: the same participants and drop-outs, the same bytes each way, the same update
    # norm and test accuracies (everything in rounds.jsonl but the timings)
    assert _rounds(tmp_path / "there") == _rounds(tmp_path / "here"), _differences(_rounds(tmp_path / "there"), _rounds(tmp_path / "here"))
    if options.get("dropout"):
        assert any(r["dropped"] for r in _rounds(tmp_path / "here"))  # the drop-out path was exercised


def test_sites_live_in_two_ray_worker_processes_one_torch_thread_each_and_train_the_same_model(local_ray):
    """Through the builder: the model after two rounds is bit-identical, and the sites answered
    from two worker processes other than this one, each with torch pinned to one thread."""
    from insitu.apps.simulate import SimulationConfig, load_federated
    from insitu.builder import build_coordinator, build_federation, initial_params

    cfg = SimulationConfig(rounds=2, local_steps=5, seed=2).resolved()
    data = load_federated(cfg)
    plan = cfg.plan_for(data.input_shape, data.num_outputs, data.schema)
    coord, _ = build_federation(plan, data.sites, seed=2, job="j", secrets=SECRETS)
    with raybackend.ray_session():
        transport = raybackend.site_transport(plan, data.sites, SECRETS, job="j")
        workers = transport.workers()
        remote = build_coordinator(plan, "j", transport, params=initial_params(plan, 2))
        for r in (1, 2):
            rec_here, rec_there = coord.run_round(r), remote.run_round(r)
            assert rec_there.participants == rec_here.participants and rec_there.bytes_up == rec_here.bytes_up
        assert np.array_equal(remote.params, coord.params)
        assert remote.evaluate(3) == coord.evaluate(3)
        # a request for a site nobody holds is dropped, naming it, like the in-process transport does
        ex = transport.exchange({"nowhere": next(iter(_eval_request(plan).values()))}, 10.0)
        assert ex.dropped == {"nowhere": "unknown site 'nowhere'"} and not ex.replies
    pids = {w["pid"] for w in workers}
    assert len(pids) == 2 and os.getpid() not in pids
    assert all(w["torch_threads"] == 1 for w in workers)
    assert all(w["holding"] for w in workers)
    assert transport.hosts == []  # the session emptied its workers: no site data or secret stays in them
    idle = ray.get([h.info.remote() for h in raybackend._pool()])
    assert {w["pid"] for w in idle} >= pids and not any(w["holding"] for w in idle)


def _eval_request(plan):
    from insitu.federation.instructions import EvalInstructions
    from insitu.federation.messages import Message, MessageKind

    return {"x": Message(MessageKind.EVALUATE, 1, "j", {"plan": plan.to_meta(), "instructions": EvalInstructions().to_meta()})}


def _ray_processes() -> list[psutil.Process]:
    """This process and everything it started (GCS, raylet, workers, agents of the local Ray)."""
    me = psutil.Process()
    return [me, *me.children(recursive=True)]


def test_every_ray_listener_is_on_loopback_and_the_dashboard_is_off(local_ray):
    with raybackend.ray_session():  # workers up, so their servers are counted too
        from insitu.apps.simulate import SimulationConfig, load_federated

        cfg = SimulationConfig(rounds=1).resolved()
        data = load_federated(cfg)
        plan = cfg.plan_for(data.input_shape, data.num_outputs, data.schema)
        raybackend.site_transport(plan, data.sites, SECRETS, job="j").workers()
        procs = {p.pid: p for p in _ray_processes()}
        names = {p.name() for p in procs.values() if p.is_running()}
        bound = [(procs[c.pid].name(), c.laddr.ip, c.laddr.port) for c in psutil.net_connections(kind="inet")
                 if c.pid in procs and (c.status == psutil.CONN_LISTEN or (c.type == 2 and not c.raddr))]
    assert {"gcs_server", "raylet"} <= names, names
    servers = {name for name, _, _ in bound}
    assert {"gcs_server", "raylet"} <= servers, bound  # the check saw Ray's own servers
    outside = [b for b in bound if not ipaddress.ip_address(b[1].removeprefix("::ffff:")).is_loopback]
    assert not outside, f"Ray listens outside loopback: {outside}"
    assert not [b for b in bound if b[2] == 8265], "the Ray dashboard is listening"


def test_without_ray_the_backend_is_refused_in_one_line_saying_how_to_install(monkeypatch, capsys, tmp_path):
    from insitu.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    with pytest.raises(SystemExit) as exc:
        main(["simulate", "--backend", "ray", "--rounds", "1", "--no-baselines", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1
    assert "needs Ray" in err and f"pip install 'ray=={raybackend.RAY_VERSION}'" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("options, needle", [
    ({"backend": "spark"}, "unknown value 'spark'"),
    ({"ray_address": "10.0.0.5:6379"}, "add --backend ray"),
    ({"backend": "ray", "ray_address": "head 6379"}, "must be a Ray address"),
])
def test_bad_backend_options_are_refused_naming_the_value(options, needle):
    with pytest.raises(ConfigError, match=needle):
        simulate(**SHORT, **options, write=False)


# -- differential privacy on Ray: each site's ledger in its worker, mirrored by the driver ----------------
COORDINATOR = b"c" * 32  # central site-level noise: the coordinator's secret, the same for both backends


def _ledger(path) -> dict[str, list]:
    """A ledger file's budgets and records, without what differs between two runs by design
    (the random run id, the time of each record)."""
    import sqlite3

    with sqlite3.connect(str(path)) as db:
        budgets = db.execute("SELECT site, epsilon, delta, accountant FROM budgets ORDER BY site").fetchall()
        jobs = {j: f"job{i}" for i, (j,) in enumerate(db.execute("SELECT job FROM ledger GROUP BY job ORDER BY MIN(seq)"))}
        rows = [(s, jobs[j], *rest) for s, j, *rest in db.execute(
            "SELECT site, job, round, mechanism, events, epsilon_round, epsilon_total, delta, accountant FROM ledger ORDER BY seq")]
    return {"budgets": budgets, "records": rows}


def _final(summary) -> dict:
    """summary["final"] without timings and the run's random ledger id."""
    final = {k: v for k, v in summary["final"].items() if k != "seconds"}
    final["privacy"] = {k: v for k, v in final["privacy"].items() if k != "ledger_run_id"}
    return final


@pytest.mark.parametrize("options, refused", [
    # fixed noise, default budget (ε 10): Switzerland's 30 training records (q = 0.53) spend it in one round; it refuses the rest
    ({"dp": "record", "noise_multiplier": 1.1, "clip": 1.0, "batch_size": 16}, [("switzerland", 2), ("switzerland", 3)]),
    # the noise calibrated to ε by every site for its own sampling rate, in its worker (PLD: ~11 s on its own)
    pytest.param({"dp": "record", "epsilon": 1.0, "rounds": 2, "local_steps": 4}, [], marks=pytest.mark.slow),
    ({"dp": "site", "epsilon": 3.0, "clip": 1.0}, []),
    ({"dp": "site", "epsilon": 3.0, "clip": 1.0, "dp_placement": "distributed", "min_sites": 3}, []),
    # make demo's recipe: each site's DP moments release is charged (round 0) before training, in the driver
    ({"dp": "site", "epsilon": 3.0, "clip": 1.0, "recipe": "consortium"}, []),
], ids=["record-level", "record-level-epsilon", "site-level-central", "site-level-distributed", "site-level-consortium"])
def test_ray_dp_run_gives_the_in_process_accuracies_ledger_and_privacy_report(local_ray, options, refused, tmp_path):
    run = {**SHORT, "write": True, **options, "site_secrets": SECRETS, "coordinator_secret": COORDINATOR}
    here = simulate(**run, out=str(tmp_path / "here"))
    there = simulate(**run, out=str(tmp_path / "there"), backend="ray")
    assert there["final"]["site_accuracy"] == here["final"]["site_accuracy"]
    assert _rounds(tmp_path / "there") == _rounds(tmp_path / "here")  # ε per round and site included
    assert _final(there) == _final(here)  # ε per site, budgets, noise, refusals, ε by round
    assert set(here["final"]["epsilon_per_site"]) == set(HEART) and all(e > 0 for e in here["final"]["epsilon_per_site"].values())
    assert "assumed_charges" not in there["final"]["privacy"]
    assert [(r["site"], r["round"]) for r in there["final"]["privacy"]["refusals"]] == refused  # by the site, in its worker
    assert all("budget has" in r["reason"] for r in there["final"]["privacy"]["refusals"])
    ledger = _ledger(tmp_path / "there" / "privacy_ledger.sqlite")
    assert ledger == _ledger(tmp_path / "here" / "privacy_ledger.sqlite")
    charged = [(s, r["round"]) for r in _rounds(tmp_path / "here") for s in r["epsilon_sites"]]
    moments = [(s, 0) for s in HEART] if options.get("recipe") == "consortium" else []
    assert [(row[0], row[2]) for row in ledger["records"]] == moments + charged and charged
    if moments:
        assert there["normalization"]["epsilon_spent"] == here["normalization"]["epsilon_spent"]


def test_ray_dp_site_refuses_once_its_persisted_budget_runs_out_mid_run_as_in_process(local_ray, tmp_path):
    """A persisted ledger carries a first run's spending into a second, in which cleveland's budget runs
    out after round 2: its worker refuses rounds 3 and 4 itself (the ledger it checks starts from the
    driver's, so it knows the first run's spending), exactly as the in-process site does."""
    common = {**SHORT, "dp": "site", "clip": 1.0, "site_secrets": SECRETS, "coordinator_secret": COORDINATOR, "write": True}
    runs = {}
    for backend in ("in-process", "ray"):
        book = tmp_path / f"{backend}.sqlite"
        first = simulate(**{**common, "rounds": 2, "epsilon": 2.0}, site_budget="cleveland=3,default=8", privacy_ledger=str(book),
                         backend=backend, out=str(tmp_path / f"{backend}-1"))
        second = simulate(**{**common, "rounds": 4, "epsilon": 3.0}, privacy_ledger=str(book), backend=backend,
                          out=str(tmp_path / f"{backend}-2"))
        runs[backend] = (first, second, _rounds(tmp_path / f"{backend}-2"), _ledger(book))
    (first, second, rounds, ledger), (r_first, r_second, r_rounds, r_ledger) = runs["in-process"], runs["ray"]
    assert [r["round"] for r in second["final"]["privacy"]["refusals"] if r["site"] == "cleveland"] == [3, 4]
    assert all(r["site"] == "cleveland" for r in second["final"]["privacy"]["refusals"])
    assert "budget has" in rounds[2]["dp_refused"]["cleveland"] and "cleveland" not in rounds[2]["participants"]
    assert _final(r_first) == _final(first) and _final(r_second) == _final(second)
    assert r_rounds == rounds
    assert r_ledger == ledger
    assert second["final"]["epsilon_per_site"]["cleveland"] <= 3.0 < second["final"]["epsilon_per_site"]["hungary"]


def test_a_lost_ray_reply_never_leaves_the_driver_counting_less_than_the_site_spent(local_ray):
    """Round 2's replies come too late and a worker is then killed: the driver's ledger holds round 2
    for every site at once (charged as if trained: fail closed), and round 3 for the killed worker's
    sites (the driver cannot tell whether they charged it before the worker died); settling confirms
    the live worker's sites against its own ledger; the killed worker's sites are asked (and charged)
    nothing more, and the report lists the charges no site could confirm."""
    from insitu.apps.simulate import SimulationConfig, load_federated
    from insitu.builder import build_coordinator, initial_params
    from insitu.errors import RoundAborted
    from insitu.privacy import Budget, PrivacyLedger

    cfg = SimulationConfig(rounds=4, local_steps=5, seed=2, dp="site", epsilon=3.0, clip=1.0).resolved()
    data = load_federated(cfg)
    plan = cfg.plan_for(data.input_shape, data.num_outputs, data.schema)
    ledger = PrivacyLedger(":memory:")
    for s in HEART:
        ledger.set_budget(s, Budget(3.0, plan.dp.delta))
    with raybackend.ray_session():
        transport = raybackend.site_transport(plan, data.sites, SECRETS, job="j", ledger=ledger)
        coord = build_coordinator(plan, "j", transport, params=initial_params(plan, 2))
        coord.run_round(1)
        assert [(r.site, r.round) for r in ledger.records()] == [(s, 1) for s in HEART]
        coord.timeout = 1e-4  # nobody answers in time
        with pytest.raises(RoundAborted):
            coord.run_round(2)
        assert sorted((r.site, r.round) for r in ledger.records() if r.round == 2) == [(s, 2) for s in sorted(HEART)]
        assert set(transport.mirror.assumed) == {(s, 2) for s in HEART}
        killed = transport.hosts[0]
        ray.kill(killed, no_restart=True)
        victims = {s for s in HEART if transport._owner(s) == 0}
        coord.timeout = 600.0
        rec = coord.run_round(3)
        assert set(rec.participants) == set(HEART) - victims and set(rec.dropped) == victims
        assert all("Ray worker failed: ActorDiedError" in rec.dropped[s] for s in victims)
        rec = coord.run_round(4)  # a gone worker's sites are not asked (nor charged) again
        assert all(rec.dropped[s].startswith("site's Ray worker is gone (ActorDiedError") for s in victims)
        assert set(transport.gone) == {0}
        report = transport.dp_report(plan).final()
        # the live worker confirmed its sites' round 2; the killed one's rounds 2 and 3 stay assumed
        assert sorted(transport.mirror.assumed) == sorted((s, r) for s in victims for r in (2, 3))
        survivors = [h for i, h in enumerate(transport.hosts) if i not in transport.gone]
        site_side = {(c.site, c.round): c.epsilon_total for h in survivors for c in ray.get(h.ledger_state.remote())}
    driver = {(r.site, r.round): r.epsilon_total for r in ledger.records()}
    assert {k: driver[k] for k in site_side} == site_side  # every charge the live sites made, with their ε
    assert {k for k in driver if k[0] in victims} == {(s, r) for s in victims for r in (1, 2, 3)}
    assert {k for k in driver if k[0] not in victims} == {(s, r) for s in set(HEART) - victims for r in (1, 2, 3, 4)}
    assumed = report["privacy"]["assumed_charges"]
    assert [(c["site"], c["round"]) for c in assumed] == sorted((s, r) for s in victims for r in (2, 3))
    assert all("timed out" in c["reason"] for c in assumed if c["round"] == 2)
    assert all("ActorDiedError" in c["reason"] for c in assumed if c["round"] == 3)


def test_the_driver_mirrors_only_charges_it_can_reproduce_and_never_one_no_site_made():
    """The mirror itself (no Ray needed): a site's ledger in a worker starts from the driver's (past
    releases included); a charge whose ε the driver cannot reproduce, a charge of a site not in the
    run, or a driver charge no site made at settling stops the run; a charge the driver missed is
    recorded at settling."""
    from dataclasses import replace

    from insitu.apps.rayledger import LedgerMirror, SiteCharge, SiteRefusal, worker_ledger
    from insitu.apps.simulate import SimulationConfig, load_federated
    from insitu.errors import SecurityError
    from insitu.privacy import Budget, PrivacyLedger

    cfg = SimulationConfig(rounds=4, dp="site", epsilon=3.0, clip=1.0).resolved()
    data = load_federated(cfg)
    plan = cfg.plan_for(data.input_shape, data.num_outputs, data.schema)
    driver = PrivacyLedger(":memory:")
    for s in HEART:
        driver.set_budget(s, Budget(3.0, plan.dp.delta))
    mirror = LedgerMirror.of(plan, data.sites, driver, "j")
    events = mirror.guards["cleveland"].events
    driver.charge("cleveland", "earlier-job", 1, events)  # a past release, which the site's own ledger must know
    site = worker_ledger([mirror.seed("cleveland"), mirror.seed("hungary")])
    assert site.spent("cleveland") == driver.spent("cleveland") and site.spent("hungary") == 0.0

    mirror.apply([SiteCharge.of(site.charge("cleveland", "j", 1, events)), SiteRefusal("hungary", 1, "too few shares")])
    assert [(r.job, r.round) for r in driver.records("cleveland")] == [("earlier-job", 1), ("j", 1)]
    assert driver.spent("cleveland") == site.spent("cleveland") and mirror.guards["hungary"].refused == {1: "too few shares"}

    forged = SiteCharge.of(site.charge("cleveland", "j", 2, events))
    with pytest.raises(SecurityError, match="the site's ledger says"):
        mirror.apply([replace(forged, epsilon_total=forged.epsilon_total * 0.9)])
    with pytest.raises(SecurityError, match="not a site of this run"):
        mirror.apply([replace(forged, site="elsewhere")])
    missed = SiteCharge.of(site.charge("cleveland", "j", 3, events))
    mirror.settle({"cleveland": [c for c in map(SiteCharge.of, site.records(job="j"))]})  # round 2 was recorded, 3 is added
    assert [r.round for r in driver.records("cleveland", job="j")] == [1, 2, 3] and missed.round == 3
    assert driver.spent("cleveland") == site.spent("cleveland")
    # a lost reply is charged fail-closed; hungary's worker then shows it never trained round 2: the charge stays, listed
    mirror.assume("hungary", 2, "timed out")
    mirror.settle({"hungary": []})
    assert [r.round for r in driver.records("hungary")] == [2] and mirror.assumed == {("hungary", 2): "timed out"}
    mirror.assumed.clear()  # a driver charge no site made, not assumed for a lost reply, is an error
    with pytest.raises(SecurityError, match=r"holds round\(s\) \[2\] of site hungary that the site never charged"):
        mirror.settle({"hungary": []})


def test_backend_is_a_simulate_only_job_key():
    from insitu.coordinator.jobs import JobSpec

    with pytest.raises(ConfigError, match=r"\['backend'\] apply to insitu simulate only"):
        JobSpec.from_dict({"name": "j", "backend": "ray"})


def _device_secret(name: str) -> bytes:
    return hashlib.sha256(b"test-device/" + name.encode()).digest()


def test_ray_cross_device_gives_the_same_accuracy_as_in_process(local_ray):
    from insitu.compress.crossdevice import CrossDeviceConfig, cross_device
    from insitu.learn.train import single_thread

    cfg = CrossDeviceConfig(devices=400, fraction=0.05, rounds=2, local_steps=3, offline=0.2, eval_devices=30, seed=3, compress="topk:0.2")
    with single_thread():
        here = cross_device(cfg, device_secrets=_device_secret)
    there = cross_device(CrossDeviceConfig(**{**cfg.__dict__, "backend": "ray"}), device_secrets=_device_secret)
    assert there["final"]["accuracy"] == here["final"]["accuracy"]
    assert there["final"]["devices_made"] == here["final"]["devices_made"] == 2 * 20 + 30
    assert [(r["completed"], r["offline"], r["bytes_up_per_device"]) for r in there["rounds"]] == \
        [(r["completed"], r["offline"], r["bytes_up_per_device"]) for r in here["rounds"]]


@pytest.mark.slow
def test_ray_cross_device_10000_devices_over_two_worker_processes_matches_in_process(local_ray):
    """Issue 19's must-show: 10,000 devices, 5 % per round, two local Ray worker processes."""
    from insitu.compress.crossdevice import CrossDeviceConfig, cross_device
    from insitu.learn.train import single_thread

    cfg = CrossDeviceConfig(devices=10_000, fraction=0.05, rounds=3, seed=1)
    with single_thread():
        here = cross_device(cfg, device_secrets=_device_secret)
    there = cross_device(CrossDeviceConfig(**{**cfg.__dict__, "backend": "ray"}), device_secrets=_device_secret)
    workers = ray.get([h.info.remote() for h in raybackend._pool()])  # the run's workers, emptied after it
    assert len({w["pid"] for w in workers} - {os.getpid()}) == 2 == raybackend.cluster_cpus()
    assert there["devices_per_round"] == 500 and there["final"]["rounds_completed"] == 3
    assert there["final"]["accuracy"] == here["final"]["accuracy"]
    assert there["final"]["eval_records"] == here["final"]["eval_records"]


@pytest.mark.slow
def test_ray_address_joins_an_existing_cluster_gives_the_same_result_and_leaves_it_running(tmp_path):
    """A Ray head started apart (`ray start --head`, loopback, token auth), joined by a separate driver
    process through ``ray_address``; the head is still up afterwards, then stopped by its own pid."""
    import signal
    import socket
    import subprocess
    import sys
    import tempfile
    import time
    from pathlib import Path

    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
           "PYTHONPATH": str(Path(raybackend.__file__).resolve().parents[2])}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    head = subprocess.Popen([str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
                             "--port", str(port), "--num-cpus", "2", "--include-dashboard", "false", "--disable-usage-stats"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the Ray head did not come up"
                time.sleep(0.3)
        code = (f"import json; from insitu.apps.simulate import simulate; S = {SECRETS!r}\n"
                f"run = dict(rounds=2, local_steps=5, baselines=False, write=False, site_secrets=S)\n"
                f"a = simulate(**run); b = simulate(**run, backend='ray', ray_address='127.0.0.1:{port}')\n"
                f"print(json.dumps([a['final']['site_accuracy'], b['final']['site_accuracy']]))")
        driver = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert driver.returncode == 0, driver.stderr[-2000:]
        here, there = json.loads(driver.stdout.strip().splitlines()[-1])
        assert there == here
        assert f"joined the cluster at 127.0.0.1:{port}" in driver.stderr
        socket.create_connection(("127.0.0.1", port), timeout=2).close()  # the cluster is still running
        assert head.poll() is None
    finally:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
        pointer = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"  # `ray start` leaves it behind
        if pointer.exists() and pointer.read_text().strip() == f"127.0.0.1:{port}":
            pointer.unlink()
