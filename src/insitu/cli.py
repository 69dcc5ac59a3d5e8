"""The ``insitu`` command line: argument parsing only, every command calls the library."""
from __future__ import annotations

import sys

import typer
from rich.console import Console

from insitu.errors import InsituError

#: every command and group answers -h as well as --help (sub-commands inherit it from the root context)
CONTEXT = {"help_option_names": ["-h", "--help"]}

_app = typer.Typer(
    name="insitu",
    help="Privacy-preserving federated learning between hospitals: patient data never leaves the site.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings=CONTEXT,
)
err = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        from insitu import __version__

        typer.echo(f"insitu {__version__}")
        raise typer.Exit()


@_app.callback()
def _root(version: bool = typer.Option(False, "--version", "-V", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """Privacy-preserving federated learning between hospitals: patient data never leaves the site."""


# -- commands (each a few lines over a library function) ---------------------------------------
from insitu.cli_simulate import simulate_command  # noqa: E402

_app.command("simulate")(simulate_command)


_COMPLETE = False


def _register_all() -> None:
    """Every command besides ``simulate``: imported and registered on first need (``insitu --help``, any
    other command, ``from insitu.cli import app``), so that ``insitu simulate`` loads none of them
    (their modules hold ~8 MB and ~0.2 s of imports: the gateway's pydantic models, the coordinator,
    the CA, ...)."""
    global _COMPLETE
    if _COMPLETE:
        return
    _COMPLETE = True
    from insitu.gateway.cli import app as gateway_app

    _app.add_typer(gateway_app, name="gateway")

    from insitu.net.cli import app as ca_app
    from insitu.coordinator.cli import app as coordinator_app, job_app, sites_command
    from insitu.site.cli import app as site_app

    _app.add_typer(ca_app, name="ca")
    _app.add_typer(coordinator_app, name="coordinator")
    _app.add_typer(job_app, name="job")
    _app.command("sites")(sites_command)
    _app.add_typer(site_app, name="site")

    from insitu.deid.cli import app as deid_app
    from insitu.audit.cli import app as audit_app

    _app.add_typer(deid_app, name="deid")
    _app.add_typer(audit_app, name="audit")

    from insitu.compress.cli import crossdevice_command, export_command

    _app.command("export")(export_command)
    _app.command("cross-device")(crossdevice_command)

    from insitu.privacy.cli import app as privacy_app
    from insitu.kit_cli import kit_command

    _app.command("kit")(kit_command)
    _app.add_typer(privacy_app, name="privacy")


def __getattr__(name: str):
    """``insitu.cli.app``: the whole command tree, every command registered."""
    if name == "app":
        _register_all()
        return _app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _fail(message: str, code: int = 2) -> None:
    """One line on stderr, never markup-interpreted (a ``[task]`` in a message stays), then exit."""
    from rich.text import Text

    line = " ".join(str(message).split())
    err.print(Text.assemble(("error: ", "bold red"), line), soft_wrap=True, highlight=False)
    sys.exit(code)


def _os_message(exc: OSError) -> str:
    where = f" {exc.filename}" if exc.filename else ""
    return f"{exc.strerror or exc}:{where}" if exc.strerror else str(exc)


def main(argv: list[str] | None = None) -> None:
    """Entry point: every user error is one line on stderr and exit code 2, never a traceback.

    That covers insitu's own errors (:class:`InsituError`), usage errors (an unknown option, a
    value of the wrong type: the line names the option and the command's ``--help``) and errors
    of the operating system (a path that cannot be read or written, a refused connection).
    """
    import typer.main

    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] != ["simulate"]:  # `insitu simulate ...` needs no other command (see _register_all)
        _register_all()
    command = typer.main.get_command(_app)
    try:
        code = command.main(args=argv, prog_name="insitu", standalone_mode=False)
    except typer.TyperException as exc:  # typer's (vendored click's) usage errors, all subclasses of this
        if type(exc).__name__ == "NoArgsIsHelpError":  # `insitu` or `insitu ca` alone: the help, as before
            print(exc.format_message())
            sys.exit(2)
        ctx = getattr(exc, "ctx", None)
        hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        _fail(f"{exc.format_message()}{hint}")
    except typer.Abort:
        _fail("interrupted", code=130)
    except InsituError as exc:
        _fail(str(exc))
    except OSError as exc:
        _fail(_os_message(exc))
    if isinstance(code, int) and code != 0:
        sys.exit(code)
