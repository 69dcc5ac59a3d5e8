"""Plots a person would rather look at than read."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def accuracy_plot(history: list[dict[str, Any]], path: Path, *, title: str, baselines: dict[str, float] | None = None) -> None:
    """Accuracy per round: the global model on each site's split, their mean and the union (the test
    splits, or the validation splits when the run selects its model on them: ``eval_split``);
    ``baselines`` (label → mean accuracy over sites, on the test splits) are drawn as horizontal lines."""
    ok = [h for h in history if h["status"] == "ok"]
    split = ok[0].get("eval_split", "test") if ok else "test"
    name = "validation" if split == "val" else "test"
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if ok:
        rounds = [h["round"] for h in ok]
        sites = sorted({s for h in ok for s, e in h["sites"].items() if f"{split}_accuracy" in e})
        for s in sites:
            ax.plot(rounds, [h["sites"].get(s, {}).get(f"{split}_accuracy", float("nan")) for h in ok], lw=1, alpha=0.6, label=s)
        ax.plot(rounds, [h["mean_site_accuracy"] for h in ok], lw=2.5, color="black", label="mean over sites")
        ax.plot(rounds, [h["pooled_accuracy"] for h in ok], lw=2, ls="--", color="grey", label=f"all {name} records")
    for (label, value), style in zip((baselines or {}).items(), (":", "-.", (0, (5, 1)))):
        ax.axhline(value, ls=style, lw=1.5, color="tab:red" if "own" in label else "tab:purple" if "every" in label else "tab:green",
                   label=f"{label} ({value:.3f})")
    ax.set_xlabel("round")
    ax.set_ylabel(f"{name} accuracy" + (" (baselines: test)" if split == "val" and baselines else ""))
    ax.set_title(title, fontsize=9)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
