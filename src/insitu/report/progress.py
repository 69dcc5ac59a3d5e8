"""A rich progress bar that advances once per federated round."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


@contextmanager
def round_progress(total: int, *, enabled: bool, label: str, console: Console | None = None) -> Iterator[Callable[[dict[str, Any]], None]]:
    if not enabled:
        yield lambda rec: None
        return
    prog = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=console or Console(stderr=True), transient=False,
    )
    with prog:
        tid = prog.add_task(label, total=total, status="")

        def advance(rec: dict[str, Any]) -> None:
            if rec.get("status") == "ok":
                status = f"acc {rec['mean_site_accuracy']:.3f}"
                if rec.get("dropped"):
                    status += f" · {len(rec['dropped'])} dropped"
            else:
                status = "[red]round aborted"
            prog.update(tid, advance=1, status=status)

        yield advance
