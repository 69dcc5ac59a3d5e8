"""`insitu audit keygen/verify/show/head` over a real log file."""
from __future__ import annotations

import sqlite3

from typer.testing import CliRunner

from insitu.audit import AuditAction, AuditLog
from insitu.audit.cli import app
from insitu.errors import SecurityError

runner = CliRunner()


def test_keygen_verify_show_and_tamper(tmp_path):
    keys = tmp_path / "keys"
    assert runner.invoke(app, ["keygen", "--writer", "site-a", "--out", str(keys)]).exit_code == 0
    db = tmp_path / "audit.db"
    log = AuditLog.open(db, keys / "site-a.key", "site-a")
    for i in range(3):
        log.append(AuditAction.TASK_APPROVAL, f"task-{i}", {"hash": f"{i:064x}"})
    log.close()
    r = runner.invoke(app, ["verify", "--log", str(db)])  # keys/ beside the log by default
    assert r.exit_code == 0 and "intact: 3 entries" in r.output
    head = runner.invoke(app, ["head", "--log", str(db)]).output.strip()
    assert head.startswith("3:")
    r = runner.invoke(app, ["show", "--log", str(db), "--details"])
    assert r.exit_code == 0 and "task.approval" in r.output and "task-2" in r.output

    con = sqlite3.connect(db)
    con.execute("DROP TRIGGER audit_entries_no_update")
    con.execute("UPDATE audit_entries SET subject = 'task-x' WHERE seq = 2")
    con.commit()
    con.close()
    r = runner.invoke(app, ["verify", "--log", str(db), "--keys", str(keys)])
    assert isinstance(r.exception, SecurityError)
    assert "entry #2" in str(r.exception) and "edited" in str(r.exception)
    r = runner.invoke(app, ["verify", "--log", str(db), "--expect-head", head])
    assert isinstance(r.exception, SecurityError)
