"""Onboarding a consortium from `insitu kit`, as real processes on 127.0.0.1.

The kit's own configuration files run a coordinator and two heart hospitals.  The operator
submits the kit's job before any site approved it: the job waits (its status names the sites
it waits for), each admin finds the plan in `insitu site pending` and approves it by the short
id shown there, and the job runs.  Once it has ended, its name can be used again.
"""
from __future__ import annotations

import re
import subprocess
import sys
import time
import tomllib

import pytest
from typer.testing import CliRunner

from insitu.cli import app
from insitu.kit import write_kit
from insitu.net import sandbox
from insitu.net.client import operator_call
from insitu.net.pki import Credentials

pytestmark = pytest.mark.slow

SITES = ("cleveland", "hungary")


def cli(*args) -> str:
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, f"insitu {' '.join(map(str, args))}: {res.output} {res.exception!r}"
    return res.output


class Processes:
    def __init__(self, root):
        self.root, self.procs = root, {}

    def start(self, key: str, entry: str, config) -> None:
        import os

        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        code = {"coordinator": "from insitu.coordinator.cli import app; app()", "site": "from insitu.site.cli import app; app()"}[entry]
        log = open(self.root / f"{key}.log", "ab")
        self.procs[key] = subprocess.Popen([sys.executable, "-c", code, "serve", "--config", str(config)], stdout=log,
                                           stderr=subprocess.STDOUT, cwd=self.root, env=env, start_new_session=True)

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        for p in self.procs.values():
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


class Running:
    """The kit's paths, and an operator call to its running coordinator."""

    def __init__(self, kit, call):
        self.job, self.operator, self.sites, self.call = kit.job, kit.operator, kit.sites, call


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    root = tmp_path_factory.mktemp("kit")
    port = sandbox.free_port()
    kit = write_kit(root / "kit", SITES, coordinator=f"127.0.0.1:{port}", dashboard_port=sandbox.free_port())
    job = kit.job.read_text().replace("rounds = 20", "rounds = 3")
    kit.job.write_text(job)
    procs = Processes(root)
    try:
        procs.start("coordinator", "coordinator", kit.coordinator)
        for s in SITES:
            procs.start(f"site-{s}", "site", kit.sites[s])
        op = tomllib.loads(kit.operator.read_text())["operator"]
        creds = Credentials(*(kit.operator.parent / op[k] for k in ("cert", "key", "ca")))
        deadline = time.monotonic() + 90
        while True:
            try:
                if len(operator_call("127.0.0.1", port, creds, "sites")["sites"]) == len(SITES):
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, (root / "coordinator.log").read_text()[-2000:]
            time.sleep(0.2)
        yield Running(kit, lambda op_, args=None: operator_call("127.0.0.1", port, creds, op_, args))
    finally:
        procs.stop()


def _wait(kit, job: str, pred, timeout: float = 90.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        st = kit.call("status", {"job": job})
        if pred(st):
            return st
        assert time.monotonic() < deadline, st
        time.sleep(0.1)


def test_job_waits_for_approval_naming_the_sites_then_runs(kit):
    out = cli("job", "submit", kit.job, "--config", kit.operator)
    assert "heart-fedavg" in out
    st = _wait(kit, "heart-fedavg", lambda s: s["status"] == "waiting" and len(s.get("approval", {}).get("waiting", {})) == 2)
    assert st["rounds"] == []  # no round was burnt while waiting
    assert all("not approved" in why for why in st["approval"]["waiting"].values())
    shown = cli("job", "status", "heart-fedavg", "--config", kit.operator)
    assert "waiting for cleveland" in shown and "waiting for hungary" in shown
    # each admin finds the task in `site pending` at once (the check listed it), with the job's name
    ids = {}
    for s in SITES:
        listing = cli("site", "pending", "--config", kit.sites[s])
        assert "heart-fedavg" in listing
        ids[s] = re.search(r"plan ([0-9a-f]{12})", listing).group(1)
    assert len(set(ids.values())) == 1
    cli("site", "approve", ids["cleveland"], "--config", kit.sites["cleveland"])
    st = _wait(kit, "heart-fedavg", lambda s: list(s.get("approval", {}).get("waiting", {})) == ["hungary"])
    assert st["status"] == "waiting" and st["approval"]["approved"] == ["cleveland"]
    time.sleep(1.0)
    assert kit.call("status", {"job": "heart-fedavg"})["status"] == "waiting"  # min_sites = 2: still waiting
    cli("site", "approve", ids["hungary"][:8], "--config", kit.sites["hungary"])  # a shorter prefix is enough
    st = _wait(kit, "heart-fedavg", lambda s: s["status"] in ("done", "failed"))
    assert st["status"] == "done", st
    assert [r["status"] for r in st["rounds"]] == ["applied"] * 3
    assert all(sorted(r["participants"]) == list(SITES) for r in st["rounds"])
    assert "heart-fedavg" not in cli("site", "pending", "--config", kit.sites["cleveland"])


def test_job_name_is_free_again_once_the_job_ended(kit):
    cli("job", "submit", kit.job, "--config", kit.operator)
    st = _wait(kit, "heart-fedavg", lambda s: s["status"] in ("done", "failed"))
    assert st["status"] == "done", st
    assert [r["round"] for r in st["rounds"]] == [4, 5, 6]  # round numbers go on under the same name
    old = kit.call("status", {"job": "heart-fedavg~1"})
    assert old["status"] == "done" and [r["round"] for r in old["rounds"]] == [1, 2, 3]


def test_job_fails_after_its_approval_timeout_naming_the_sites(kit, tmp_path):
    job = tmp_path / "job.toml"
    job.write_text(kit.job.read_text().replace('name = "heart-fedavg"', 'name = "never-approved"')
                   .replace("approval_timeout = 1800.0", "approval_timeout = 1.5").replace("# lr = 0.05", "lr = 0.0123"))
    cli("job", "submit", job, "--config", kit.operator)
    st = _wait(kit, "never-approved", lambda s: s["status"] in ("done", "failed"), timeout=60)
    assert st["status"] == "failed" and st["rounds"] == []
    assert "waited 1.5 s" in st["error"] and "cleveland:" in st["error"] and "hungary:" in st["error"], st["error"]


def test_a_job_waiting_for_approvals_does_not_hold_up_an_approved_one(kit, tmp_path):
    held = tmp_path / "held.toml"
    held.write_text(kit.job.read_text().replace('name = "heart-fedavg"', 'name = "held"').replace("# lr = 0.05", "lr = 0.0456"))
    cli("job", "submit", held, "--config", kit.operator)
    _wait(kit, "held", lambda s: s["status"] == "waiting" and len(s.get("approval", {}).get("waiting", {})) == 2)
    cli("job", "submit", kit.job, "--config", kit.operator)  # its plan was approved by both sites above
    st = _wait(kit, "heart-fedavg", lambda s: s["status"] in ("done", "failed"))
    assert st["status"] == "done", st
    held_now = kit.call("status", {"job": "held"})
    assert held_now["status"] == "waiting" and held_now["rounds"] == []  # still waiting, nothing burnt
    cli("job", "cancel", "held", "--config", kit.operator)
    assert _wait(kit, "held", lambda s: s["status"] == "cancelled")["rounds"] == []
