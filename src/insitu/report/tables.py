"""Terminal tables for run summaries."""
from __future__ import annotations

from typing import Any

from rich.table import Table


def _fmt(v: Any) -> str:
    return "–" if v is None or v != v else f"{v:.3f}"


def _bytes(v: Any) -> str:
    if not v:
        return "–"
    for unit, size in (("MB", 1e6), ("kB", 1e3)):
        if v >= size:
            return f"{v / size:.1f} {unit}"
    return f"{v:.0f} B"


#: the table column of each --personalize-mode (insitu.learn.personalize.PersonalMode); fine-tuning otherwise
_PERSONAL_COLUMN = {"ensemble": "federated + own model, mean risk", "complement": "federated + own model stopped for the mix"}


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
    aucs = fin.get("site_auc")  # binary tasks: each site's AUROC of the federated model (None: a one-class split)
    if aucs is not None:
        t.add_column("federated AUC", justify="right")
    ft = fin.get("personalized")  # --personalize: each site's own fine-tuned model (its test scores only)
    if ft:
        t.add_column(_PERSONAL_COLUMN.get(ft.get("mode"), "federated + local fine-tuning"), justify="right")
    t.add_column("own model, own split", justify="right")
    t.add_column("local model, every site", justify="right")
    t.add_column("pooled", justify="right")
    per_site = fin.get("bytes_up_per_round_per_site", {})
    t.add_column("bytes up/round", justify="right")
    down = fin.get("bytes_down_per_round_per_site", {})
    t.add_column("bytes down/round", justify="right")
    across = loc.get("mean_accuracy_across_sites", {})
    ft_cell = (lambda v: [_fmt(v)]) if ft else (lambda v: [])
    for name, sizes in summary["sites"].items():
        t.add_row(name, str(sizes["n_train"]), str(sizes["n_test"]), _fmt(fin["site_accuracy"].get(name)),
                  *([_fmt(aucs.get(name))] if aucs is not None else []), *ft_cell(ft["site_accuracy"].get(name) if ft else None), _fmt(loc.get("site_accuracy", {}).get(name)), _fmt(across.get(name)),
                  _fmt(poo.get("site_accuracy", {}).get(name)), _bytes(per_site.get(name)), _bytes(down.get(name)))
    t.add_section()
    auc_cell = (lambda v: [_fmt(v)]) if aucs is not None else (lambda v: [])
    t.add_row("mean over sites", "", "", _fmt(fin["mean_site_accuracy"]), *auc_cell(fin.get("mean_site_auc")), *ft_cell(ft["mean_site_accuracy"] if ft else None), _fmt(loc.get("mean_site_accuracy")),
              _fmt(float(sum(across.values()) / len(across)) if across else None), _fmt(poo.get("mean_site_accuracy")),
              _bytes(sum(per_site.values()) / len(per_site) if per_site else None), _bytes(sum(down.values()) / len(down) if down else None))
    if "worst_site_accuracy" in fin:
        worst = lambda b: _fmt(min(b["site_accuracy"].values())) if b.get("site_accuracy") else "–"  # noqa: E731
        t.add_row("worst site", "", "", _fmt(fin["worst_site_accuracy"]), *auc_cell(fin.get("worst_site_auc")), *ft_cell(min(ft["site_accuracy"].values()) if ft and ft["site_accuracy"] else None), worst(loc), "", worst(poo), "", "")
    all_auc = fin.get("all_records_auc", (fin.get("clinical") or {}).get("pooled", {}).get("auroc"))  # an ICU run's clinical figures hold it
    t.add_row("all test records", "", "", _fmt(fin["pooled_accuracy"]), *auc_cell(all_auc), *([""] if ft else []), _fmt(loc.get("pooled_accuracy")), "",
              _fmt(poo.get("pooled_accuracy")), "", "")
    t.caption = (("federated + local fine-tuning: each site fine-tuned the federated model on its own records, checkpoint "
                  "chosen on its own validation split; the model stays at the site.  " if ft else "") + "own model, own split: each site trains alone and is scored on its own test split.  local model, every site "
                 "(FLamby's local baseline): that site's model scored on every site's test split, mean over sites.  "
                 "pooled: one model on all records together (data leaving the hospitals)."
                 + ("  federated AUC: each site's AUROC from its evaluation answer (–: its test split holds one class); over all "
                    "test records the simulator computes it, holding every split (a deployment has the per-site figures only)."
                    if aucs is not None else ""))
    t.caption_justify = "left"
    return t


def collapse_warnings(summary: dict[str, Any]) -> list[str]:
    """Sites where the federated model does no better than always answering the majority class of
    that site's test split, and a model that is worse than its baselines by a wide margin."""
    fin = summary["final"]
    out = []
    for name, rate in summary.get("majority_rate", {}).items():
        acc = fin["site_accuracy"].get(name)
        if acc is not None and acc <= rate:
            out.append(f"site {name}: federated accuracy {acc:.3f} is no better than always answering its test split's "
                       f"majority class ({rate:.3f}); the model has collapsed there")
    loc = summary.get("baselines", {}).get("local_only", {})
    own = loc.get("mean_site_accuracy")
    if own is not None and fin["mean_site_accuracy"] < own - 0.1:
        out.append(f"the federated model (mean {fin['mean_site_accuracy']:.3f}) is more than 0.1 below each site training alone "
                   f"({own:.3f}): a setting of this run (DP noise, compression, server optimiser or learning rate) ruins it")
    return out
