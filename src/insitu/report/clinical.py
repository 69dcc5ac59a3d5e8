"""The clinical part of a run report: a table of AUROC / AUPRC / Score 1 and a calibration plot."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.table import Table


def _f(v: Any) -> str:
    return "–" if v is None or v != v else f"{v:.3f}"


def clinical_table(summary: dict[str, Any]) -> Table:
    """Per site and over all test records, for the federated model of ``summary``."""
    clin = summary["final"]["clinical"]
    cfg = summary["config"]
    t = Table(title=f"{cfg['dataset']} · {cfg['strategy']} · federated model on the test set\n"
                    "Score 1 = min(Se, PPV); thresholds chosen on validation data", title_justify="left")
    for col in ("site", "test", "deaths", "AUROC", "AUPRC", "Score 1", "Se", "PPV", "acc."):
        t.add_column(col, justify="left" if col == "site" else "right")

    def row(name: str, m: dict[str, Any]) -> None:
        t.add_row(name, str(m["n"]), str(m["positives"]), _f(m["auroc"]), _f(m["auprc"]), _f(m["score1"]),
                  _f(m["sensitivity"]), _f(m["ppv"]), _f(m["accuracy"]))

    for name, m in clin["sites"].items():
        row(name, m)
    t.add_section()
    row("all", clin["pooled"])
    ft = summary["final"].get("personalized")
    if ft:  # each site's own fine-tuned model: per-site scores only (no test record's score leaves a site)
        t.add_section()
        for name, m in ft["sites"].items():
            if "auroc" in m:
                if ft.get("mode") == "ensemble":
                    row(f"{name}, mean risk of the federated model and its own (step {m['best_step']}/{m['steps']})", m)
                elif ft.get("mode") == "complement":
                    row(f"{name}, mean risk of the federated model and its own, stopped for the mix (step {m['best_step']}/{m['steps']})", m)
                else:
                    row(f"{name}, federated + local fine-tuning (best step {m['best_step']}/{m['steps']})", m)
    return t


def calibration_plot(summary: dict[str, Any], path: Path) -> None:
    """Observed outcome rate against mean predicted risk, per tenth of the risk scale, all test records."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cal = summary["final"]["clinical"]["calibration"]
    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=110)
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfect calibration")
    ax.plot(cal["mean_predicted"], cal["observed"], marker="o", color="black", label="federated model")
    for x, y, n in zip(cal["mean_predicted"], cal["observed"], cal["count"]):
        ax.annotate(str(n), (x, y), textcoords="offset points", xytext=(4, -10), fontsize=6, color="grey")
    ax.set_xlabel("mean predicted risk")
    ax.set_ylabel("observed rate")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(f"{summary['config']['dataset']} · calibration (test)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
