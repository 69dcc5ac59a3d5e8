"""``insitu kit``: argument parsing over :func:`insitu.kit.write_kit`."""
from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

out = Console()


def kit_command(
    sites: list[str] = typer.Argument(..., help="The hospitals' names (certificate names: lower-case letters, digits, '-', '.')."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Directory to create (must not exist or be empty)."),
    coordinator: str = typer.Option("127.0.0.1:8443", help="HOST:PORT the sites and operators dial (HOST goes into the coordinator's certificate)."),
    operator: str = typer.Option("ops", help="The operator certificate's name."),
    gateway: str = typer.Option("gateway", help="The gateway certificate's name."),
    gateway_host: str = typer.Option("127.0.0.1", help="Host name clients dial for the gateway (goes into its certificate)."),
    gateway_port: int = typer.Option(8444, help="The gateway's HTTPS port."),
    dashboard_port: int = typer.Option(8445, help="The coordinator's dashboard port (HTTPS, operators only)."),
    days: int = typer.Option(365, help="Validity of the issued certificates in days."),
) -> None:
    """Write a whole consortium's start-up kit: root CA; coordinator, operator, site and gateway
    certificates; and every configuration file as a commented template (see README.txt in it)."""
    from insitu.kit import write_kit

    kit = write_kit(out_dir, sites, coordinator=coordinator, operator=operator, gateway=gateway,
                    gateway_host=gateway_host, gateway_port=gateway_port, dashboard_port=dashboard_port, days=days)
    out.print(f"consortium kit for {', '.join(kit.sites)} written to {kit.root} (start with {kit.root / 'README.txt'})")
    out.print(f"  keep {kit.ca / 'ca.key'} offline; copy coordinator/, operator/, sites/NAME/ and gateway/ to their machines")
