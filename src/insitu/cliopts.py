"""Option conventions shared by every ``insitu`` command.

* ``-h`` / ``--help`` everywhere, ``insitu --version`` (:mod:`insitu.cli`);
* ``--config/-c`` names the command's TOML file and defaults to its conventional name in the
  current directory (``coordinator.toml``, ``site.toml``, ``operator.toml``, ``gateway.toml``);
* ``--out/-o`` is what a command writes (a file or a directory), never an input;
* ``--data`` is an input data set, never an output;
* ``--json`` is a flag: print JSON on stdout instead of a table (writing JSON to a file is ``--out``).

An option renamed to follow them stays as a hidden name that fails with the new name, so an old
script stops with a clear message instead of doing something else.
"""
from __future__ import annotations

from typing import Any

import typer


def renamed(old: str, new: str) -> Any:
    """A hidden option ``old`` that refuses with "``old`` is now ``new``"."""

    def refuse(value: Any) -> Any:
        if value not in (None, False):
            raise typer.BadParameter(f"{old} is now {new}", param_hint=old)
        return value

    return typer.Option(None, old, hidden=True, callback=refuse, expose_value=False)


__all__ = ["renamed"]
