"""Bad jobs through a real operator channel (mTLS on 127.0.0.1, the real coordinator service).

Each job that once passed submit and later killed the coordinator (issue 15), or ended the operator
channel's thread so that the operator read only "peer closed the channel", is now refused at submit
with one line naming the field and the value; the channel and the coordinator keep serving.
A job that fails in setup is marked failed with its reason, and one whose setup stopped the
coordinator twice in a row is failed at the next start instead of being retried in a crash loop.
"""
from __future__ import annotations

import json
import sqlite3
import threading
import time

import pytest

from insitu.cli import main
from insitu.coordinator.service import MAX_SETUP_CRASHES, CoordinatorConfig, CoordinatorService
from insitu.coordinator.store import JobStatus, JobStore
from insitu.errors import InsituError
from insitu.net import sandbox

IMAGE = {"dataset": "pneumoniamnist", "task": {"input_shape": [1, 28, 28], "num_outputs": 2, "schema": ["image"]}}

#: (job fields over a valid heart job, what the one-line error must say)
BAD_JOBS = [
    # the five of issue 15
    ({**IMAGE, "task": {**IMAGE["task"], "input_shape": [-3]}}, "input_shape must be 1 to 4 positive integers"),
    ({"round_timeout": 1e308}, "round_timeout must be a number of seconds in (0, 86400], got 1e+308"),
    ({"seed": 99999999999999999999999}, "seed must be an integer from 0 to 2^63-1, got 99999999999999999999999"),
    ({"sites": 5}, "sites must be a list of 1 to 10,000 site names, got 5"),
    ({"task": "x"}, "[task] gives the data's shape only"),
    # and their neighbours: every field's type and range
    ({**IMAGE, "task": {**IMAGE["task"], "input_shape": [2**40, 2**40]}}, "each at most 1,000,000"),
    ({**IMAGE, "task": {**IMAGE["task"], "input_shape": [1_000_000, 1_000_000]}}, "the limit is 8,000,000"),
    ({**IMAGE, "task": {**IMAGE["task"], "num_outputs": "2"}}, "num_outputs must be an integer from 1 to 100,000, got '2'"),
    ({**IMAGE, "task": {**IMAGE["task"], "schema": [1, 2]}}, "schema must be a list of 1 to 100,000 feature names"),
    ({"round_timeout": True}, "round_timeout must be a number of seconds"),
    ({"rounds": 10**9}, "rounds must be an integer from 1 to 1,000,000"),
    ({"min_sites": "3"}, "min_sites must be an integer from 1 to 1,000,000, got '3'"),
    ({"seed": -1}, "seed must be an integer from 0 to 2^63-1, got -1"),
    ({"sites": [1, 2]}, "sites: 1 is not a site name"),
    ({"sites": ["cleveland", "cleveland"]}, "sites lists ['cleveland'] more than once"),
    ({"sites": ["Cleveland; DROP"]}, "is not a site name"),
    ({"sites": ["cleveland"], "min_sites": 3}, "--min-sites 3 must be between 1 and the number of sites (1)"),
    ({"lr": "fast"}, "lr must be a number, got 'fast'"),
    ({"local_steps": 10**30}, "local_steps must be an integer from 1 to 10,000,000"),
    ({"eval_every": -1}, "eval_every must be an integer from 0 to 1,000,000, got -1"),
    ({"max_aborted": 2.5}, "max_aborted must be an integer"),
    ({"name": "a b"}, "job name 'a b' must be 1-64 letters"),
    ({"strategy": "fedmagic"}, "strategy: unknown value 'fedmagic'"),
    ({"epsilon": 1.0}, "epsilon given without dp = record or site"),
    ({"data": "/etc/passwd"}, "apply to insitu simulate only"),
    ({"personalize": 300}, "apply to insitu simulate only"),  # deployed personalisation is not built yet
    ({"bogus": 1}, "unknown keys ['bogus']"),
]
GOOD = {"name": "fine", "dataset": "heart", "rounds": 1, "min_sites": 1, "round_timeout": 5.0, "wait_for_sites": 0.5, "approval_timeout": 0}


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory):
    """The real coordinator service (TLS 1.3 listener, SQLite store, operator handler) in this process."""
    root = tmp_path_factory.mktemp("validation")
    sb = sandbox.create(root, sites=("cleveland",))
    sb.write_coordinator_config()
    svc = CoordinatorService(CoordinatorConfig.load(root / "coordinator.toml")).start()
    sb.port = svc.port
    sb.write_operator_config("ops")
    try:
        yield sb, svc
    finally:
        svc.stop()
        svc.store.close()


