"""The gateway's one policy decision point: role table first, attribute rules on top, deny overrides.

Every endpoint asks :meth:`PolicyDecisionPoint.decide` with a :class:`AccessRequest`
(subject, action, resource and environment attributes) and gets back a
:class:`Decision` that names the rule which settled it.  Rules are data, not
code: a target (roles × actions × resource types) and conditions over
attributes, with operators taken from a fixed registry — nothing in a config
file or a request chooses which code runs.

Combining is *deny-overrides*: one applicable deny rule wins over any number of
permits, and with no applicable permit the answer is ``default-deny``.  The
default role table (:data:`DEFAULT_RULES`) therefore cannot be widened past its
deny rules by an administrator: an ``ai-model`` never reads a record, a nurse
never writes one, whatever rules are added.

Missing attributes fail closed: a deny rule whose condition cannot be evaluated
applies; a permit rule whose condition cannot be evaluated does not.
"""
from __future__ import annotations

import datetime as dt
import enum
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from insitu.errors import ConfigError, parse_choice


class Role(str, enum.Enum):
    DOCTOR = "doctor"
    NURSE = "nurse"
    AGENT = "ai-model"


class Action(str, enum.Enum):
    READ = "read"
    UPDATE = "update"
    INFER = "infer"


class ResourceType(str, enum.Enum):
    RECORD = "record"  # the full medical record
    NURSING_VIEW = "nursing_view"  # the de-identified nursing subset of a record
    MODEL = "model"  # the federated model: its card (read) and predictions (infer)


class Effect(str, enum.Enum):
    PERMIT = "permit"
    DENY = "deny"


class _Missing(Exception):
    """An attribute a condition refers to is absent from the request."""


_SHIFT_RE = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-3]):([0-5]\d)$")


def parse_shift(text: str) -> tuple[dt.time, dt.time]:
    """``"22:00-06:00"`` → (start, end); a shift may wrap past midnight."""
    m = _SHIFT_RE.match(str(text))
    if not m:
        raise ConfigError(f"shift {text!r} must look like HH:MM-HH:MM, e.g. 07:00-19:00 or 22:00-06:00")
    a, b, c, d = (int(g) for g in m.groups())
    return dt.time(a, b), dt.time(c, d)


def _within(when: Any, shift: Any) -> bool:
    if not isinstance(when, (dt.datetime, dt.time)):
        raise _Missing(f"{when!r} is not a time")
    t = when.time() if isinstance(when, dt.datetime) else when
    t = t.replace(tzinfo=None)
    try:
        start, end = parse_shift(shift)
    except ConfigError:
        raise _Missing(f"{shift!r} is not a shift") from None
    if start <= end:
        return start <= t < end
    return t >= start or t < end  # wraps midnight


def _in(a: Any, b: Any) -> bool:
    if not isinstance(b, (list, tuple, set, frozenset)):
        raise _Missing(f"{b!r} is not a list")
    return a in b


class Op(str, enum.Enum):
    EQ = "eq"
    NE = "ne"
    IN = "in"
    NOT_IN = "not_in"
    WITHIN = "within"  # left: a time; right: a shift "HH:MM-HH:MM"
    NOT_WITHIN = "not_within"


OPS: dict[Op, Callable[[Any, Any], bool]] = {
    Op.EQ: lambda a, b: a == b,
    Op.NE: lambda a, b: a != b,
    Op.IN: _in,
    Op.NOT_IN: lambda a, b: not _in(a, b),
    Op.WITHIN: _within,
    Op.NOT_WITHIN: lambda a, b: not _within(a, b),
}

_ROOTS = ("subject", "resource", "environment")
_PATH_RE = re.compile(r"^(subject|resource|environment)\.[a-z_][a-z0-9_]{0,40}$")


def _check_path(path: str, rule: str) -> str:
    if not isinstance(path, str) or not _PATH_RE.match(path):
        raise ConfigError(f"rule {rule!r}: attribute {path!r} must be subject.X, resource.X or environment.X")
    return path


@dataclass(frozen=True)
class Condition:
    """``left OP right`` where left is an attribute path and right an attribute path or a literal."""

    op: Op
    left: str
    right: str | None = None
    value: Any = None

    def holds(self, attrs: Mapping[str, Mapping[str, Any]]) -> bool:
        a = _lookup(attrs, self.left)
        b = _lookup(attrs, self.right) if self.right is not None else self.value
        return OPS[self.op](a, b)


def _lookup(attrs: Mapping[str, Mapping[str, Any]], path: str) -> Any:
    root, key = path.split(".", 1)
    value = attrs.get(root, {}).get(key)
    if value is None:
        raise _Missing(path)
    return value


@dataclass(frozen=True)
class Rule:
    """A target (empty = any) plus conditions that must all hold for the rule to apply."""

    name: str
    effect: Effect
    roles: frozenset[Role] = frozenset()
    actions: frozenset[Action] = frozenset()
    resources: frozenset[ResourceType] = frozenset()
    conditions: tuple[Condition, ...] = ()
    description: str = ""

    def targets(self, role: Role, action: Action, resource: ResourceType) -> bool:
        return (
            (not self.roles or role in self.roles)
            and (not self.actions or action in self.actions)
            and (not self.resources or resource in self.resources)
        )

    def applies(self, attrs: Mapping[str, Mapping[str, Any]]) -> bool:
        try:
            return all(c.holds(attrs) for c in self.conditions)
        except _Missing:
            return self.effect is Effect.DENY  # fail closed


