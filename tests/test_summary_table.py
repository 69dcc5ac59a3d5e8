"""The simulate table's rows, from a run summary (no training: the summary is written out by hand)."""
from __future__ import annotations

from rich.console import Console

from insitu.report.tables import summary_table


def _summary(**final):
    return {
        "config": {"dataset": "physionet2012", "strategy": "fedavg"},
        "sites": {"ccu": {"n_train": 933, "n_test": 602}, "csru": {"n_train": 1325, "n_test": 874}},
        "final": {"rounds_completed": 20, "site_accuracy": {"ccu": 0.887, "csru": 0.957}, "site_auc": {"ccu": 0.807, "csru": 0.897},
                  "mean_site_accuracy": 0.922, "mean_site_auc": 0.852, "pooled_accuracy": 0.871, **final},
    }


def _row(summary, name):
    """The cells of the row called ``name``: site, train, test, federated, federated AUC, ..."""
    console = Console(width=250, record=True)
    console.print(summary_table(summary))
    line = next(line for line in console.export_text().splitlines() if name in line)
    return [cell.strip() for cell in line.split("│")[1:-1]]


def test_an_icu_run_shows_its_all_records_auroc_from_the_clinical_figures():
    """An ICU run computes AUROC over all test records in its clinical evaluation (printed below the
    table); the table's own cell showed "–" beside a caption saying the simulator computes it."""
    assert _row(_summary(clinical={"pooled": {"auroc": 0.8669, "n": 4000}}), "all test records")[3:5] == ["0.871", "0.867"]


def test_the_all_records_auc_itself_wins_and_none_is_a_dash():
    assert _row(_summary(all_records_auc=0.555, clinical={"pooled": {"auroc": 0.8669}}), "all test records")[3:5] == ["0.871", "0.555"]
    assert _row(_summary(), "all test records")[3:5] == ["0.871", "–"]
