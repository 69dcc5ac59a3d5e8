"""``insitu privacy``: read a site's privacy ledger (budgets and every round's ε)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from insitu.errors import ConfigError

if TYPE_CHECKING:  # the accountant (dp-accounting, scipy) loads only when a command needs it
    from insitu.privacy.budget import PrivacyLedger

app = typer.Typer(help="Privacy: each site's DP budget and ledger of ε spent (ledger); attack a finished run (report) or every defence on one task (compare).", no_args_is_help=True)
console = Console()


def ledger_table(ledger: PrivacyLedger, site: str | None = None) -> Table:
    t = Table(title=f"privacy ledger · {ledger.path}", title_justify="left")
    for col, just in (("site", "left"), ("job", "left"), ("round", "right"), ("released", "left"), ("ε round", "right"),
                      ("ε total", "right"), ("δ", "right"), ("recorded (UTC)", "left")):
        t.add_column(col, justify=just)
    for r in ledger.records(site):
        t.add_row(r.site, r.job, str(r.round), r.mechanism, f"{r.epsilon_round:.4f}", f"{r.epsilon_total:.4f}", f"{r.delta:g}", r.recorded_at[:19])
    return t


def budget_table(ledger: PrivacyLedger, site: str | None = None) -> Table:
    t = Table(title="budgets", title_justify="left")
    for col in ("site", "limit ε", "δ", "accountant", "spent ε", "left ε"):
        t.add_column(col, justify="left" if col == "site" else "right")
    for s in ledger.sites():
        if site is not None and s != site:
            continue
        b = ledger.budget(s)
        spent = ledger.spent(s, b)
        t.add_row(s, f"{b.epsilon:g}", f"{b.delta:g}", b.accountant.value, f"{spent:.4f}", f"{max(0.0, b.epsilon - spent):.4f}")
    return t


def privacy_table(summary: dict[str, Any]) -> Table:
    """The privacy part of an ``insitu simulate`` summary: ε spent per site against its budget."""
    fin = summary["final"]
    p = fin["privacy"]
    level = p["level"] + (f" · {p['placement']}" if p.get("placement") else "")
    t = Table(title=f"privacy · {level} · {p['accountant']} · δ={fin['delta']:g}", title_justify="left")
    for col in ("site", "noise z", "clip", "ε spent", "budget", "refused rounds"):
        t.add_column(col, justify="left" if col in ("site", "refused rounds") else "right")
    refused: dict[str, list[int]] = {}
    for r in p["refusals"]:
        refused.setdefault(r["site"], []).append(r["round"])
    for site, eps in fin["epsilon_per_site"].items():
        t.add_row(site, f"{p['noise_multiplier'][site]:.3f}", f"{p['clip']:g}", f"{eps:.3f}", f"{p['budgets'][site]:g}",
                  ", ".join(map(str, refused.get(site, []))) or "–")
    t.add_section()
    t.add_row("run (max over sites)", "", "", f"{fin['epsilon']:.3f}", f"{p['target_epsilon']:g}" if p["target_epsilon"] else "–", "")
    by_round = p.get("epsilon_by_round") or []
    if by_round:
        t.caption = "ε after each round: " + " ".join(f"{r['round']}:{r['epsilon']:.3f}" for r in by_round)
        t.caption_justify = "left"
    return t


@app.command("ledger")
def ledger_command(
    path: Path = typer.Argument(..., help="The SQLite ledger: a run's privacy_ledger.sqlite, or a site's --privacy-ledger file."),
    site: Optional[str] = typer.Option(None, help="Only this site."),
    as_json: bool = typer.Option(False, "--json", help="Print the records as JSON lines instead of tables."),
) -> None:
    """Show each site's budget, what it has spent, and one immutable record per round (mechanism, parameters, ε)."""
    if not path.exists():
        raise ConfigError(f"no privacy ledger at {str(path)!r}")
    from insitu.privacy.budget import PrivacyLedger

    with PrivacyLedger(path) as ledger:
        if as_json:
            for r in ledger.records(site):
                console.print_json(json.dumps(r.as_dict()))
            return
        console.print(budget_table(ledger, site))
        console.print(ledger_table(ledger, site))


# attacks on finished runs (issue 8): `insitu privacy report` and `insitu privacy compare`
from insitu.report.privacy_cli import register as _register_attack_commands  # noqa: E402

_register_attack_commands(app)
