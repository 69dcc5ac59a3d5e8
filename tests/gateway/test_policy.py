"""Attribute-based rules on top of the role table: ward, shift (injectable clock), deny-overrides."""
from __future__ import annotations

import datetime as dt
import tomllib
import pytest

from .support import FEATS, T0, make_harness
from insitu.errors import ConfigError
from insitu.gateway.config import GatewayConfig
from insitu.gateway.policy import (
    AccessRequest, Action, DEFAULT_RULES, PolicyDecisionPoint, ResourceType, Role, rule_from_dict,
)

RULES_TOML = """
[policy]
timezone = "Europe/Berlin"

[[policy.rules]]
name = "nurse-own-ward"
effect = "deny"
roles = ["nurse"]
resources = ["nursing_view"]
description = "nurses see only patients of their own ward"
conditions = [{ op = "ne", left = "resource.ward", right = "subject.ward" }]

[[policy.rules]]
name = "nurse-on-shift"
effect = "deny"
roles = ["nurse"]
description = "nurses have access only during their shift"
conditions = [{ op = "not_within", left = "environment.time", right = "subject.shift" }]

[[policy.rules]]
name = "agents-may-read-records"
effect = "permit"
roles = ["ai-model"]
actions = ["read"]
resources = ["record", "nursing_view"]

[[policy.rules]]
name = "doctors-may-predict"
effect = "permit"
roles = ["doctor"]
actions = ["infer"]
resources = ["model"]
"""


