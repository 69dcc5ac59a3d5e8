"""Tamper-evident audit log: hash-chained, Ed25519-signed, append-only.

    from insitu.audit import AuditLog, AuditAction
    from insitu.audit.keys import write_keypair, load_public_keys

    log = AuditLog.open("audit.db", "keys/site-a.key", writer="site-a")   # or postgresql://...
    log.append(AuditAction.DATA_ACCESS, "visits", {"rows": 1200})
    AuditLog.read("audit.db").verify(load_public_keys("keys")).raise_if_bad()

See ``insitu.audit.log`` for what the chain and the signatures do and do not protect against.
"""
from insitu.audit.log import AuditAction, AuditEntry, AuditHead, AuditLog, Genesis, VerifyReport

__all__ = ["AuditAction", "AuditEntry", "AuditHead", "AuditLog", "Genesis", "VerifyReport"]
