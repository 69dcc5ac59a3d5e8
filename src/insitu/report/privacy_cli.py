"""``insitu privacy report`` and ``insitu privacy compare``: argument parsing over :mod:`insitu.report.privacy`."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from insitu.errors import ConfigError

console = Console()


def _epsilons(text: str) -> tuple[float, ...]:
    try:
        eps = tuple(float(e) for e in text.split(",") if e.strip())
    except ValueError:
        raise ConfigError(f"--epsilons must be numbers separated by commas, got {text!r}") from None
    if any(not e > 0 for e in eps):
        raise ConfigError(f"every ε must be positive, got {text!r}")
    return eps


def _show(report, verdicts: bool = False) -> None:
    from insitu.report.privacy import rich_table, verdicts as verdicts_of

    console.print(rich_table(report))
    for n in report.notes:
        console.print(f"[dim]· {n}[/]")
    if verdicts:
        for row in report.rows:
            for v in verdicts_of(row):
                console.print(f"· {v.sentence}")
    console.print(f"HTML report: [bold]{report.html_path}[/]")


def report_command(
    run_dir: Path = typer.Argument(..., help="A finished run directory of `insitu simulate` (summary.json + model.npz)."),
    html: Optional[Path] = typer.Option(None, help="Where to write the HTML report (default RUN_DIR/privacy.html)."),
    shadows: Optional[int] = typer.Option(None, help="Shadow models for LiRA (even; default 16 for tabular models, 4 for the CNN; 0 = loss attack only)."),
    probe_records: Optional[int] = typer.Option(None, help="Single-record site updates the curious coordinator attacks (default 32 tabular, 4 images), as many per probe round as the run has sites."),
    iterations: int = typer.Option(300, help="Gradient-matching iterations per image (CNN)."),
    seed: int = typer.Option(0, help="Seed for shadow splits and probe records."),
) -> None:
    """Attack a finished run the way a curious coordinator or an outsider with the final model would.

    Membership inference on the final model (loss threshold, LiRA); reconstruction of records
    from single-record site updates as the coordinator receives them under the run's own
    protocol and DP; the loss-equation attack on the training losses sites report; the evaluation
    oracle (crafted models sent to evaluate); the ε that holds if the coordinator knows the
    sampling; and (heart) re-identification by linkage before and after de-identification.
    Ends with one plain sentence per thing that left the hospitals.
    """
    from insitu.report.privacy import privacy_report, single_thread

    with single_thread():
        _show(privacy_report(run_dir, html_out=html, shadows=shadows, probe_records=probe_records, iterations=iterations, seed=seed), verdicts=True)


def compare_command(
    dataset: str = typer.Option("heart", help="heart or pneumoniamnist (needs --data)."),
    data: Optional[str] = typer.Option(None, help="Path to the data (a MedMNIST .npz for pneumoniamnist)."),
    epsilons: str = typer.Option("8,1", help="ε values for the record-level DP runs, comma separated."),
    homomorphic: str = typer.Option("auto", help="Scheme for the homomorphic row: paillier, ckks, or auto (Paillier for small models, CKKS for the CNN)."),
    rounds: Optional[int] = typer.Option(None, help="Federated rounds of every run (default: the dataset's)."),
    model: Optional[str] = typer.Option(None, help="Model of every run: logreg, mlp or cnn (default: the dataset's)."),
    partition: Optional[str] = typer.Option(None, help="How records are split over sites in every run (iid, dirichlet:ALPHA, natural; default: the dataset's)."),
    shadows: Optional[int] = typer.Option(None, help="Shadow models for LiRA (see `privacy report`)."),
    probe_records: Optional[int] = typer.Option(None, help="Single-record site updates the curious coordinator attacks (default 32 tabular, 4 images), as many per probe round as the run has sites."),
    iterations: int = typer.Option(300, help="Gradient-matching iterations per image (CNN)."),
    seed: int = typer.Option(0, help="Seed of every run and attack."),
    seeds: int = typer.Option(1, help="Repeat every run with seeds SEED … SEED+N−1 and report means with a 95% interval (one run's MIA AUC on a few hundred records moves by about ±0.04 from training noise alone)."),
    out: Path = typer.Option(Path("runs/privacy-compare"), "--out", "-o", help="Directory for the runs, privacy.html and privacy.json."),
    combined_epsilon: float = typer.Option(1.0, help="ε of the run that combines secure aggregation with record-level DP."),
    combined: bool = typer.Option(True, "--combined/--no-combined", help="Run secure aggregation + record-level DP at --combined-epsilon."),
    replayable: bool = typer.Option(True, "--replayable/--no-replayable", help="Also run record-level DP at --combined-epsilon with replayable "
                                    "randomness (NOT private), to show the ε that holds when the coordinator knows the sampling."),
) -> None:
    """Run one task under each defence and attack every run: what each defence buys.

    Defences: none, record-level DP at each ε, secure aggregation, homomorphic aggregation, secure
    aggregation + record-level DP, and (to show what secret sampling buys) record-level DP with
    replayable randomness.  Every run is attacked through what the coordinator received: model
    updates, training losses, evaluation answers, the sampling; and the final model by an outsider.
    Prints the table and writes privacy.html, privacy.md and privacy.json in --out.
    """
    from insitu.report.privacy import CompareConfig, compare, single_thread

    if not combined_epsilon > 0:
        raise ConfigError(f"--combined-epsilon must be positive, got {combined_epsilon}")
    cc = CompareConfig(dataset=dataset, data=data, epsilons=_epsilons(epsilons), homomorphic=homomorphic, rounds=rounds,
                       seed=seed, seeds=seeds, shadows=shadows, probe_records=probe_records, iterations=iterations, out=str(out),
                       extra={**({"model": model} if model else {}), **({"partition": partition} if partition else {})},
                       combined_epsilon=combined_epsilon if combined else None, replayable=replayable)
    with single_thread():
        _show(compare(cc, progress=lambda msg: console.print(f"[dim]{msg}[/]")))


def register(app: typer.Typer) -> None:
    """Add ``report`` and ``compare`` to the ``insitu privacy`` sub-app."""
    app.command("report")(report_command)
    app.command("compare")(compare_command)
