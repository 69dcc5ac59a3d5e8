"""The site's border: every field of every message a site sends is declared, with its protection.

A field that leaves a site is one of three kinds (:class:`Release`):

* ``PROTECTED`` — inside the masked (secure aggregation) or encrypted (homomorphic) vector: the
  coordinator learns it only summed over the round's sites;
* ``DP`` — a differentially private release charged to the site's privacy ledger before it is sent;
* ``PUBLIC`` — public because the approved plan says so (its content hash covers the setting that
  releases it), e.g. the update itself under ``protection = plain``, or the ε the site spent,
  which follows from the public plan and the record count the site announced when it connected.

:class:`Egress` is the declaration of one site for one plan.  :meth:`Egress.check` runs on every
reply just before it leaves; a field not declared for that message kind is refused there (the
site sends an error instead), so a feature cannot add a side channel by accident.  Training
metrics are filtered to the declared ones when the reply is built.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Mapping

from insitu.errors import ProtocolError
from insitu.federation.messages import Message, MessageKind


class Release(str, enum.Enum):
    PROTECTED = "protected"  # inside the masked or encrypted sum
    DP = "dp-release"  # noised and charged to the site's ledger
    PUBLIC = "public"  # public by the approved plan


@dataclass(frozen=True)
class Declared:
    """The meta keys and tensor names one kind of reply may carry, each with its protection."""

    meta: Mapping[str, Release] = field(default_factory=dict)
    tensors: Mapping[str, Release] = field(default_factory=dict)

    def merged(self, other: "Declared") -> "Declared":
        return Declared({**self.meta, **other.meta}, {**self.tensors, **other.tensors})


#: what every reply may carry whatever the plan: an error reply names what it refused and why
ERROR_REPLY = Declared({"reason": Release.PUBLIC, "code": Release.PUBLIC, "to": Release.PUBLIC})
#: an evaluation answer of an approved model on the site's own split: loss, correct, n, accuracy, and
#: what worst-site, class-balanced and AUC figures need: the split's count and correct count per
#: class, and (binary tasks) its AUROC; when the request asks for it (validation split only, binary
#: tasks: a deployed ICU job, once, for the model it publishes) the risk threshold maximising Score 1
#: there (one number, or null without a positive record) (insitu.learn.clinical.pooled_threshold)
EVALUATE_REPLY = Declared({k: Release.PUBLIC for k in ("loss", "correct", "n", "accuracy", "n_by_class", "correct_by_class", "auc", "threshold")})
#: a personalisation answer (insitu.federation.personalize): the site's fine-tuned model's scores on its own
#: test split and which checkpoint its own validation split chose; never the fine-tuned parameters
PERSONALIZE_REPLY = Declared({k: Release.PUBLIC for k in (
    "n", "accuracy", "best_step", "steps", "val_metric", "val_start", "val_best",  # every task
    "auroc", "auprc", "score1", "sensitivity", "ppv", "threshold", "threshold_source", "accuracy_at_0.5", "positives")})  # binary


@dataclass(frozen=True)
class Egress:
    """One site's declaration for one plan: reply kind → declared fields, and the training metrics
    that may travel in a TRAIN_REPLY's ``metrics`` object."""

    replies: Mapping[MessageKind, Declared]
    metrics: Mapping[str, Release] = field(default_factory=dict)

    def allowed_metrics(self, info: Mapping[str, object]) -> dict[str, object]:
        """The declared metrics out of everything the trainer and stages reported."""
        return {k: v for k, v in info.items() if k in self.metrics and isinstance(v, (int, float, str, bool))}

    def check(self, reply: Message) -> Message:
        """``reply`` if every field is declared for its kind; a ProtocolError naming the field otherwise."""
        if reply.kind is MessageKind.ERROR:
            declared = ERROR_REPLY
        else:
            declared = self.replies.get(reply.kind)
            if declared is None:
                raise ProtocolError(f"site would send a {reply.kind.value} message, which its plan does not declare; refused")
        extra = sorted(set(reply.meta) - set(declared.meta))
        if extra:
            raise ProtocolError(f"site refuses to send undeclared field(s) {extra} in {reply.kind.value}")
        prefixes = tuple(n[:-1] for n in declared.tensors if n.endswith("*"))
        extra = sorted(n for n in set(reply.tensors) - set(declared.tensors) if not (prefixes and n.startswith(prefixes)))
        if extra:
            raise ProtocolError(f"site refuses to send undeclared tensor(s) {extra} in {reply.kind.value}")
        metrics = reply.meta.get("metrics")
        if metrics is not None:
            bad = sorted(set(metrics) - set(self.metrics)) if isinstance(metrics, Mapping) else ["<not an object>"]
            if bad:
                raise ProtocolError(f"site refuses to send undeclared metric(s) {bad}")
        return reply

    def table(self) -> dict[str, dict[str, str]]:
        """Human-readable declaration: message kind → field → protection (README, reports)."""
        out = {k.value: {**{f"meta.{n}": r.value for n, r in d.meta.items()}, **{f"tensor.{n}": r.value for n, r in d.tensors.items()}}
               for k, d in self.replies.items()}
        out["train_reply.metrics"] = {k: v.value for k, v in self.metrics.items()}
        return out


__all__ = ["Release", "Declared", "Egress", "ERROR_REPLY", "EVALUATE_REPLY", "PERSONALIZE_REPLY"]
