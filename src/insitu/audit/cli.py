"""``insitu audit``: verify, list and anchor the tamper-evident audit log."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from insitu.audit.keys import fingerprint, load_public_key, load_public_keys, write_keypair
from insitu.cliopts import renamed
from insitu.errors import ConfigError, SecurityError

app = typer.Typer(help="Tamper-evident audit log: verify the chain and signatures, list entries, create writer keys.",
                  no_args_is_help=True)
out = Console()

_LOG_HELP = "Audit log: a SQLite file or a postgresql://user:pass@host/db URL."


def _keys_dir(log: str, keys: Optional[Path]) -> Path:
    if keys is not None:
        return keys
    if "://" in log:
        raise ConfigError("for a database URL pass --keys DIR (the writers' <name>.pub files)")
    return Path(log).resolve().parent / "keys"


@app.command("verify")
def verify_command(
    log: str = typer.Option(..., help=_LOG_HELP),
    keys: Optional[Path] = typer.Option(None, help="Directory of <writer>.pub files. Default: keys/ beside the log."),
    expect_head: Optional[str] = typer.Option(None, help="A head published earlier, SEQ:HASH (from `insitu audit head`): "
                                                          "detects truncation and wholesale replacement."),
) -> None:
    """Check the signed genesis (the log's writer manifest), every entry's hash link and signature, and the
    signed head; names the first bad entry and why (exit code 2).  Only keys the manifest pins are used: the
    owner's .pub must be in --keys; a .pub of a writer the manifest does not pin is ignored."""
    from insitu.audit.log import AuditHead, AuditLog  # SQLAlchemy loads here, not with the CLI

    public = load_public_keys(_keys_dir(log, keys))
    anchor = None
    if expect_head:
        seq, _, h = expect_head.partition(":")
        if not seq.isdigit() or len(h) != 64:
            raise ConfigError(f"--expect-head must be SEQ:HASH (64 hex digits), got {expect_head!r}")
        anchor = AuditHead(int(seq), h)
    with AuditLog.read(log) as audit:
        report = audit.verify(public, expect_head=anchor)
    if not report.ok:
        raise SecurityError(f"audit log NOT intact: entry #{report.first_bad_seq}: {report.reason} "
                            f"({report.entries_checked} entries before it verified)")
    out.print(f"[green]intact[/]: {report.entries_checked} entries, writers {list(report.writers)}, "
              f"head #{report.head.seq if report.head else 0} {report.head.entry_hash[:16] if report.head else ''}",
              highlight=False, markup=True)
    out.print(f"owner {report.owner}, pinned writers {list(report.pinned)}", highlight=False, markup=False)
    if report.ignored_keys:
        out.print(f"ignored (not pinned by the log's signed manifest): {list(report.ignored_keys)}",
                  highlight=False, markup=False)


@app.command("show")
def show_command(
    log: str = typer.Option(..., help=_LOG_HELP),
    start: int = typer.Option(1, help="First entry number."),
    limit: int = typer.Option(50, help="How many entries."),
    action: Optional[str] = typer.Option(None, help="Only this action, e.g. deid.run."),
    details: bool = typer.Option(False, help="Show the details JSON."),
) -> None:
    """List entries as stored (run `verify` to know they are genuine)."""
    from insitu.audit.log import AuditLog, _redact  # SQLAlchemy loads here, not with the CLI

    t = Table(title=f"audit log {_redact(log)}")
    for c in ("#", "time (UTC)", "writer", "action", "subject") + (("details",) if details else ()):
        t.add_column(c)
    with AuditLog.read(log) as audit:
        for e in audit.entries(start=start, limit=limit, action=action):
            row = [str(e.seq), e.timestamp[:19], e.writer, str(e.action), e.subject[:60]]
            if details:
                row.append(json.dumps(e.details)[:200])
            t.add_row(*row)
    out.print(t)


@app.command("head")
def head_command(log: str = typer.Option(..., help=_LOG_HELP)) -> None:
    """Print the newest entry as SEQ:HASH; publish it outside the site and pass it to `verify --expect-head`."""
    from insitu.audit.log import AuditLog  # SQLAlchemy loads here, not with the CLI

    with AuditLog.read(log) as audit:
        h = audit.head()
    print(f"{h.seq}:{h.entry_hash}")


@app.command("add-writer")
def add_writer_command(
    log: str = typer.Option(..., help=_LOG_HELP),
    key: Path = typer.Option(..., help="The log owner's private key (the writer that created the log)."),
    owner: str = typer.Option(..., help="The owner's writer name."),
    writer: str = typer.Option(..., help="Writer to pin, e.g. gateway."),
    pub: Optional[Path] = typer.Option(None, help="Its public key. Default: <writer>.pub beside --key."),
) -> None:
    """Pin another writer's public key in the log's signed manifest (owner only); only pinned writers may write."""
    from insitu.audit.log import AuditLog  # SQLAlchemy loads here, not with the CLI

    pub = pub if pub is not None else key.parent / f"{writer}.pub"
    public = load_public_key(pub)
    with AuditLog.open(log, key, owner) as audit:
        entry = audit.add_writer(writer, public)
    out.print(f"pinned writer {writer} (key {fingerprint(public)}) in entry #{entry.seq}", highlight=False, markup=False)


@app.command("keygen")
def keygen_command(
    writer: str = typer.Option(..., help="Writer name, e.g. site-a, gateway, coordinator."),
    dir: Path = typer.Option(Path("keys"), "--out", "-o", help="Key directory to write (<writer>.key mode 0600, <writer>.pub)."),
    _old_dir: Any = renamed("--dir", "--out"),
) -> None:
    """Create an Ed25519 signing key for one audit writer; give only the .pub to verifiers."""
    key_path, pub_path = write_keypair(dir, writer)
    pub = load_public_keys(dir)[writer]
    out.print(f"private key {key_path} (keep secret), public key {pub_path}, fingerprint {fingerprint(pub)}")
