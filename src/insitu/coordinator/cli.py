"""``insitu coordinator`` and ``insitu job``: run the coordinator, and operate it with an operator certificate."""
from __future__ import annotations

import json
import logging
import time
import tomllib
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from insitu.errors import ConfigError

app = typer.Typer(help="Run the coordinator: one TLS 1.3 port that sites dial; jobs and rounds kept in SQLite.", no_args_is_help=True)
job_app = typer.Typer(help="Submit, watch and cancel jobs (needs an operator certificate).", no_args_is_help=True)
out = Console()

OPERATOR_CONFIG = typer.Option(Path("operator.toml"), "--config", "-c",
                               help="operator.toml: \\[operator] coordinator = HOST:PORT, cert, key, ca.")


@app.callback()
def _group() -> None:
    """Run the coordinator (keeps `serve` a sub-command even while it is the only one)."""


@app.command("serve")
def serve(config: Path = typer.Option(Path("coordinator.toml"), "--config", "-c", help="coordinator.toml (paths in it are relative to its directory).")) -> None:
    """Listen for sites and operators; run queued jobs; resume after a restart."""
    from insitu.coordinator.service import serve as _serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    _serve(config)
    from insitu.net.proc import fast_exit

    fast_exit()  # skip the interpreter's slow teardown so a restart is quick


@app.command("login")
def login(config: Path = OPERATOR_CONFIG,
          open_browser: bool = typer.Option(False, "--open", help="Also open the link in this machine's web browser.")) -> None:
    """Print a one-time link that logs a browser into the coordinator's dashboard as this operator
    (asked for with the operator certificate; valid once, for the dashboard's login_ttl)."""
    res = _call(config, "login")
    err = Console(stderr=True)
    err.print(f"dashboard login for operator {res['operator']}: open this link within {res['expires_in']:g} s (it works once)",
              highlight=False)
    print(res["url"])
    if open_browser:
        import webbrowser

        webbrowser.open(res["url"])


