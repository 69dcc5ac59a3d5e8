"""One convention across the CLI: -h everywhere, --version, one error style, one meaning per option name."""
from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

from insitu import __version__
from insitu.cli import app, main


def _commands():
    root = typer.main.get_command(app)
    out = []

    def walk(cmd, path):
        out.append((path, cmd))
        for name, sub in (getattr(cmd, "commands", None) or {}).items():
            walk(sub, [*path, name])

    walk(root, [])
    return out


COMMANDS = _commands()


@pytest.mark.parametrize("path", [p for p, _ in COMMANDS], ids=lambda p: " ".join(p) or "insitu")
def test_every_command_and_group_answers_dash_h(path):
    res = CliRunner().invoke(app, [*path, "-h"])
    assert res.exit_code == 0, res.output
    assert "Usage:" in res.output and "--help" in res.output


def test_version(capsys):
    main(["--version"])  # returns: exit code 0
    assert capsys.readouterr().out.strip() == f"insitu {__version__}"
    assert CliRunner().invoke(app, ["-V"]).output.strip() == f"insitu {__version__}"


def _options():
    for path, cmd in COMMANDS:
        for p in cmd.params:
            if p.param_type_name == "option" and not p.hidden:
                yield path, p


def test_json_is_always_a_flag_and_config_never_required():
    for path, p in _options():
        if "--json" in p.opts:
            assert p.is_flag, f"insitu {' '.join(path)} --json takes a value; --json prints JSON, a file is --out"
        if "--config" in p.opts:
            assert not p.required, f"insitu {' '.join(path)} --config is required; give it the conventional default"
            assert "-c" in p.opts


def test_out_is_always_o_outside_simulate():
    for path, p in _options():
        if "--out" in p.opts and path != ["simulate"]:
            assert "-o" in p.opts, f"insitu {' '.join(path)} --out lacks -o"


@pytest.mark.parametrize("argv, expect", [
    (["job", "status"], "Missing argument 'job'"),
    (["job", "stat", "x"], "No such command 'stat'"),
    (["site", "pending", "--bogus"], "No such option: --bogus"),
    (["job", "status", "x", "--config", "/nonexistent/operator.toml"], "cannot read operator config /nonexistent/operator.toml"),
    (["cross-device", "--json", "x.json"], "--json is now --out"),
    (["audit", "keygen", "--writer", "w", "--dir", "k"], "--dir is now --out"),
    (["deid", "rotate", "--data", "d.csv", "--keyring", "k", "--new-key-id", "k2", "--id-column", "id"], "--data is now --target"),
])
def test_one_error_style(argv, expect, capsys):
    with pytest.raises(SystemExit) as ex:
        main(argv)
    assert ex.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expect in err and "Traceback" not in err and len(err.strip().splitlines()) <= 3, err


def test_unreachable_coordinator_is_a_one_line_error(tmp_path, capsys):
    from insitu.kit import write_kit
    from insitu.net.sandbox import free_port

    kit = write_kit(tmp_path / "k", ["hungary"], coordinator=f"127.0.0.1:{free_port()}")
    with pytest.raises(SystemExit):
        main(["job", "list", "--config", str(kit.operator)])
    err = capsys.readouterr().err
    assert err.startswith("error: cannot reach the coordinator at 127.0.0.1:") and "Traceback" not in err


def test_markup_in_messages_is_printed_as_is(tmp_path, capsys):
    job = tmp_path / "job.toml"
    job.write_text('name = "x"\ndataset = "heart"\n[task]\nlr = 1\n')
    with pytest.raises(SystemExit):
        main(["job", "hash", str(job)])
    assert "[task] gives the data's shape only" in capsys.readouterr().err


def test_help_texts_survive_rich_markup():
    """--help renders help as Rich markup, where `[ray]` or `[operator]` is a style tag and vanishes
    (`pip install 'insitu[ray]'` showed as `pip install 'insitu'`): every bracket meant literally is
    escaped (`\\[`), so the rendered text says what the source says."""
    from rich.text import Text

    eaten = []
    for path, cmd in COMMANDS:
        texts = [("help", cmd.help or "")] + [(p.name, getattr(p, "help", None) or "") for p in cmd.params]
        for name, text in texts:
            if Text.from_markup(text).plain != text.replace("\\[", "["):
                eaten.append(f"insitu {' '.join(path)} {name}: {text!r}")
    assert not eaten, "help text that Rich markup would mangle (escape '[' as '\\['):\n" + "\n".join(eaten)


def test_escaped_bracket_shows_in_help():
    res = CliRunner().invoke(app, ["simulate", "-h"], env={"COLUMNS": "400"})
    assert "pip install 'insitu[ray]'" in res.output
