"""Small helpers every ``insitu`` command shares: refuse an unusable output before any work.

A command that computes for minutes and then fails to write its result has wasted the user's
time and may leave half a result behind; :func:`check_writable` refuses such a path first, with
the option's name, the path and the reason::

    check_writable(out_dir, "--out", directory=True)   # ConfigError: --out /proc/run: ...
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from insitu.errors import ConfigError

__all__ = ["check_writable"]


def check_new_dir(target: str | os.PathLike[str]) -> Path:
    """``target`` as a path for a run directory that does not exist yet, else a :class:`ConfigError`
    (a run never writes into, or over, an earlier one)."""
    path = Path(target)
    if path.exists():
        raise ConfigError(f"output directory {str(path)!r} already exists; choose another --out")
    return path


def check_writable(target: str | os.PathLike[str], option: str, *, directory: bool = False) -> Path:
    """``target`` can be created (or replaced) by this process, else a :class:`ConfigError`.

    The nearest existing ancestor must be a directory in which a file can actually be created
    (probed with a temporary file that is removed again: permission bits say nothing for root,
    nor for read-only or full file systems).  Nothing is left behind.
    """
    path = Path(target).expanduser()
    if path.exists():
        if directory and not path.is_dir():
            raise ConfigError(f"{option} {path}: exists and is not a directory")
        if not directory and path.is_dir():
            raise ConfigError(f"{option} {path}: is a directory; give a file name")
    probe_in = path if (directory and path.is_dir()) else path.parent
    while not probe_in.exists():
        probe_in = probe_in.parent
    if not probe_in.is_dir():
        raise ConfigError(f"{option} {path}: {probe_in} is a file, not a directory")
    try:
        with tempfile.TemporaryFile(dir=probe_in):
            pass
    except OSError as exc:
        raise ConfigError(f"{option} {path}: cannot write in {probe_in}: {exc.strerror or exc}") from None
    return path
