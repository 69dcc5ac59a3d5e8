"""``insitu site``: run a hospital node, and let its admin approve tasks."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from insitu.errors import ConfigError

app = typer.Typer(help="The hospital node: dials out to the coordinator, runs only tasks its admin approved.", no_args_is_help=True)
out = Console()
CONFIG = typer.Option(Path("site.toml"), "--config", "-c", help="site.toml")


@app.command("serve")
def serve(config: Path = CONFIG) -> None:
    """Dial the coordinator over mutual TLS 1.3 and answer rounds; reconnects with back-off."""
    from insitu.site.node import serve as _serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    _serve(config)
    from insitu.net.proc import fast_exit

    fast_exit()  # skip the interpreter's slow teardown so a restart is quick


@app.command("approve")
def approve(task_hash: str = typer.Argument(..., help="The task's content hash (see `insitu site pending` or `insitu job hash`)."),
            config: Path = CONFIG,
            ranges: list[str] = typer.Option([], "--range", help="NAME=LOW:HIGH, e.g. lr=0.01:0.1; also accept variants of the task within it."),
            task: Path = typer.Option(None, help="The task's JSON spec, if this site has not seen it (needed for --range).")) -> None:
    """Approve a task for this site; takes effect at the next round, no restart."""
    from insitu.site.policy import Approvals, Range, SitePolicy

    policy = SitePolicy.load(config)
    parsed = {}
    for r in ranges:
        name, sep, val = r.partition("=")
        if not sep:
            raise ConfigError(f"--range {r!r} must be NAME=LOW:HIGH")
        parsed[name] = Range.parse(name, val)
    spec = json.loads(task.read_text()) if task else None
    Approvals(policy.state, policy.approved).approve(task_hash, parsed, spec)
    out.print(f"approved task {task_hash[:12]}" + (f" with ranges {ranges}" if ranges else ""))


@app.command("pending")
def pending(config: Path = CONFIG) -> None:
    """Tasks this site refused because they were not approved, for the admin to review."""
    from insitu.site.policy import Approvals, SitePolicy

    policy = SitePolicy.load(config)
    t = Table("model", "lr", "local steps", "privacy at this site", "refused", "last reason")
    t.add_column("task hash (approve this)", overflow="fold", min_width=64)
    n_train: list[int] = []  # loaded once, only if a DP task is pending
    for h, e in Approvals(policy.state, policy.approved).pending().items():
        s = e["spec"]
        t.add_row(s["model"], str(s["lr"]), str(s["local_steps"]), _privacy_cell(policy, s, n_train), str(e["count"]),
                  e.get("last_reason", "")[:80], h)
    out.print(t)


def _privacy_cell(policy, spec: dict, n_train: list[int]) -> str:
    """What a pending plan would cost this site's privacy budget per round, by this site's own accountant."""
    from insitu.errors import InsituError
    from insitu.plan import Plan

    try:
        plan = Plan.from_meta(spec)
    except InsituError as exc:
        return f"malformed: {exc}"[:80]
    dp = plan.dp
    if not dp.on:
        return "no DP" + (" (refused: this site has a budget)" if policy.epsilon_budget is not None else "")
    noise = f"σ={dp.noise_multiplier:g}" if dp.noise_multiplier is not None else f"target ε={dp.epsilon:g}"
    head = f"{dp.level.value}-level DP {noise}, clip {dp.clip:g}"
    if policy.epsilon_budget is None:
        return head + "; refused: no epsilon_budget here"
    from insitu.builder import site_dp
    from insitu.privacy import Budget, PrivacyLedger, epsilon_of
    from insitu.site.node import load_site_data

    if not n_train:
        n_train.append(load_site_data(policy)[0].n_train)
    events = site_dp(plan, "pending", n_train[0], object(), b"\0" * 32).events
    eps = epsilon_of(events, policy.delta)
    ledger = PrivacyLedger(Path(policy.state) / "privacy_ledger.sqlite")
    try:
        site = ledger.sites()[0] if ledger.sites() else None
        spent = ledger.spent(site, Budget(policy.epsilon_budget, policy.delta)) if site else 0.0
    finally:
        ledger.close()
    return f"{head}: first round ε={eps:.3g} (q={events[0].sampling_rate:.3g}); spent {spent:.3g} of {policy.epsilon_budget:g}"
