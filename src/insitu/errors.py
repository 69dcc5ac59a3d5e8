"""The one exception tree of insitu.

Every error a user can meet is an ``InsituError``; the CLI prints its message
on one line and exits non-zero, without a traceback.  Messages name what was
wrong, the value received, and what to do.

    InsituError
     ├── ConfigError          bad option, unknown name, impossible setting
     ├── DataError            a source, CSV or .npz that does not hold what it must
     ├── PolicyViolation      a site or gateway rule forbids this
     │    ├── BudgetExceeded  a round would take a site past its privacy budget
     │    └── TaskNotApproved a site was asked to run a task its admin did not approve
     ├── ProtocolError        a malformed, oversized, replayed or forged message
     │    └── RoundAborted    a round could not complete; the global model is unchanged
     ├── SecurityError        certificates, keys, signatures, tampering
     └── AuthError            no or bad credentials (gateway, operator actions)
"""
from __future__ import annotations


class InsituError(Exception):
    """Base of every error insitu raises on purpose."""


class ConfigError(InsituError):
    """An option, configuration file or name that cannot be used."""


class DataError(InsituError):
    """Input data that does not match what was declared."""


class PolicyViolation(InsituError):
    """A rule of a site, the consortium or the gateway forbids the action."""


class BudgetExceeded(PolicyViolation):
    """A round would take a site past its privacy budget; refused before training."""


class TaskNotApproved(PolicyViolation):
    """A task (or its parameters) that the site's admin did not approve."""


class ProtocolError(InsituError):
    """A message that is malformed, too large, replayed, out of order or forged."""


class UnknownPlanError(ProtocolError):
    """A request named by its content hash a plan the site did not check whole in that job (it is new,
    restarted or dropped the job).  Its class name is the refusal's code on the wire; the coordinator
    answers that code, and no other, by sending the whole plan at once
    (:mod:`insitu.federation.planref`)."""


class RoundAborted(ProtocolError):
    """A round could not complete; the global model stays as it was.

    ``culprits``: the sites whose own messages made the round fail (a malformed or inconsistent
    reply, a commitment not kept), when the protocol can tell; empty when it cannot (a drop-out
    below the threshold, an encrypted sum that hides its source).  A deployed job excludes a site
    named in ``exclude_after`` aborted rounds (insitu.coordinator.service).
    """

    def __init__(self, *args: object, culprits: tuple[str, ...] | list[str] = ()):
        super().__init__(*args)
        self.culprits = tuple(sorted(set(culprits)))


class SecurityError(InsituError):
    """Certificate, key, signature or integrity failure."""


class AuthError(InsituError):
    """Missing or invalid credentials."""


__all__ = [
    "InsituError",
    "ConfigError",
    "DataError",
    "PolicyViolation",
    "BudgetExceeded",
    "TaskNotApproved",
    "ProtocolError",
    "RoundAborted",
    "SecurityError",
    "AuthError",
    "parse_choice",
]


def parse_choice(cls, value, what: str, error: type[InsituError] = ConfigError, *, choices: str | None = None):
    """``cls(value)`` for an enum ``cls``, or ``error`` naming ``what``, the value and the choices.

    The one place where a name given by a user or a peer becomes a member of a closed set.
    ``choices`` words the alternatives where the members alone say too little (``dirichlet:ALPHA``);
    a value from a peer is shown shortened, so a hostile one cannot flood a log."""
    if isinstance(value, cls):
        return value
    try:
        return cls(value)
    except ValueError:
        shown = repr(value)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        alternatives = choices if choices is not None else [m.value for m in cls]
        raise error(f"{what}: unknown value {shown}; choose one of {alternatives}") from None
