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
def serve(config: Path = CONFIG,
          console_port: int = typer.Option(None, "--console-port", help="Also serve the data officer's console from this process, "
                                           "on 127.0.0.1:PORT only (0: any free port); its one-time login link is written to "
                                           "state/console.url.  Off unless given.")) -> None:
    """Dial the coordinator over mutual TLS 1.3 and answer rounds; reconnects with back-off."""
    from insitu.site.node import serve as _serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    _serve(config, console_port=console_port)
    from insitu.net.proc import fast_exit

    fast_exit()  # skip the interpreter's slow teardown so a restart is quick


@app.command("approve")
def approve(task_hash: str = typer.Argument(..., help="The task's id from `insitu site pending` (a unique prefix of at least 6 hex digits), "
                                                     "or its full content hash (`insitu job hash job.toml`)."),
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
    approvals = Approvals(policy.state, policy.approved)
    full = approvals.resolve(task_hash)
    approvals.approve(full, parsed, spec)
    out.print(f"approved task {full}" + (f" with ranges {ranges}" if ranges else ""))


@app.command("refuse")
def refuse(task_hash: str = typer.Argument(..., help="The task's id from `insitu site pending` (a unique prefix of >= 6 hex digits) or full hash."),
           config: Path = CONFIG,
           reason: str = typer.Option("", "--reason", "-r", help="Why; the coordinator's operator sees it.")) -> None:
    """Refuse a task on purpose: it leaves the pending list, its rounds are refused with your reason,
    and a job waiting for approvals stops waiting for this site.  `approve` undoes it."""
    from insitu.site.policy import Approvals, SitePolicy

    policy = SitePolicy.load(config)
    approvals = Approvals(policy.state, policy.approved)
    full = approvals.resolve(task_hash)
    if full in policy.approved:
        raise ConfigError(f"task {full[:12]} is approved in {config} ([policy] approved); remove it there first")
    approvals.refuse(full, reason)
    out.print(f"refused task {full}" + (f": {reason}" if reason else ""), highlight=False)


@app.command("console")
def console(config: Path = CONFIG,
            port: int = typer.Option(8470, "--port", "-p", help="Port on 127.0.0.1 (0: any free port)."),
            open_browser: bool = typer.Option(False, "--open", help="Also open the console in this machine's browser.")) -> None:
    """The data officer's web console on 127.0.0.1 only: pending tasks with their full spec and the ε a
    round would cost here, approve (with ranges) or refuse, the rounds this site trained, its ledger and
    its refusals.  Prints a one-time login link (also kept, readable by this user only, in state/console.url)."""
    from insitu.site.console import serve_console

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    serve_console(config, port=port, open_browser=open_browser)


#: below this terminal width `site pending` prints one line per field instead of a table.
NARROW = 110


@app.command("pending")
def pending(config: Path = CONFIG,
            wide: bool = typer.Option(False, "--wide", "-w", help="Show each task's full 64-digit hash (default: a 12-digit id that `approve` accepts)."),
            as_json: bool = typer.Option(False, "--json", help="Print the pending tasks as JSON (full hashes and specs).")) -> None:
    """Tasks waiting for this site's approval: seen in a job's onboarding check or refused in a round.
    Approve one with `insitu site approve ID`."""
    from insitu.site.policy import Approvals, SitePolicy
    from insitu.site.review import plan_row

    policy = SitePolicy.load(config)
    waiting = Approvals(policy.state, policy.approved).waiting()
    if as_json:
        out.print_json(json.dumps(waiting))
        return
    if not waiting:
        out.print("no plan is waiting for approval")
        return
    n_train: list[int] = []  # loaded once, only if a DP task is pending
    rows = []
    for h, e in sorted(waiting.items(), key=lambda kv: -kv[1].get("first_seen", 0)):
        s = e["spec"]
        rows.append({"id": h if wide else h[:12], "job": e.get("job", ""), **plan_row(s),
                     "privacy at this site": _privacy_cell(policy, s, n_train), "rounds refused": str(e.get("count", 0)),
                     "reason": e.get("last_reason", "")})
    if out.width < NARROW:  # a line per field: nothing is cut on a narrow terminal
        for row in rows:
            out.print(f"[bold]plan {row['id']}[/]", highlight=False)
            for k, v in row.items():
                if k != "id":
                    out.print(f"  {k + ':':22}{v}", highlight=False, soft_wrap=True)
        out.print(f"approve with: insitu site approve ID --config {config}", highlight=False)
        return
    t = Table(title="plans waiting for approval (insitu site approve ID)", title_justify="left")
    t.add_column("id (approve this)", no_wrap=True)
    for col in list(rows[0])[1:]:
        t.add_column(col, overflow="fold")
    for row in rows:
        t.add_row(*row.values())
    out.print(t)


def _privacy_cell(policy, spec: dict, n_train: list[int]) -> str:
    from insitu.site.review import privacy_cost

    return privacy_cost(policy, spec, n_train)
