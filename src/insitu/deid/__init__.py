"""De-identification of site records before training: keyed pseudonyms, generalization to
k-anonymity and l-diversity, per-patient date shifts (optionally coarsened), AES-GCM field
encryption at rest with fixed-length tokens, and releases in a keyed random row order.

    from insitu.data.sources import RecordSchema, read_records
    from insitu.deid import DeidPolicy, deidentify, FieldKeyring, load_site_secret

    schema = RecordSchema.from_toml("schema.toml")
    result = deidentify(read_records("visits.csv", schema), schema, DeidPolicy.from_toml("deid.toml"),
                        load_site_secret("site.secret"), keyring=FieldKeyring.load("fields.keyring"))
"""
from __future__ import annotations

import importlib
from typing import Any

#: name → submodule; loaded on first use, so `insitu deid --help` and the CLI need no pandas.
_LAZY = {
    "DeidReport": "engine", "DeidResult": "engine", "assess": "engine", "deidentify": "engine",
    "FieldKeyring": "fieldcrypt", "decrypt_frame": "fieldcrypt", "rotate_frame": "fieldcrypt",
    "RiskReport": "kanon",
    "DeidPolicy": "policy", "IdentifierAction": "policy",
    "Pseudonymizer": "pseudonym", "generate_site_secret": "pseudonym", "load_site_secret": "pseudonym",
    "DateCoarsening": "release",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'insitu.deid' has no attribute {name!r}")
    return getattr(importlib.import_module(f"insitu.deid.{mod}"), name)


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
