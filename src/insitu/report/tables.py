"""Terminal tables for run summaries."""
from __future__ import annotations

from typing import Any

from rich.table import Table


def _fmt(v: Any) -> str:
    return "–" if v is None else f"{v:.3f}"


def _bytes(v: Any) -> str:
    if not v:
        return "–"
    for unit, size in (("MB", 1e6), ("kB", 1e3)):
        if v >= size:
            return f"{v / size:.1f} {unit}"
    return f"{v:.0f} B"


def summary_table(summary: dict[str, Any]) -> Table:
    fin = summary["final"]
    base = summary.get("baselines", {})
    loc, poo = base.get("local_only", {}), base.get("pooled", {})
    cfg = summary["config"]
    t = Table(title=f"{cfg['dataset']} · {cfg['strategy']} · {fin['rounds_completed']} rounds · test accuracy", title_justify="left")
    t.add_column("site")
    t.add_column("train", justify="right")
    t.add_column("test", justify="right")
    t.add_column("federated", justify="right", style="bold")
    t.add_column("local only", justify="right")
    t.add_column("pooled", justify="right")
    per_site = fin.get("bytes_up_per_round_per_site", {})
    t.add_column("bytes up/round", justify="right")
    for name, sizes in summary["sites"].items():
        t.add_row(name, str(sizes["n_train"]), str(sizes["n_test"]), _fmt(fin["site_accuracy"].get(name)),
                  _fmt(loc.get("site_accuracy", {}).get(name)), _fmt(poo.get("site_accuracy", {}).get(name)), _bytes(per_site.get(name)))
    t.add_section()
    t.add_row("mean over sites", "", "", _fmt(fin["mean_site_accuracy"]), _fmt(loc.get("mean_site_accuracy")), _fmt(poo.get("mean_site_accuracy")), _bytes(sum(per_site.values()) / len(per_site) if per_site else None))
    t.add_row("all test records", "", "", _fmt(fin["pooled_accuracy"]), _fmt(loc.get("pooled_accuracy")), _fmt(poo.get("pooled_accuracy")), "")
    return t
