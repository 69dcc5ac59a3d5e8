"""A real browser (the OS's headless Chromium, driven by Playwright) against a real-process consortium.

The operator logs in with a one-time link, submits a heart job from the dashboard; the job waits
for one hospital's approval, which its data officer gives in the site console (in the same
browser); rounds then arrive on the page live, without a reload; a hospital process is killed and
the page shows it offline with the reason; the model is downloaded with the page's button.  A
site certificate and an anonymous visitor are refused.  Screenshots go to $INSITU_SCREENSHOTS
(default: the test's temporary directory).

Chromium comes from the OS packages (`apt-get install chromium`, see .ci/services.sh); it is
launched with executable_path, never downloaded by Playwright.  The page's TLS certificate is the
coordinator's, pinned by its public key (--ignore-certificate-errors-spki-list), not ignored.
"""
from __future__ import annotations

import base64
import hashlib
import io
import os
import time
import zipfile
from pathlib import Path

import pytest

from insitu.coordinator.jobs import JobSpec

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
SITES = ("cleveland", "hungary", "switzerland", "va-long-beach")
# rounds of ~0.3-2 s, so that the page is seen between rounds and a site is killed mid-job
JOB_TOML = """name = "heart-browser"
dataset = "heart"
strategy = "fedavg"
rounds = 10
seed = 0
min_sites = 3
round_timeout = 60.0
approval_timeout = 300.0
local_steps = 1500
lr = 0.001
"""
NEEDS_APPROVAL = "va-long-beach"  # its admin approves in the site console; the others approved beforehand
KILLED = "switzerland"


def _job() -> dict:
    import tomllib

    return tomllib.loads(JOB_TOML)


