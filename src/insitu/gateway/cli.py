"""``insitu gateway ...``: serve the medical-agent gateway, mint tokens, make the token key pair."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

app = typer.Typer(
    name="gateway",
    help="The medical-agent gateway: HTTPS (TLS 1.3 only) role-based access to records and to the federated model.",
    no_args_is_help=True,
)
out = Console()

ConfigOpt = typer.Option(Path("gateway.toml"), "--config", "-c", help="gateway.toml (paths in it are relative to its directory)")


@app.command("serve")
def serve_cmd(config: Path = ConfigOpt, port: Optional[int] = typer.Option(None, help="override server.port")) -> None:
    """Serve the API over HTTPS, TLS 1.3 only; every access decision goes to the audit log."""
    from insitu.gateway.config import GatewayConfig
    from insitu.gateway.service import serve_config

    cfg = GatewayConfig.load(config)
    out.print(f"gateway on https://{cfg.host}:{port or cfg.port} (TLS 1.3 only, client certs {cfg.client_certs.value})")
    serve_config(cfg, port=port)


@app.command("token")
def token_cmd(
    role: str = typer.Option(..., help="doctor | nurse | ai-model"),
    subject: str = typer.Option(..., help="who the token is for, e.g. a staff id or agent name"),
    ttl: str = typer.Option("8h", help="lifetime: 90s, 15m, 8h, 2d (at most tokens.max_ttl)"),
    ward: Optional[str] = typer.Option(None, help="ward attribute, for ward-scoped rules"),
    shift: Optional[str] = typer.Option(None, help="shift HH:MM-HH:MM (local time), for shift-scoped rules"),
    config: Path = ConfigOpt,
) -> None:
    """Mint an Ed25519-signed bearer token (needs tokens.private_key in the config); prints it on stdout."""
    from insitu.gateway.config import GatewayConfig
    from insitu.gateway.service import issue_token
    from insitu.gateway.tokens import parse_ttl

    cfg = GatewayConfig.load(config)
    print(issue_token(cfg, subject, role, parse_ttl(ttl), ward=ward, shift=shift))


@app.command("keygen")
def keygen_cmd(config: Path = ConfigOpt, overwrite: bool = typer.Option(False, help="replace an existing key")) -> None:
    """Create the token-signing key pair at the paths tokens.private_key and tokens.public_key name (private key 0600)."""
    from insitu.gateway.config import GatewayConfig
    from insitu.gateway.service import keygen

    priv, pub = keygen(GatewayConfig.load(config), overwrite=overwrite)
    out.print(f"wrote {priv} (keep it with the token issuer) and {pub} (the gateway needs only this)")


@app.command("import-records")
def import_cmd(
    source: str = typer.Argument(..., help="CSV file, SQLite file or postgresql:// URL of the site's records"),
    table: Optional[str] = typer.Option(None, help="table name, for SQLite and PostgreSQL sources"),
    config: Path = ConfigOpt,
) -> None:
    """Load records (a pseudonym column plus the record fields: the columns of \\[records] schema and ward, or the
    built-in record's) into the gateway's store; every row is validated first."""
    from insitu.gateway.config import GatewayConfig
    from insitu.gateway.service import import_records

    n = import_records(GatewayConfig.load(config), source, table)
    out.print(f"imported {n} records")
