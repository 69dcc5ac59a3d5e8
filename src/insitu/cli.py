"""The ``insitu`` command line: argument parsing only, every command calls the library."""
from __future__ import annotations

import sys

import typer
from rich.console import Console

from insitu.errors import InsituError

app = typer.Typer(
    name="insitu",
    help="Privacy-preserving federated learning between hospitals: patient data never leaves the site.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)


@app.callback()
def _root() -> None:
    """Privacy-preserving federated learning between hospitals: patient data never leaves the site."""


# -- commands (each a few lines over a library function) ---------------------------------------
from insitu.cli_simulate import simulate_command  # noqa: E402

app.command("simulate")(simulate_command)


from insitu.gateway.cli import app as gateway_app  # noqa: E402

app.add_typer(gateway_app, name="gateway")

from insitu.net.cli import app as ca_app  # noqa: E402
from insitu.coordinator.cli import app as coordinator_app, job_app  # noqa: E402
from insitu.site.cli import app as site_app  # noqa: E402

app.add_typer(ca_app, name="ca")
app.add_typer(coordinator_app, name="coordinator")
app.add_typer(job_app, name="job")
app.add_typer(site_app, name="site")

from insitu.deid.cli import app as deid_app  # noqa: E402
from insitu.audit.cli import app as audit_app  # noqa: E402

app.add_typer(deid_app, name="deid")
app.add_typer(audit_app, name="audit")

from insitu.compress.cli import crossdevice_command, export_command  # noqa: E402

app.command("export")(export_command)
app.command("cross-device")(crossdevice_command)

from insitu.privacy.cli import app as privacy_app  # noqa: E402

app.add_typer(privacy_app, name="privacy")


def main(argv: list[str] | None = None) -> None:
    """Entry point: InsituError becomes a one-line message and exit code 2, never a traceback."""
    try:
        app(args=argv)
    except InsituError as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)