def _call(config: Path, op: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
    return _request(config, op, args)[0]


def _request(config: Path, op: str, args: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    from insitu.net.client import operator_request
    from insitu.net.pki import Credentials

    try:
        raw = tomllib.loads(config.read_text())["operator"]
        base = config.resolve().parent
        host, _, port_text = str(raw["coordinator"]).rpartition(":")
        port = int(port_text)
        creds = Credentials(base / raw["cert"], base / raw["key"], base / raw["ca"])
    except (OSError, KeyError, TypeError, ValueError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read operator config {config}: {exc} "
                          "(needs [operator] coordinator = HOST:PORT, cert, key, ca)") from None
    try:
        return operator_request(host, port, creds, op, args)
    except OSError as exc:  # refused, unreachable, TLS handshake refused
        raise ConfigError(f"cannot reach the coordinator at {host}:{port}: {getattr(exc, 'strerror', None) or exc}; "
                          f"is `insitu coordinator serve` running there? ([operator] coordinator in {config})") from None


@job_app.command("submit")
def submit(job_file: Path = typer.Argument(..., help="job.toml (same names as `insitu simulate`)."), config: Path = OPERATOR_CONFIG) -> None:
    """Queue a job; prints its task hash, which each site must have approved."""
    try:
        job = tomllib.loads(job_file.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read job file {job_file}: {exc}") from None
    from insitu.coordinator.jobs import inline_model_spec

    job = inline_model_spec(job, job_file.resolve().parent)
    _finite(job, str(job_file))
    res = _call(config, "submit", {"job": job})
    out.print(f"job {res['id']} {res['status']}; task hash {res['task_hash']}")


def _finite(value: Any, where: str) -> None:
    """TOML allows inf and nan, JSON (the wire) does not: name the key instead of failing to encode."""
    if isinstance(value, float) and value != value or value in (float("inf"), float("-inf")):
        raise ConfigError(f"{where} = {value}: infinite or NaN numbers are not allowed; give a finite number")
    if isinstance(value, dict):
        for k, v in value.items():
            _finite(v, f"{where}: {k}" if where.endswith(".toml") else f"{where}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _finite(v, f"{where}[{i}]")


@job_app.command("hash")
def task_hash(job_file: Path = typer.Argument(...)) -> None:
    """Print the content hash of a job's task (what site admins approve), without contacting anyone."""
    from insitu.coordinator.jobs import JobSpec, inline_model_spec

    try:
        job = tomllib.loads(job_file.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read job file {job_file}: {exc}") from None
    spec = JobSpec.from_dict(inline_model_spec(job, job_file.resolve().parent))
    out.print(spec.plan.content_hash())


@job_app.command("status")
def status(job: str = typer.Argument(..., help="The job's name (see `insitu job list`)."), config: Path = OPERATOR_CONFIG,
           as_json: bool = typer.Option(False, "--json", help="Print the full status as JSON."),
           watch: bool = typer.Option(False, "--watch", "-w", help="Refresh live until the job ends (Ctrl-C to stop watching)."),
           interval: float = typer.Option(2.0, "--interval", help="Seconds between refreshes with --watch."),
           last: int = typer.Option(0, "--last", help="Show only the last N rounds (0: all; --watch shows the last 15).")) -> None:
    """A job's rounds (who joined, who dropped and why, accuracy, ε), its ETA and its sites
    (online or offline with the reason, last heart-beat, certificate expiry, accuracy and loss)."""
    from insitu.coordinator.views import job_view

    if interval <= 0:
        raise ConfigError(f"--interval must be positive, got {interval}")
    res = _call(config, "status", {"job": job})
    if as_json:
        out.print_json(json.dumps(res))
        return
    if not watch:
        out.print(job_view(res, last=last or None))
        return
    from rich.live import Live

    with Live(job_view(res, last=last or 15), console=out, refresh_per_second=4, transient=False) as live:
        while res["status"] not in ("done", "failed", "cancelled"):
            time.sleep(interval)
            res = _call(config, "status", {"job": job})
            live.update(job_view(res, last=last or 15))


@job_app.command("logs")
def logs(job: str = typer.Argument(..., help="The job's name (an ended job's earlier runs are NAME~1, NAME~2, ...)."),
         config: Path = OPERATOR_CONFIG,
         follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing new lines until the job ends."),
         interval: float = typer.Option(1.0, "--interval", help="Seconds between polls with --follow."),
         as_json: bool = typer.Option(False, "--json", help="Print the log lines as JSON.")) -> None:
    """What the coordinator logged about a job (submitted, waiting for approvals, rounds applied or
    aborted, each site's drop-out and its reason, done), oldest first."""
    from insitu.coordinator.views import log_lines

    res = _call(config, "logs", {"job": job})
    if as_json:
        out.print_json(json.dumps(res["events"]))
        return
    seen: set[tuple[float, str]] = set()
    while True:
        new = [e for e in res["events"] if (e["at"], e["message"]) not in seen]
        for line in log_lines(new):
            out.print(line, highlight=False, soft_wrap=True)
        seen.update((e["at"], e["message"]) for e in new)
        if not follow or res["status"] in ("done", "failed", "cancelled"):
            return
        time.sleep(interval)
        res = _call(config, "logs", {"job": job})


def sites_command(config: Path = OPERATOR_CONFIG,
                  as_json: bool = typer.Option(False, "--json", help="Print the sites as JSON.")) -> None:
    """The consortium's sites as the coordinator sees them: online or offline (since when, and why),
    last heart-beat, certificate expiry, records, declared privacy budget."""
    from insitu.coordinator.views import sites_table

    res = _call(config, "sites")
    if as_json:
        out.print_json(json.dumps(res["detail"]))
        return
    rows = res["detail"]
    if not rows:
        out.print("no site has connected since the coordinator started")
        return
    out.print(sites_table(rows, title=f"sites ({sum(1 for r in rows if r.get('online'))} of {len(rows)} online)"))


@job_app.command("list")
def list_(config: Path = OPERATOR_CONFIG) -> None:
    """All jobs on the coordinator."""
    t = Table("job", "status", "rounds", "task", "by")
    for j in _call(config, "list")["jobs"]:
        t.add_row(j["id"], j["status"], f"{j['rounds_applied']}/{j['rounds_target']}", j["task_hash"][:12], j["submitted_by"])
    out.print(t)


@job_app.command("model")
def model(job: str = typer.Argument(..., help="The job's name (see `insitu job list`)."),
          out_dir: Path = typer.Option(..., "--out", "-o", help="Run directory to write (must not exist)."),
          config: Path = OPERATOR_CONFIG) -> None:
    """Download a job's newest model as a run directory (model.npz, task.json, summary.json, rounds.jsonl)
    that `insitu export DIR` and `insitu gateway serve` (\\[model] run_dir = DIR) take as is."""
    from insitu.coordinator.publish import write_run_dir

    result, tensors = _request(config, "model", {"job": job})
    path = write_run_dir(out_dir, result, tensors)
    s = result["summary"]
    acc = s["final"].get("mean_site_accuracy")
    out.print(f"job {s['job']} ({s['job_status']}): model version {s['model_version']} written to {path}"
              + (f"; mean site accuracy {acc:.4f}" if acc is not None else ""))


@job_app.command("cancel")
def cancel(job: str = typer.Argument(...), config: Path = OPERATOR_CONFIG) -> None:
    """Stop a queued or running job after its current round."""
    res = _call(config, "cancel", {"job": job})
    out.print(f"job {res['id']} {res['status']}")