def toml_value(v) -> str:
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + "}"
    if isinstance(v, float) and v == float("inf"):
        return "inf"
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return repr(v)


def cli(capsys, *args) -> tuple[int, str, str]:
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("fields, needle", BAD_JOBS, ids=[str(i) for i in range(len(BAD_JOBS))])
def test_bad_job_is_one_line_at_submit_and_the_coordinator_keeps_serving(coordinator, capsys, tmp_path, fields, needle):
    sb, svc = coordinator
    job = {"name": "bad", "dataset": "heart", "rounds": 2, **fields}
    path = tmp_path / "job.toml"
    path.write_text("".join(f"{k} = {toml_value(v)}\n" for k, v in job.items()))
    code, _, err = cli(capsys, "job", "submit", path, "--config", sb.root / "ops.toml")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: coordinator refused 'submit': "), err
    assert needle in lines[0], lines[0]
    assert "closed the channel" not in err and "Traceback" not in err
    # nothing was queued, and the same operator channel path still answers
    assert "bad" not in [j["id"] for j in sb.operator("list")["jobs"]]


def test_infinite_number_in_a_job_file_is_named_before_sending(coordinator, capsys, tmp_path):
    sb, _ = coordinator
    path = tmp_path / "job.toml"
    path.write_text('name = "inf"\ndataset = "heart"\nwait_for_sites = inf\n[task]\ninput_shape = [nan]\n')
    code, _, err = cli(capsys, "job", "submit", path, "--config", sb.root / "ops.toml")
    assert code == 2 and err.count("\n") == 1 and f"{path}: wait_for_sites = inf: infinite or NaN numbers are not allowed" in err, err


def test_operator_requests_of_the_wrong_shape_are_one_line(coordinator):
    sb, _ = coordinator
    for args, needle in [({"job": "not a table"}, "a job description is a table"), ({"job": ["x"]}, "a job description is a table"),
                         ({"job": {"rounds": 2}}, "needs a name")]:
        with pytest.raises(InsituError, match="coordinator refused 'submit'") as err:
            sb.operator("submit", args)
        assert needle in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(InsituError, match="unknown operator request 'reboot'"):
        sb.operator("reboot", {})
    with pytest.raises(InsituError, match="no job named"):
        sb.operator("status", {"job": ["a", "list"]})


def test_a_job_failing_in_setup_is_failed_with_its_reason_once_and_the_next_job_runs(coordinator):
    """A stored job that no longer parses (as if written by an older version) fails at setup with
    the reason, is not picked again, and the next job still runs to the end."""
    sb, svc = coordinator
    svc.store.add_job("legacy", {"name": "legacy", "dataset": "heart", "task": {"input_shape": [-3], "num_outputs": 1, "schema": ["x"]}},
                      "0" * 64, 2, "ops")
    sb.operator("submit", {"job": GOOD})
    runner = threading.Thread(target=svc.run_jobs, daemon=True)
    runner.start()
    deadline = time.monotonic() + 60
    while sb.operator("status", {"job": "fine"})["status"] not in ("done", "failed") and time.monotonic() < deadline:
        time.sleep(0.05)
    legacy = sb.operator("status", {"job": "legacy"})
    assert legacy["status"] == "failed" and "input_shape must be 1 to 4 positive integers" in legacy["error"]
    assert legacy["rounds"] == []  # failed before any round was reserved
    fine = sb.operator("status", {"job": "fine"})
    # no site is connected: the job runs its round, which aborts for want of sites, and ends; it is not stuck behind 'legacy'
    assert fine["status"] == "failed" and "rounds aborted" in fine["error"], fine
    assert runner.is_alive()
    svc._stop.set()
    runner.join(10)
    svc._stop.clear()


