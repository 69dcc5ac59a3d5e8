"""Plots a person would rather look at than read."""
from __future__ import annotations

from pathlib import Path
from typing import Any


def accuracy_plot(history: list[dict[str, Any]], path: Path, *, title: str, baselines: dict[str, float] | None = None) -> None:
    """Accuracy per round: the global model on each site's split, their mean and the union (the test
    splits, or the validation splits when the run selects its model on them: ``eval_split``);
    ``baselines`` (label → mean accuracy over sites, on the test splits) are drawn as horizontal lines.

    Drawn by :mod:`insitu.report.raster` (Pillow) in matplotlib's style: every ``insitu simulate``
    writes this chart, and matplotlib would cost the command ~30 MB and ~0.5 s."""
    from insitu.report.raster import LineChart

    ok = [h for h in history if h["status"] == "ok"]
    split = ok[0].get("eval_split", "test") if ok else "test"
    name = "validation" if split == "val" else "test"
    chart = LineChart(width_in=7, height_in=4, dpi=110, title=title, title_pt=9, xlabel="round", legend_pt=7,
                      ylabel=f"{name} accuracy" + (" (baselines: test)" if split == "val" and baselines else ""), ylim=(0, 1))
    if ok:
        rounds = [h["round"] for h in ok]
        sites = sorted({s for h in ok for s, e in h["sites"].items() if f"{split}_accuracy" in e})
        for s in sites:
            chart.line(rounds, [h["sites"].get(s, {}).get(f"{split}_accuracy", float("nan")) for h in ok], s, width=1, alpha=0.6)
        chart.line(rounds, [h["mean_site_accuracy"] for h in ok], "mean over sites", width=2.5, colour="black")
        chart.line(rounds, [h["pooled_accuracy"] for h in ok], f"all {name} records", width=2, style="--", colour="grey")
    for (label, value), style in zip((baselines or {}).items(), (":", "-.", (5.0, 1.0))):
        chart.hline(value, f"{label} ({value:.3f})", width=1.5, style=style,
                    colour="tab:red" if "own" in label else "tab:purple" if "every" in label else "tab:green")
    chart.save(path)