@pytest.fixture(scope="module")
def _abac(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("abac")
    cfg = GatewayConfig.from_dict(tomllib.loads(RULES_TOML), base=tmp)
    return make_harness(tmp, rules=cfg.rules, tz="Europe/Berlin")


@pytest.fixture
def abac(_abac):
    _abac.clock.now = T0  # every test starts at the same instant; none writes records
    return _abac


def _nursing(h, pseudonym, **token):
    return h.client.get(f"/nursing/{pseudonym}", headers=h.auth("nurse", **token))


def test_nurse_sees_only_her_ward(abac):
    # 10:00 UTC = 11:00 in Berlin (CET), inside a 07:00-19:00 shift
    day = dict(ward="cardio", shift="07:00-19:00")
    assert _nursing(abac, "cardio-0001", **day).status_code == 200
    r = _nursing(abac, "icu-0002", **day)
    assert r.status_code == 403 and r.json()["rule"] == "nurse-own-ward"
    assert "own ward" in r.json()["reason"]


def test_missing_ward_fails_closed(abac):
    r = _nursing(abac, "cardio-0001", shift="07:00-19:00")  # token without a ward
    assert r.status_code == 403 and r.json()["rule"] == "nurse-own-ward"


@pytest.mark.parametrize("utc,shift,status", [
    ("05:59", "07:00-19:00", 403),  # 06:59 Berlin: before the shift
    ("06:00", "07:00-19:00", 200),  # 07:00 Berlin: shift starts
    ("17:59", "07:00-19:00", 200),
    ("18:00", "07:00-19:00", 403),  # 19:00 Berlin: shift over
    ("01:00", "22:00-06:00", 200),  # night shift wrapping midnight, 02:00 Berlin
    ("21:00", "22:00-06:00", 200),  # 22:00 Berlin
    ("12:00", "22:00-06:00", 403),
])
def test_shift_uses_the_injected_clock_in_local_time(abac, utc, shift, status):
    hh, mm = (int(x) for x in utc.split(":"))
    abac.clock.now = T0.replace(hour=hh, minute=mm)
    tok = abac.issuer.issue("nurse-ann", "nurse", dt.timedelta(hours=1), ward="cardio", shift=shift, now=abac.clock.now)
    r = abac.client.get("/nursing/cardio-0001", headers={"Authorization": f"Bearer {tok}"})
    assert r.status_code == status
    if status == 403:
        assert r.json()["rule"] == "nurse-on-shift"
    last = abac.audit_entries()[-1]
    assert last.details["rule"] == ("nurse-on-shift" if status == 403 else "nurse-nursing-view")


def test_a_token_valid_at_shift_start_stops_working_at_shift_end(abac):
    tok = abac.issuer.issue("nurse-ann", "nurse", dt.timedelta(hours=12), ward="cardio", shift="07:00-19:00", now=abac.clock.now)
    h = {"Authorization": f"Bearer {tok}"}
    assert abac.client.get("/nursing/cardio-0001", headers=h).status_code == 200
    abac.clock.now += dt.timedelta(hours=8)  # 19:00 Berlin
    assert abac.client.get("/nursing/cardio-0001", headers=h).status_code == 403


def test_admin_permit_cannot_override_default_deny(abac):
    r = abac.client.get("/records/cardio-0001", headers=abac.auth("ai-model"))
    assert r.status_code == 403 and r.json()["rule"] == "agent-never-records"
    r = abac.client.get("/nursing/cardio-0001", headers=abac.auth("ai-model"))
    assert r.status_code == 403 and r.json()["rule"] == "agent-never-records"


def test_admin_permit_extends_the_table(abac):
    assert abac.client.post("/predict", json={"features": FEATS}, headers=abac.auth("doctor")).status_code == 200
    assert abac.client.post("/predict", json={"features": FEATS}, headers=abac.auth("nurse", ward="cardio", shift="07:00-19:00")).status_code == 403


def test_deny_overrides_regardless_of_order():
    permit_all = rule_from_dict({"name": "permit-all", "effect": "permit"})
    deny_icu = rule_from_dict({"name": "no-icu", "effect": "deny", "conditions": [{"op": "eq", "left": "resource.ward", "value": "icu"}]})
    for rules in ([permit_all, deny_icu], [deny_icu, permit_all]):
        pdp = PolicyDecisionPoint(rules)
        icu = AccessRequest(Role.DOCTOR, Action.READ, ResourceType.RECORD, resource={"ward": "icu"})
        cardio = AccessRequest(Role.DOCTOR, Action.READ, ResourceType.RECORD, resource={"ward": "cardio"})
        assert pdp.decide(icu).rule == "no-icu" and not pdp.decide(icu).allowed
        assert pdp.decide(cardio).allowed


def test_permit_with_missing_attribute_does_not_apply():
    rule = rule_from_dict({"name": "ward-doctors-infer", "effect": "permit", "roles": ["doctor"], "actions": ["infer"],
                           "conditions": [{"op": "in", "left": "subject.ward", "value": ["cardio"]}]})
    pdp = PolicyDecisionPoint([rule])
    req = AccessRequest(Role.DOCTOR, Action.INFER, ResourceType.MODEL, subject={"ward": None})
    assert pdp.decide(req).rule == "default-deny"
    req = AccessRequest(Role.DOCTOR, Action.INFER, ResourceType.MODEL, subject={"ward": "cardio"})
    assert pdp.decide(req).rule == "ward-doctors-infer"


def test_default_table_is_exactly_the_issue():
    pdp = PolicyDecisionPoint()
    allowed = {
        (role, action, rtype)
        for role in Role for action in Action for rtype in ResourceType
        if pdp.decide(AccessRequest(role, action, rtype)).allowed
    }
    assert allowed == {
        (Role.DOCTOR, Action.READ, ResourceType.RECORD), (Role.DOCTOR, Action.UPDATE, ResourceType.RECORD),
        (Role.DOCTOR, Action.READ, ResourceType.NURSING_VIEW), (Role.NURSE, Action.READ, ResourceType.NURSING_VIEW),
        (Role.AGENT, Action.INFER, ResourceType.MODEL),
        (Role.DOCTOR, Action.READ, ResourceType.MODEL), (Role.NURSE, Action.READ, ResourceType.MODEL),
        (Role.AGENT, Action.READ, ResourceType.MODEL),
    }
    assert len({r.name for r in DEFAULT_RULES}) == len(DEFAULT_RULES)


@pytest.mark.parametrize("rule,msg", [
    ({"name": "x", "effect": "maybe"}, "effect"),
    ({"name": "Bad Name", "effect": "deny"}, "name"),
    ({"name": "x", "effect": "deny", "roles": ["janitor"]}, "role"),
    ({"name": "x", "effect": "deny", "actions": ["delete"]}, "action"),
    ({"name": "x", "effect": "deny", "conditions": [{"op": "regex", "left": "subject.ward", "value": "."}]}, "op"),
    ({"name": "x", "effect": "deny", "conditions": [{"op": "eq", "left": "__class__.mro", "value": 1}]}, "attribute"),
    ({"name": "x", "effect": "deny", "conditions": [{"op": "eq", "left": "subject.ward"}]}, "exactly one"),
    ({"name": "x", "effect": "deny", "conditions": [{"op": "within", "left": "environment.time", "value": "9-5"}]}, "shift"),
    ({"name": "x", "effect": "deny", "when": "true"}, "unknown keys"),
])
def test_bad_rules_are_config_errors(rule, msg):
    with pytest.raises(ConfigError, match=msg):
        rule_from_dict(rule)


def test_duplicate_rule_names_refused():
    with pytest.raises(ConfigError, match="unique"):
        PolicyDecisionPoint([rule_from_dict({"name": "agent-inference", "effect": "permit"})])
