"""One reader for a table of a TOML configuration file (``[coordinator]``, ``[dashboard]`` …).

Every configuration table is read the same way: the file must parse, the table must be a table,
unknown keys are refused naming them and the known ones, required keys must be there, and
paths are taken relative to the file (so a kit directory can be moved as a whole).
"""
from __future__ import annotations

import tomllib
from dataclasses import fields
from pathlib import Path
from typing import Any

from insitu.errors import ConfigError


def read_table(path: str | Path, table: str, cls: type, *, required: tuple[str, ...] = (), paths: tuple[str, ...] = (),
               optional: bool = False) -> dict[str, Any] | None:
    """The ``[table]`` of ``path`` as keyword arguments for the dataclass ``cls``; None if the
    table is absent and ``optional``.  Errors name the file, the table and the key."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text()).get(table)
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    if raw is None and optional:
        return None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} needs a [{table}] table")
    known = {f.name for f in fields(cls)}
    bad = set(raw) - known
    if bad:
        raise ConfigError(f"{path}: unknown keys {sorted(bad)} in [{table}]; known: {sorted(known)}")
    missing = set(required) - set(raw)
    if missing:
        raise ConfigError(f"{path}: [{table}] lacks {sorted(missing)}")
    base = path.resolve().parent
    out = dict(raw)
    for k in paths:
        if k in out:
            if not isinstance(out[k], str):
                raise ConfigError(f"{path}: [{table}] {k} must be a path (a string), got {out[k]!r}")
            out[k] = base / out[k]
    return out


__all__ = ["read_table"]
