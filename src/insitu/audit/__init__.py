"""Tamper-evident audit log: hash-chained, Ed25519-signed, append-only.

    from insitu.audit import AuditLog, AuditAction
    from insitu.audit.keys import write_keypair, load_public_keys

    log = AuditLog.open("audit.db", "keys/site-a.key", writer="site-a")   # or postgresql://...
    log.append(AuditAction.DATA_ACCESS, "visits", {"rows": 1200})
    AuditLog.read("audit.db").verify(load_public_keys("keys")).raise_if_bad()

See ``insitu.audit.log`` for what the chain and the signatures do and do not protect against.
"""
from __future__ import annotations

__all__ = ["AuditAction", "AuditEntry", "AuditHead", "AuditLog", "Genesis", "VerifyReport"]


def __getattr__(name: str) -> object:  # SQLAlchemy loads on first use, not with the CLI or insitu.audit.keys
    if name in __all__:
        from insitu.audit import log

        return getattr(log, name)
    raise AttributeError(f"module 'insitu.audit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
