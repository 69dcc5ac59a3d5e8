"""Terminal views of a job and of the consortium for ``insitu job status [--watch]``, ``insitu job logs``
and ``insitu sites``: rich renderables built from the coordinator's operator replies only."""
from __future__ import annotations

import datetime as dt
import time
from typing import Any, Mapping

from rich.console import Group
from rich.table import Table
from rich.text import Text

from insitu.coordinator.monitor import ago, duration


def _f(v: Any, fmt: str = ".4f") -> str:
    return format(v, fmt) if isinstance(v, (int, float)) and v == v else ""


def _expiry(t: float | None, now: float) -> str:
    if not t:
        return ""
    days = (t - now) / 86400
    date = dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%d")
    return f"{date} (EXPIRED)" if days < 0 else f"{date} ({days:.0f} d)"


def sites_table(rows: list[Mapping[str, Any]], *, title: str = "sites", now: float | None = None, job_columns: bool = False) -> Table:
    """Online/offline (with the reason), last heart-beat, certificate expiry; with ``job_columns``
    also each site's last round, accuracy and loss on its own test split, training loss and ε."""
    now = now or time.time()
    dp = any("epsilon" in r or "epsilon_budget" in r for r in rows)
    t = Table(title=title, title_justify="left")
    for col in ("site", "state", "last heart-beat", "certificate expires"):
        t.add_column(col, overflow="fold")
    if job_columns:
        for col in ("last round", "test acc", "test loss", "train loss"):
            t.add_column(col, justify="right")
        if dp:
            t.add_column("ε spent / budget", justify="right")
        t.add_column("last drop-out", overflow="fold")
    else:
        t.add_column("records (train/test)", justify="right")
        if dp:
            t.add_column("ε budget", justify="right")
    for r in rows:
        state = Text("online", style="green") if r.get("online") else Text(
            "offline" + (f" {ago(r.get('offline_since'), now)}: {r['offline_reason']}" if r.get("offline_reason") else ""), style="red")
        cells: list[Any] = [r["site"], state, ago(r.get("last_seen"), now), _expiry(r.get("cert_not_after"), now)]
        if job_columns:
            cells += [str(r.get("last_round", "")), _f(r.get("accuracy")), _f(r.get("loss")), _f(r.get("train_loss"))]
            if dp:
                eps, budget = r.get("epsilon"), r.get("epsilon_budget")
                cells.append((_f(eps, ".3g") or "–") + (f" / {budget:g}" if isinstance(budget, (int, float)) else ""))
            cells.append(r.get("dropped_reason", ""))
        else:
            info = r.get("info") or {}
            cells.append(f"{info.get('n_train', '')}/{info.get('n_test', '')}" if info else "")
            if dp:
                cells.append(_f(r.get("epsilon_budget"), "g"))
        t.add_row(*cells)
    return t


def rounds_table(rounds: list[Mapping[str, Any]], *, last: int | None = None) -> Table:
    """One row per round attempt: status, who joined, who dropped and why (never cut), accuracy, seconds, ε."""
    shown = rounds[-last:] if last else rounds
    dp = any(r.get("epsilon") for r in rounds)
    t = Table(title=f"rounds ({len(shown)} of {len(rounds)})" if last and len(rounds) > len(shown) else "rounds", title_justify="left")
    for col in ("round", "status", "sites", "dropped: reason", "mean acc", "s", *(["ε spent per site"] if dp else [])):
        t.add_column(col, overflow="fold", justify="right" if col in ("round", "mean acc", "s") else "left")
    for r in shown:
        acc = (r.get("evaluation") or {}).get("mean_site_accuracy")
        why = "; ".join(f"{k}: {v}" for k, v in r["dropped"].items()) or (r.get("reason") or "")
        eps = [", ".join(f"{s} {e:.2f}" for s, e in sorted((r.get("epsilon") or {}).items()))] if dp else []
        t.add_row(str(r["round"]), r["status"], ",".join(r["participants"]), why, _f(acc), _f(r.get("seconds"), ".2f"), *eps)
    return t


def job_view(res: Mapping[str, Any], *, last: int | None = None, now: float | None = None) -> Group:
    """The whole status of a job: headline with ETA, approvals it waits for, rounds, sites."""
    now = now or time.time()
    pr = res.get("progress") or {}
    head = Text(f"job {res['id']}: {res['status']}, {res['rounds_applied']}/{res['rounds_target']} rounds applied")
    if pr.get("seconds_per_round") is not None:
        head.append(f" · {duration(pr['seconds_per_round'])}/round")
    if pr.get("eta_seconds") is not None:
        head.append(f" · ETA {duration(pr['eta_seconds'])}", style="bold")
    if pr.get("elapsed_seconds") is not None:
        head.append(f" · elapsed {duration(pr['elapsed_seconds'])}")
    parts: list[Any] = [head]
    if res.get("error"):
        parts.append(Text(f"error: {res['error']}", style="red"))
    ap = res.get("approval")
    if ap:
        parts.append(Text(f"waiting for the sites to approve plan {res['task_hash'][:12]} (up to {ap['timeout']:g} s); "
                          f"approved: {', '.join(ap['approved']) or 'none'}"))
        for s, why in sorted({**ap["waiting"], **ap["unreachable"]}.items()):
            parts.append(Text(f"  waiting for {s}: {why}"))
    tr = res.get("traffic") or {}
    if tr.get("bytes_down_per_site_round") is not None:
        parts.append(Text(f"per site per round: {tr['bytes_down_per_site_round']:,.0f} bytes down (downlink {tr['downlink']}), "
                          f"{tr['bytes_up_per_site_round'] or 0:,.0f} bytes up"))
    if res.get("rounds"):
        parts.append(rounds_table(res["rounds"], last=last))
    if res.get("sites"):
        online = sum(1 for s in res["sites"] if s.get("online"))
        parts.append(sites_table(res["sites"], title=f"sites ({online} of {len(res['sites'])} online)", now=now, job_columns=True))
    final = res.get("final") or {}
    if final.get("mean_site_accuracy") is not None:
        parts.append(Text(f"final mean site accuracy {final['mean_site_accuracy']:.4f}"))
    return Group(*parts)


def log_lines(events: list[Mapping[str, Any]]) -> list[Text]:
    out = []
    for e in events:
        stamp = dt.datetime.fromtimestamp(e["at"]).strftime("%Y-%m-%d %H:%M:%S")
        style = {"warning": "yellow", "error": "red"}.get(e["level"], "")
        out.append(Text(f"{stamp} {e['level'].upper():7} {e['message']}", style=style))
    return out


__all__ = ["job_view", "rounds_table", "sites_table", "log_lines"]
