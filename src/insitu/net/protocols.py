"""Which protection a message that opens a job belongs to, before the site has seen the job's plan.

Secure aggregation's key agreement and homomorphic key dealing reach a site before its first
TRAIN.  The kind of message says which protection it belongs to (``SECAGG_*`` → secure
aggregation, ``HE_*`` → homomorphic aggregation, its scheme checked against the closed
:class:`~insitu.plan.Protection` list); nothing on the wire picks code.  Everything else about
protection is built from the plan by :mod:`insitu.builder`.
"""
from __future__ import annotations

from insitu.errors import ProtocolError
from insitu.federation.messages import Message, MessageKind
from insitu.plan import Protection

HE = (Protection.PAILLIER, Protection.CKKS)


def protocol_of(msg: Message) -> Protection | None:
    """The protection a message that may open a job (before its first TRAIN) belongs to, or None."""
    if msg.kind in (MessageKind.SECAGG_ADVERTISE, MessageKind.SECAGG_SHARE, MessageKind.SECAGG_UNMASK):
        return Protection.SECAGG
    if msg.kind in (MessageKind.HE_KEYS, MessageKind.HE_DECRYPT):
        scheme = msg.meta.get("scheme")
        if scheme not in [p.value for p in HE]:
            raise ProtocolError(f"{msg.kind.value} names scheme {scheme!r}, not one of {[p.value for p in HE]}")
        return Protection(scheme)
    return None


__all__ = ["protocol_of"]
