"""De-identification of site records before training: keyed pseudonyms, generalization to
k-anonymity and l-diversity, per-patient date shifts (optionally coarsened), AES-GCM field
encryption at rest with fixed-length tokens, and releases in a keyed random row order.

    from insitu.data.sources import RecordSchema, read_records
    from insitu.deid import DeidPolicy, deidentify, FieldKeyring, load_site_secret

    schema = RecordSchema.from_toml("schema.toml")
    result = deidentify(read_records("visits.csv", schema), schema, DeidPolicy.from_toml("deid.toml"),
                        load_site_secret("site.secret"), keyring=FieldKeyring.load("fields.keyring"))
"""
from insitu.deid.engine import DeidReport, DeidResult, assess, deidentify
from insitu.deid.fieldcrypt import FieldKeyring, decrypt_frame, rotate_frame
from insitu.deid.kanon import RiskReport
from insitu.deid.policy import DeidPolicy, IdentifierAction
from insitu.deid.pseudonym import Pseudonymizer, generate_site_secret, load_site_secret
from insitu.deid.release import DateCoarsening

__all__ = [
    "DateCoarsening",
    "DeidPolicy",
    "DeidReport",
    "DeidResult",
    "FieldKeyring",
    "IdentifierAction",
    "Pseudonymizer",
    "RiskReport",
    "assess",
    "decrypt_frame",
    "deidentify",
    "generate_site_secret",
    "load_site_secret",
    "rotate_frame",
]