@pytest.fixture(scope="module")
def dep(tmp_path_factory, dashboard_deployment):
    h = JobSpec.from_dict(_job()).plan.content_hash()
    yield from dashboard_deployment(tmp_path_factory.mktemp("browser-consortium"), SITES,
                                    {s: [] if s == NEEDS_APPROVAL else [h] for s in SITES})


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    d = Path(os.environ.get("INSITU_SCREENSHOTS") or tmp_path_factory.mktemp("screens"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def _spki_pin(cert_pem: Path) -> str:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    pub = x509.load_pem_x509_certificate(cert_pem.read_bytes()).public_key()
    der = pub.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


@pytest.fixture(scope="module")
def pinned(dep):
    """Chromium trusting exactly the coordinator's key for TLS (the consortium CA is not in the OS store)."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: install the OS package (apt-get install chromium; .ci/services.sh does)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the test extra)")
    pin = _spki_pin(dep.root / "pki" / "coordinator" / "coordinator.pem")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=[*ARGS, f"--ignore-certificate-errors-spki-list={pin}"], headless=True)
        yield b
        b.close()


def _rounds(page) -> int:
    return int(page.get_attribute("#chart-accuracy", "data-rounds") or 0)


def _wait(cond, timeout: float, what: str) -> None:
    """Poll from Python (the page's CSP forbids the eval that page.wait_for_function needs; it stays on)."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_operator_flow_with_site_console_approval_live_rounds_killed_site_and_download(pinned, dep, shots, tmp_path):
    from insitu.site.console import start_console

    page = pinned.new_page(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
    loads = []
    page.on("load", lambda p: loads.append(p.url))  # full page loads only (hash changes are not loads)
    # 1. log in with the one-time link the operator's certificate obtains (insitu coordinator login)
    page.goto(dep.operator("login")["url"])
    page.wait_for_selector("#link[data-live=true]", timeout=30_000)
    assert "operator ops (login link)" in page.inner_text("#who")
    page.wait_for_selector("#sites-table tr[data-site][data-online=true] >> nth=3", timeout=30_000)
    page.screenshot(path=str(shots / "dashboard-consortium.png"), full_page=True)

    # 2. submit the job from the page; it waits for the one hospital that has not approved it
    page.click("#submit-box summary")
    page.fill("#job-toml", JOB_TOML)
    page.click("#submit")
    page.wait_for_selector("#submit-msg.ok", timeout=30_000)
    page.wait_for_selector(f"#approval li[data-waiting={NEEDS_APPROVAL}]", timeout=60_000)
    assert "not approved" in page.inner_text("#approval")
    assert page.get_attribute("#jobs-table tr[data-job=heart-browser]", "data-status") == "waiting"
    page.screenshot(path=str(shots / "dashboard-waiting-for-approval.png"), full_page=True)

    # 3. the data officer approves it in that hospital's site console (127.0.0.1 only, one-time link)
    app, server, url = start_console(dep.root / "sites" / NEEDS_APPROVAL / "site.toml", port=0)
    try:
        officer = pinned.new_page(viewport={"width": 1300, "height": 1000})
        officer.goto(url)
        card = f"article[data-task='{JobSpec.from_dict(_job()).plan.content_hash()}']"
        officer.wait_for_selector(card, timeout=30_000)
        text = officer.inner_text(card)
        assert "heart-browser" in text and "task.local_steps" in text and "1500" in text and "no DP" in text
        officer.screenshot(path=str(shots / "site-console-pending.png"), full_page=True)
        officer.click(f"{card} button[data-action=approve]")
        officer.wait_for_selector("#decided tr[data-state=approved]", timeout=30_000)
        assert officer.query_selector(card) is None

        # 4. rounds arrive on the dashboard live, without a reload
        page.wait_for_selector("#job-title .badge.running", timeout=60_000)
        _wait(lambda: _rounds(page) >= 2, 120, "two rounds on the chart")
        first = int(page.get_attribute("#chart-accuracy", "data-rounds"))
        page.screenshot(path=str(shots / "dashboard-rounds-live.png"), full_page=True)

        # 5. a hospital process is killed: the page shows it offline with the reason
        dep.kill(f"site-{KILLED}")
        page.wait_for_selector(f"#sites-table tr[data-site={KILLED}][data-online=false]", timeout=60_000)
        reason = page.inner_text(f"#sites-table tr[data-site={KILLED}] .reason")
        assert "channel lost" in reason, reason
        _wait(lambda: _rounds(page) > first, 120, "a round after the kill")
        page.screenshot(path=str(shots / "dashboard-site-offline.png"), full_page=True)
        page.wait_for_selector("#job-title .badge.done", timeout=180_000)
        assert int(page.get_attribute("#chart-accuracy", "data-rounds")) == 10
        assert page.query_selector_all("#chart-accuracy circle[data-series=mean]").__len__() == 10
        assert page.get_attribute(f"#job-sites tr[data-site={KILLED}]", "data-online") == "false"
        assert "final mean site accuracy" in page.inner_text("#final")
        assert len(loads) == 1, loads  # everything above arrived live: the page was never reloaded
        page.screenshot(path=str(shots / "dashboard-job-done.png"), full_page=True)

        # 6. download the model with the page's button: a run directory that `insitu export` and the gateway take
        with page.expect_download() as dl:
            page.click("#jobs-table tr[data-job=heart-browser] a[data-action=model]")
        data = Path(dl.value.path()).read_bytes()
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            names = sorted(n.split("/", 1)[1] for n in z.namelist())
            z.extractall(tmp_path)
        assert names == ["model.npz", "plan.json", "rounds.jsonl", "summary.json", "task.json"]
        from insitu.compress.export import load_run_model

        _, task = load_run_model(tmp_path / "heart-browser-v10")
        assert task == JobSpec.from_dict(_job()).task
        page.wait_for_selector("#audit[data-ok=true]", timeout=30_000)
        _wait(lambda: "1 entries verified" in page.inner_text("#audit"), 30, "the model release in the audit chain")

        # the site console now lists the rounds this hospital trained
        officer.wait_for_selector("#rounds tr[data-job=heart-browser]", timeout=30_000)
        assert len(officer.query_selector_all("#rounds tr[data-job=heart-browser]")) >= 2
        officer.screenshot(path=str(shots / "site-console-rounds.png"), full_page=True)
    finally:
        server.stop()


def test_site_certificate_and_anonymous_visitor_refused(pinned, dep, shots):
    site = dep.creds("cleveland")
    ctx = pinned.new_context(ignore_https_errors=True,  # Playwright relays client certificates through its own TLS client
                             client_certificates=[{"origin": dep.dash, "certPath": str(site.cert), "keyPath": str(site.key)}])
    page = ctx.new_page()
    res = page.goto(dep.dash + "/")
    assert res.status == 403 and "role site" in page.inner_text("#refused")
    assert page.query_selector("#sites-table") is None
    page.screenshot(path=str(shots / "dashboard-site-certificate-refused.png"))
    ctx.close()
    anon = pinned.new_context()
    page = anon.new_page()
    res = page.goto(dep.dash + "/")
    assert res.status == 401 and "insitu coordinator login" in page.inner_text("#login")
    assert page.goto(dep.dash + "/api/overview").status == 401
    page.screenshot(path=str(shots / "dashboard-anonymous-refused.png"))
    anon.close()
    # and the operator's own certificate gets in, in the browser too
    ops = dep.creds("ops")
    ctx = pinned.new_context(ignore_https_errors=True,
                             client_certificates=[{"origin": dep.dash, "certPath": str(ops.cert), "keyPath": str(ops.key)}])
    page = ctx.new_page()
    assert page.goto(dep.dash + "/").status == 200
    page.wait_for_selector("#link[data-live=true]", timeout=30_000)
    assert "operator ops (certificate)" in page.inner_text("#who")
    ctx.close()
