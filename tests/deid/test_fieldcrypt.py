"""AES-GCM field encryption: round trip, fixed-length tokens, key ids, rotation, and a SecurityError for every attack."""
from __future__ import annotations

import os

import pandas as pd
import pytest

from insitu.deid import FieldKeyring, decrypt_frame, rotate_frame
from insitu.deid.fieldcrypt import (decrypt_values, encrypt_frame, encrypt_values, encrypted_columns, key_ids_in_use,
                                    padded_sizes, token_chars, token_lengths, unpadded_tokens)
from insitu.errors import ConfigError, DataError, SecurityError

ROWS = ["p1", "p2", "p3", "p4"]
VALUES = ["I10", None, 42, "C50 – café"]


def test_round_trip_keeps_values_and_types():
    ring = FieldKeyring.generate()
    tokens = encrypt_values(VALUES, "diagnosis", ROWS, ring)
    assert all(t.startswith("gcm2.k1.") for t in tokens)
    assert len(set(encrypt_values(["I10", "I10"], "diagnosis", ["p1", "p1"], ring))) == 2  # random nonces
    assert decrypt_values(tokens, "diagnosis", ROWS, ring) == VALUES


def test_wrong_key_is_a_security_error():
    tokens = encrypt_values(VALUES, "diagnosis", ROWS, FieldKeyring.generate())
    with pytest.raises(SecurityError, match="authentication failed for key id 'k1'"):
        decrypt_values(tokens, "diagnosis", ROWS, FieldKeyring.generate())


def test_tampered_token_is_a_security_error():
    ring = FieldKeyring.generate()
    tokens = encrypt_values(VALUES, "diagnosis", ROWS, ring)
    t = tokens[0]
    flipped = t[:-3] + ("A" if t[-3] != "A" else "B") + t[-2:]
    with pytest.raises(SecurityError, match="row p1"):
        decrypt_values([flipped], "diagnosis", ["p1"], ring)
    with pytest.raises(SecurityError, match="not an encrypted field token"):
        decrypt_values(["I10"], "diagnosis", ["p1"], ring)


def test_value_moved_to_another_row_or_column_fails():
    ring = FieldKeyring.generate()
    tokens = encrypt_values(VALUES, "diagnosis", ROWS, ring)
    with pytest.raises(SecurityError, match="moved"):
        decrypt_values([tokens[0]], "diagnosis", ["p2"], ring)  # p1's diagnosis pasted on p2
    with pytest.raises(SecurityError, match="moved"):
        decrypt_values([tokens[0]], "medication", ["p1"], ring)


def test_rotation_re_encrypts_to_the_new_key_id(tmp_path):
    ring = FieldKeyring.generate("k1")
    frame = pd.DataFrame({"pid": ROWS, "diagnosis": VALUES})
    enc = encrypt_frame(frame, ["diagnosis"], "pid", ring)
    new = ring.rotated("k2")
    rotated = rotate_frame(enc, ["diagnosis"], "pid", new)
    assert key_ids_in_use(rotated, ["diagnosis"]) == {"k2"}
    assert decrypt_frame(rotated, ["diagnosis"], "pid", new)["diagnosis"].tolist() == VALUES
    retired = new.retire("k1")
    assert decrypt_frame(rotated, ["diagnosis"], "pid", retired)["diagnosis"].tolist() == VALUES
    with pytest.raises(SecurityError, match="key id 'k1', which this keyring does not hold"):
        decrypt_frame(enc, ["diagnosis"], "pid", retired)
    with pytest.raises(ConfigError, match="already exists"):
        new.rotated("k1")
    with pytest.raises(ConfigError, match="active"):
        new.retire("k2")


def test_keyring_file(tmp_path):
    ring = FieldKeyring.generate("site-a-2026")
    path = ring.save(tmp_path / "fields.keyring")
    assert FieldKeyring.load(path) == ring
    os.chmod(path, 0o640)
    with pytest.raises(SecurityError, match="chmod 600"):
        FieldKeyring.load(path)
    os.chmod(path, 0o600)
    path.write_text('{"format": "other"}')
    with pytest.raises(SecurityError, match="not a valid"):
        FieldKeyring.load(path)


def test_padded_tokens_have_one_length_and_round_trip_exactly():
    ring = FieldKeyring.generate()
    values = ["", None, "x" * 16, "é" * 8, 7, 3.25, True, "J45.909"]  # "é" is 2 bytes: 16 bytes exactly
    rows = [f"p{i}" for i in range(len(values))]
    tokens = encrypt_values(values, "diagnosis", rows, ring, max_bytes=16)
    assert len({len(t) for t in tokens}) == 1 and len(tokens[0]) == token_chars(16, "k1")
    assert decrypt_values(tokens, "diagnosis", rows, ring) == values
    assert len(encrypt_values(["I10"], "diagnosis", ["p"], ring, max_bytes=40)[0]) > len(tokens[0])
    with pytest.raises(DataError, match=r"column 'diagnosis': 1 value\(s\) longer .* 16 bytes \(longest 17\)") as exc:
        encrypt_values(["I10", "x" * 17], "diagnosis", ["p1", "p2"], ring, max_bytes=16)
    assert "xxx" not in str(exc.value)
    with pytest.raises(ConfigError, match="max_bytes"):
        encrypt_values(["I10"], "diagnosis", ["p1"], ring, max_bytes=70_000)


def test_legacy_unpadded_tokens_decrypt_and_rotate_to_padded_ones():
    ring = FieldKeyring.generate("k1")
    frame = pd.DataFrame({"pid": ROWS, "diagnosis": VALUES})
    old = frame.assign(diagnosis=unpadded_tokens(VALUES, "diagnosis", ROWS, ring))
    assert old["diagnosis"].str.startswith("gcm1.k1.").all() and token_lengths(old, ["diagnosis"])["diagnosis"][1:]
    assert encrypted_columns(old) == ["diagnosis"]
    assert decrypt_frame(old, ["diagnosis"], "pid", ring)["diagnosis"].tolist() == VALUES
    new = ring.rotated("k2")
    rotated = rotate_frame(old, ["diagnosis"], "pid", new)
    assert rotated["diagnosis"].str.startswith("gcm2.k2.").all() and len(token_lengths(rotated, ["diagnosis"])["diagnosis"]) == 1
    assert padded_sizes(rotated, ["diagnosis"]) == {"diagnosis": len("C50 – café".encode())}  # its longest value
    assert decrypt_frame(rotated, ["diagnosis"], "pid", new)["diagnosis"].tolist() == VALUES
    # a padded column keeps its size through rotation
    again = rotate_frame(rotated, ["diagnosis"], "pid", new.rotated("k3"))
    assert token_lengths(again, ["diagnosis"]) == {"diagnosis": [len(rotated["diagnosis"][0])]}
    # relabelling a legacy token as padded (or back) fails authentication: the format is bound in the AAD
    t = old["diagnosis"][0]
    with pytest.raises(SecurityError, match="authentication failed"):
        decrypt_values(["gcm2" + t[4:]], "diagnosis", ["p1"], ring)
