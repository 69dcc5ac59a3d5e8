"""Keyed pseudonyms: stable per key, different across keys, and immune to the dictionary attack
that reverses an unkeyed SHA-256 of a patient ID."""
from __future__ import annotations

import hashlib
import os

import numpy as np
import pandas as pd
import pytest

from insitu.data.sources import RecordSchema, conform
from insitu.deid import DeidPolicy, Pseudonymizer, deidentify, generate_site_secret, load_site_secret
from insitu.deid.pseudonym import unkeyed_sha256
from insitu.errors import ConfigError, SecurityError

from .helpers import POLICY, SCHEMA, visits

ID_SPACE = [f"{i:05d}" for i in range(100_000)]  # a 5-digit MRN space; real MRNs (10^7) take seconds more


def _dictionary_attack(pseudonyms: pd.Series) -> dict[str, str]:
    """What anyone holding the table can do: hash the whole ID space once and look pseudonyms up."""
    table = {hashlib.sha256(i.encode()).hexdigest(): i for i in ID_SPACE}
    return {p: table[p] for p in pseudonyms if p in table}


def test_unkeyed_sha256_is_reversed_by_hashing_the_id_space():
    rng = np.random.default_rng(1)
    ids = pd.Series(rng.choice(ID_SPACE, size=300, replace=False))
    recovered = _dictionary_attack(unkeyed_sha256(ids))
    assert len(recovered) == 300  # every patient re-identified
    assert set(recovered.values()) == set(ids)


def test_keyed_pseudonyms_defeat_the_same_attack():
    rng = np.random.default_rng(1)
    ids = pd.Series(rng.choice(ID_SPACE, size=300, replace=False))
    keyed = Pseudonymizer(os.urandom(32)).pseudonyms(ids)
    assert _dictionary_attack(keyed) == {}
    # and a guessed key gives an unrelated table
    assert not set(Pseudonymizer(b"\x00" * 32).pseudonyms(ids)) & set(keyed)


def test_pseudonyms_stable_per_key_and_different_across_keys():
    ids = pd.Series(["123", "456", "123", None, " 456 "], dtype="string")
    secret = os.urandom(32)
    a1, a2 = Pseudonymizer(secret).pseudonyms(ids), Pseudonymizer(secret).pseudonyms(ids)
    b = Pseudonymizer(os.urandom(32)).pseudonyms(ids)
    assert a1.equals(a2)
    assert a1[0] == a1[2] and a1[1] == a1[4] and a1[0] != a1[1]  # surrounding spaces ignored
    assert pd.isna(a1[3])
    assert set(a1.dropna()).isdisjoint(set(b.dropna()))
    assert a1[0] == Pseudonymizer(secret).pseudonym("123") and len(a1[0]) == 32


def test_date_shift_keeps_intervals_within_a_patient(tmp_path):
    schema = RecordSchema.from_dict(SCHEMA)
    raw = conform(visits(600, seed=3), schema)
    policy = DeidPolicy.from_dict(POLICY)
    secret = bytes(range(32))  # fixed: the run is deterministic
    result = deidentify(raw, schema, policy, secret, encrypt=False)
    assert result.report.suppressed == 0
    raw = raw.iloc[result.source_rows].reset_index(drop=True)  # the release is in keyed random order
    out = result.frame
    assert (out["mrn"] == Pseudonymizer(secret).pseudonyms(raw["mrn"])).all()
    # "admitted" is a feature date: shifted, not generalized
    shift = (out["admitted"] - raw["admitted"]).dt.days
    assert (shift.groupby(raw["mrn"]).nunique() == 1).all()  # one offset per patient: intervals kept
    offsets = shift.groupby(raw["mrn"]).first()
    assert offsets.abs().between(1, 180).all() and offsets.nunique() > 10


def test_site_secret_file(tmp_path):
    p = generate_site_secret(tmp_path / "site.secret")
    assert len(load_site_secret(p)) == 32
    with pytest.raises(ConfigError, match="already exists"):
        generate_site_secret(p)
    os.chmod(p, 0o644)
    with pytest.raises(SecurityError, match="chmod 600"):
        load_site_secret(p)
    short = tmp_path / "short.secret"
    short.write_text("abcd")
    os.chmod(short, 0o600)
    with pytest.raises(SecurityError, match="at least 32"):
        load_site_secret(short)
