"""Every user error of the command line: exactly one line on stderr, exit code 2, nothing half-written."""
from __future__ import annotations

import socket
from pathlib import Path

import pytest

from insitu.cli import main


def run(capsys, *args: str) -> tuple[int, str, str]:
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_error(capsys, *args: str) -> str:
    code, _, err = run(capsys, *args)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def under_a_file(tmp_path: Path) -> Path:
    (tmp_path / "a-file").write_text("x")
    return tmp_path / "a-file" / "run"


# -- usage errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, needle", [
    (["simulate", "--epsilonn", "1"], "No such option: --epsilonn"),
    (["simulate", "--rounds", "x"], "Invalid value for '--rounds'"),
    (["ca", "issue", "--name", "x", "--role", "root", "--out", "x"], "Invalid value for '--role'"),
    (["job", "hash"], "Missing argument 'job_file'"),
    (["nonsense"], "No such command 'nonsense'"),
])
def test_usage_errors_are_one_line_naming_the_help(capsys, args, needle):
    line = one_line_error(capsys, *args)
    assert needle in line and "--help" in line


def test_help_and_bare_command_unchanged(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "simulate" in out
    code, out, _ = run(capsys, "ca")
    assert code == 2 and "csr" in out


# -- simulate -------------------------------------------------------------------------------------------

DP_OPTIONS = [
    (["--epsilon", "1"], "--epsilon"),
    (["--noise-multiplier", "1.1"], "--noise-multiplier"),
    (["--clip", "0.5"], "--clip"),
    (["--dp-placement", "distributed"], "--dp-placement"),
    (["--adaptive-clip"], "--adaptive-clip"),
    (["--site-budget", "3"], "--site-budget"),
    (["--epsilon", "1", "--clip", "1"], "--epsilon, --clip"),
]


@pytest.mark.parametrize("args, named", DP_OPTIONS, ids=[" ".join(a) for a, _ in DP_OPTIONS])
def test_dp_options_without_dp_are_refused(capsys, tmp_path, args, named):
    line = one_line_error(capsys, "simulate", *args, "--out", tmp_path / "run")
    assert f"{named} given without --dp" in line and "--dp record" in line
    assert not (tmp_path / "run").exists()


def test_dp_options_with_dp_pass_the_check(capsys, tmp_path):
    # --dp site with an impossible --rounds gets past the DP-option check to the library's own error
    line = one_line_error(capsys, "simulate", "--dp", "site", "--epsilon", "1", "--rounds", "0", "--out", tmp_path / "run")
    assert "without --dp" not in line and "rounds must be an integer from 1" in line


@pytest.mark.parametrize("where", ["under a file", "/proc"])
def test_simulate_unwritable_out_fails_before_work(capsys, tmp_path, where):
    out = under_a_file(tmp_path) if where == "under a file" else Path("/proc/insitu-test-run")
    line = one_line_error(capsys, "simulate", "--rounds", "1", "--out", out)
    assert f"--out {out}" in line
    assert not out.exists()


# -- deid -------------------------------------------------------------------------------------------------


def test_deid_apply_unwritable_out_writes_nothing(capsys, tmp_path):
    out = under_a_file(tmp_path)
    log = tmp_path / "audit.db"
    line = one_line_error(capsys, "deid", "apply", "--policy", tmp_path / "p.toml", "--source", tmp_path / "s.csv",
                          "--out", out, "--audit-log", log, "--audit-key", tmp_path / "k")
    assert f"--out {out}" in line and "is a file, not a directory" in line
    assert not log.exists()  # refused before the audit log (or anything else) was opened


def test_deid_keygen_on_an_unwritable_path_is_one_line(capsys, tmp_path):
    line = one_line_error(capsys, "deid", "keygen", "--secret", under_a_file(tmp_path) / "site.secret")
    assert "a-file" in line


# -- job / coordinator --------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_job_status_with_the_coordinator_down(capsys, tmp_path):
    port = free_port()
    cfg = tmp_path / "operator.toml"
    cfg.write_text(f'[operator]\ncoordinator = "127.0.0.1:{port}"\ncert = "ops.pem"\nkey = "ops.key"\nca = "ca.pem"\n')
    line = one_line_error(capsys, "job", "status", "j1", "--config", cfg)
    assert f"cannot reach the coordinator at 127.0.0.1:{port}" in line and "coordinator serve" in line


def test_operator_config_with_a_bad_port(capsys, tmp_path):
    cfg = tmp_path / "operator.toml"
    cfg.write_text('[operator]\ncoordinator = "127.0.0.1:http"\ncert = "a"\nkey = "b"\nca = "c"\n')
    line = one_line_error(capsys, "job", "list", "--config", cfg)
    assert "[operator] coordinator = HOST:PORT" in line  # the brackets survive: no terminal markup


def test_job_hash_on_a_missing_file(capsys, tmp_path):
    line = one_line_error(capsys, "job", "hash", tmp_path / "nope.toml")
    assert "cannot read job file" in line and "nope.toml" in line


def test_job_file_error_keeps_the_table_name(capsys, tmp_path):
    job = tmp_path / "job.toml"
    job.write_text('name = "x"\nrounds = 2\ndataset = "pneumoniamnist"\n')
    line = one_line_error(capsys, "job", "hash", job)
    assert "in a [task] table" in line


# -- ca csr -------------------------------------------------------------------------------------------------


def test_ca_csr_refuses_to_overwrite_a_key(capsys, tmp_path):
    code, out, _ = run(capsys, "ca", "csr", "--name", "hospital-c", "--out", tmp_path)
    assert code == 0
    key = (tmp_path / "hospital-c.key").read_bytes()
    csr = (tmp_path / "hospital-c.csr").read_bytes()
    line = one_line_error(capsys, "ca", "csr", "--name", "hospital-c", "--out", tmp_path)
    assert "hospital-c.key already exists; refusing to overwrite a private key" in line
    assert (tmp_path / "hospital-c.key").read_bytes() == key and (tmp_path / "hospital-c.csr").read_bytes() == csr


def test_ca_csr_with_a_bad_name_leaves_no_key(capsys, tmp_path):
    one_line_error(capsys, "ca", "csr", "--name", "bad name/../x", "--out", tmp_path)
    assert list(tmp_path.iterdir()) == []