def test_setup_that_stops_the_coordinator_twice_is_failed_not_retried(tmp_path):
    db = tmp_path / "c.db"
    store = JobStore(db)
    store.add_job("oom", {"name": "oom"}, "0" * 64, 3, "ops")
    store.add_job("next", {"name": "next"}, "0" * 64, 3, "ops")
    for crash in range(1, MAX_SETUP_CRASHES + 1):
        assert store.next_active().id == "oom"
        store.begin_setup("oom")  # ... and the process dies here (no end_setup)
        store.close()
        store = JobStore(db)
        failed = store.recover_setups(MAX_SETUP_CRASHES)
        if crash < MAX_SETUP_CRASHES:
            assert failed == {} and store.job("oom").status is JobStatus.QUEUED
    assert list(failed) == ["oom"] and f"stopped {MAX_SETUP_CRASHES} times in a row" in failed["oom"]
    row = store.job("oom")
    assert row.status is JobStatus.FAILED and "not retried" in row.error
    assert store.next_active().id == "next"  # the queue moves on
    # a setup that completes resets the count: one crash after a good start is not a loop
    store.begin_setup("next")
    store.end_setup("next")
    store.begin_setup("next")
    store.close()
    store = JobStore(db)
    assert store.recover_setups(MAX_SETUP_CRASHES) == {} and store.job("next").status is JobStatus.QUEUED
    store.close()
    raw = sqlite3.connect(db).execute("SELECT job, pending, crashes FROM job_setups ORDER BY job").fetchall()
    assert raw == [("next", 0, 1), ("oom", 0, MAX_SETUP_CRASHES)]


def test_an_internal_error_in_an_operator_request_is_one_line_not_a_closed_channel(tmp_path):
    """Whatever escapes the operator handler (a bug) is answered in one line; the channel stays open."""
    from insitu.net.client import operator_call
    from insitu.net.pki import CertificateAuthority, Role
    from insitu.net.server import CoordinatorServer

    ca = CertificateAuthority.init(tmp_path / "ca")
    coord = ca.issue("coordinator", Role.COORDINATOR, tmp_path / "coord")
    ops = ca.issue("ops", Role.OPERATOR, tmp_path / "ops")

    def handler(op, args, who):
        if op == "boom":
            raise TypeError("'int' object is not iterable\nsecond line")
        return {"ok": True}

    srv = CoordinatorServer(coord, ca.dir / "crl.pem", handler).start()
    try:
        with pytest.raises(InsituError) as err:
            operator_call("127.0.0.1", srv.port, ops, "boom")
        assert "internal error while handling 'boom': TypeError: 'int' object is not iterable" in str(err.value)
        assert "closed the channel" not in str(err.value) and "\n" not in str(err.value)
        assert operator_call("127.0.0.1", srv.port, ops, "fine") == {"ok": True}
    finally:
        srv.stop()


def test_a_cancel_during_setup_or_approval_is_not_overwritten(tmp_path):
    """Found by the hostile-peer suite: a job cancelled while it waited for approvals was set running
    right after and ran on, and the job queued behind it never started."""
    store = JobStore(tmp_path / "c.db")
    store.add_job("j", {"name": "j"}, "0" * 64, 3, "ops")
    store.set_status("j", JobStatus.WAITING)
    store.cancel("j")
    store.set_status("j", JobStatus.RUNNING)  # what run_job does once the approvals are in
    assert store.job("j").status is JobStatus.CANCELLED
    store.set_status("j", JobStatus.WAITING)
    assert store.job("j").status is JobStatus.CANCELLED and store.next_active() is None
    store.add_job("k", {"name": "k"}, "0" * 64, 3, "ops")
    store.set_status("k", JobStatus.RUNNING)
    store.set_status("k", JobStatus.DONE, final={"ok": 1})
    store.set_status("k", JobStatus.RUNNING)
    assert store.job("k").status is JobStatus.DONE
    store.close()