@dataclass(frozen=True)
class AccessRequest:
    role: Role
    action: Action
    resource_type: ResourceType
    subject: Mapping[str, Any] = field(default_factory=dict)
    resource: Mapping[str, Any] = field(default_factory=dict)
    environment: Mapping[str, Any] = field(default_factory=dict)

    def attributes(self) -> dict[str, dict[str, Any]]:
        return {
            "subject": {**self.subject, "role": self.role.value},
            "resource": {**self.resource, "type": self.resource_type.value},
            "environment": dict(self.environment),
        }


@dataclass(frozen=True)
class Decision:
    allowed: bool
    rule: str
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return {"decision": "permit" if self.allowed else "deny", "rule": self.rule, "reason": self.reason}


def _rule(name: str, effect: Effect, roles=(), actions=(), resources=(), description: str = "") -> Rule:
    return Rule(name, effect, frozenset(roles), frozenset(actions), frozenset(resources), (), description)


R, A, T, P, D = Role, Action, ResourceType, Effect.PERMIT, Effect.DENY

#: The role table of the issue.  Deny rules make its limits non-negotiable for added rules.
DEFAULT_RULES: tuple[Rule, ...] = (
    _rule("doctor-records", P, [R.DOCTOR], [A.READ, A.UPDATE], [T.RECORD], "doctors read and update full records"),
    _rule("doctor-nursing-view", P, [R.DOCTOR], [A.READ], [T.NURSING_VIEW], "doctors may read the nursing view"),
    _rule("nurse-nursing-view", P, [R.NURSE], [A.READ], [T.NURSING_VIEW], "nurses read the de-identified nursing subset"),
    _rule("agent-inference", P, [R.AGENT], [A.INFER], [T.MODEL], "AI agents run inference on anonymized feature vectors"),
    _rule("model-card-public", P, [], [A.READ], [T.MODEL], "every authenticated role may read the model card"),
    _rule("agent-never-records", D, [R.AGENT], [], [T.RECORD, T.NURSING_VIEW], "an AI agent never sees a record"),
    _rule("nurse-read-only", D, [R.NURSE], [A.UPDATE], [], "nurses may not change records"),
    _rule("nurse-no-full-record", D, [R.NURSE], [], [T.RECORD], "nurses see only the nursing subset, not the full record"),
)

DEFAULT_DENY = "default-deny"


class PolicyDecisionPoint:
    """Evaluates the default table plus administrator rules, deny-overrides."""

    def __init__(self, extra_rules: Sequence[Rule] = ()):
        rules = list(DEFAULT_RULES) + list(extra_rules)
        names = [r.name for r in rules]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"policy rule names must be unique; repeated: {dupes}")
        self.rules: tuple[Rule, ...] = tuple(rules)

    def decide(self, req: AccessRequest) -> Decision:
        attrs = req.attributes()
        permit: Rule | None = None
        for rule in self.rules:
            if not rule.targets(req.role, req.action, req.resource_type) or not rule.applies(attrs):
                continue
            if rule.effect is Effect.DENY:
                return Decision(False, rule.name, rule.description or f"rule {rule.name} denies this")
            permit = permit or rule
        if permit is not None:
            return Decision(True, permit.name, permit.description or f"rule {permit.name} permits this")
        return Decision(
            False, DEFAULT_DENY,
            f"no rule permits role {req.role.value} to {req.action.value} a {req.resource_type.value}",
        )


def _enums(values: Any, kind: type[enum.Enum], rule: str, key: str) -> frozenset:
    if values is None:
        return frozenset()
    if isinstance(values, str):
        values = [values]
    return frozenset(parse_choice(kind, v, f"rule {rule!r}: {key}") for v in values)


def rule_from_dict(d: Mapping[str, Any]) -> Rule:
    """One ``[[policy.rules]]`` table of gateway.toml → a :class:`Rule` (validated, nothing evaluated)."""
    known = {"name", "effect", "roles", "actions", "resources", "conditions", "description"}
    name = d.get("name")
    if not isinstance(name, str) or not re.match(r"^[a-z0-9][a-z0-9-]{0,63}$", name):
        raise ConfigError(f"every policy rule needs a name of lower-case letters, digits and '-'; got {name!r}")
    unknown = set(d) - known
    if unknown:
        raise ConfigError(f"rule {name!r}: unknown keys {sorted(unknown)}; allowed: {sorted(known)}")
    effect = parse_choice(Effect, d.get("effect"), f"rule {name!r}: effect")
    conds = []
    for c in d.get("conditions", []):
        if not isinstance(c, Mapping) or set(c) - {"op", "left", "right", "value"}:
            raise ConfigError(f"rule {name!r}: a condition is a table with op, left and right (attribute) or value (literal)")
        op = parse_choice(Op, c.get("op"), f"rule {name!r}: op")
        if ("right" in c) == ("value" in c):
            raise ConfigError(f"rule {name!r}: a condition needs exactly one of right (an attribute) or value (a literal)")
        right = _check_path(c["right"], name) if "right" in c else None
        value = c.get("value")
        if op in (Op.WITHIN, Op.NOT_WITHIN) and value is not None:
            parse_shift(value)
        conds.append(Condition(op, _check_path(c.get("left"), name), right, value))
    return Rule(
        name=name,
        effect=effect,
        roles=_enums(d.get("roles"), Role, name, "role"),
        actions=_enums(d.get("actions"), Action, name, "action"),
        resources=_enums(d.get("resources"), ResourceType, name, "resource"),
        conditions=tuple(conds),
        description=str(d.get("description", "")),
    )


__all__ = [
    "Role", "Action", "ResourceType", "Effect", "Op", "Condition", "Rule", "AccessRequest", "Decision",
    "PolicyDecisionPoint", "DEFAULT_RULES", "DEFAULT_DENY", "rule_from_dict", "parse_shift",
]
