"""Bad policies and schemas are refused before any record is read, naming what is wrong."""
from __future__ import annotations

import copy

import pytest

from insitu.data.sources import RecordSchema
from insitu.deid import DeidPolicy
from insitu.deid.policy import IdentifierAction
from insitu.errors import ConfigError

from .helpers import POLICY, SCHEMA


def _resolve(policy: dict, schema: dict = SCHEMA) -> DeidPolicy:
    return DeidPolicy.from_dict(policy).resolve(RecordSchema.from_dict(schema))


def _with(path: list[str], value) -> dict:
    p = copy.deepcopy(POLICY)
    d = p
    for key in path[:-1]:
        d = d.setdefault(key, {})
    if value is None:
        del d[path[-1]]
    else:
        d[path[-1]] = value
    return p


def test_policy_naming_unknown_columns():
    with pytest.raises(ConfigError, match=r"\['postcode'\] are not in the schema"):
        _resolve(_with(["generalize", "postcode"], {"hierarchy": "zip_prefix"}))


def test_policy_acting_against_a_column_role():
    with pytest.raises(ConfigError, match=r"\[identifiers\] lists \['age'\]"):
        _resolve(_with(["identifiers", "age"], "drop"))


def test_quasi_identifier_without_hierarchy():
    with pytest.raises(ConfigError, match=r"\['sex'\] have no \[generalize"):
        _resolve(_with(["generalize", "sex"], None))


@pytest.mark.parametrize("spec, match", [
    ({"hierarchy": "age_band", "levels": [10, 5]}, "increasing"),
    ({"hierarchy": "age_band", "levels": ["*", 5]}, "only be the last"),
    ({"hierarchy": "zip_prefix", "levels": [5]}, "at most 3"),
    ({"hierarchy": "postcode"}, "unknown"),
    ({"hierarchy": "date"}, "does not fit"),
])
def test_bad_hierarchies(spec, match):
    with pytest.raises(ConfigError, match=match):
        _resolve(_with(["generalize", "age"], spec))


def test_patient_id_must_be_pseudonymized():
    with pytest.raises(ConfigError, match="must be a direct identifier"):
        _resolve(_with(["identifiers", "mrn"], "drop"))
    with pytest.raises(ConfigError, match="patient_id is not set"):
        _resolve(_with(["deid", "patient_id"], None))


@pytest.mark.parametrize("key, value", [("k", 0), ("l", -1), ("max_suppression", 1.5), ("date_shift_days", -3)])
def test_bad_numbers(key, value):
    with pytest.raises(ConfigError, match=key):
        DeidPolicy.from_dict(_with(["deid", key], value))


def test_secure_defaults_fill_unlisted_columns():
    p = _resolve(_with(["identifiers"], {"mrn": "pseudonymize"}) | {"sensitive": {}})
    assert p.identifiers["name"] is IdentifierAction.DROP
    assert [(s.column, s.encrypt, s.diversity) for s in p.sensitive] == [("diagnosis", True, True)]


def test_bad_schemas():
    bad = copy.deepcopy(SCHEMA)
    bad["columns"]["age"]["role"] = "quasi"
    with pytest.raises(ConfigError, match="age.*role.*'quasi'"):
        RecordSchema.from_dict(bad)
    bad = copy.deepcopy(SCHEMA)
    bad["columns"]["age"]["typ"] = "integer"
    with pytest.raises(ConfigError, match="unknown key"):
        RecordSchema.from_dict(bad)
    bad = copy.deepcopy(SCHEMA)
    bad["columns"]["chol"]["feature"] = "target"
    with pytest.raises(ConfigError, match="feature name"):
        RecordSchema.from_dict(bad)


def test_public_namespaces():
    import insitu.data.sources as sources
    import insitu.deid as deid

    for mod in (deid, sources):
        public = {n for n in dir(mod) if not n.startswith("_") and not isinstance(getattr(mod, n), type(mod))}
        assert set(mod.__all__) <= public
        assert all(hasattr(mod, n) for n in mod.__all__)
    assert {"deidentify", "DeidPolicy", "FieldKeyring", "assess"} <= set(deid.__all__)
