"""Ed25519 signing keys for audit-log writers.

Each component that writes to an audit log (a site, the gateway, the coordinator, the DP ledger)
holds its own Ed25519 private key; the privacy officer who verifies the log holds only the public
keys.  A key directory holds ``<writer>.key`` (PKCS#8 PEM, mode 0600) and ``<writer>.pub``
(SubjectPublicKeyInfo PEM); ``insitu audit verify --keys DIR`` reads every ``*.pub`` in it.

Private keys are refused when the file is readable by group or others: a signing key anyone on the
host can read makes every signature in the log meaningless.

A log trusts only the keys pinned in its signed genesis (and in the owner's ``audit.writers``
entries): a ``.pub`` dropped into the verifier's directory is ignored unless the log pins it, and
the verifier must hold the owner's ``.pub``.  Rotating a writer's key: create a key under a new
writer name (``site-a-2027``), have the log's owner pin it (``insitu audit add-writer``), then
switch.  Old entries still verify with the old pinned key.
"""
from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from insitu.errors import ConfigError, SecurityError

_WRITER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_writer_name(writer: str) -> str:
    """Writer names become file names and log fields, so they are restricted to a safe alphabet."""
    if not isinstance(writer, str) or not _WRITER_RE.match(writer):
        raise ConfigError(
            f"writer name {writer!r} is not allowed: use 1-64 characters from A-Z a-z 0-9 . _ - "
            "starting with a letter or digit (e.g. 'site-a', 'gateway')"
        )
    return writer


def generate_signing_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def fingerprint(public_key: Ed25519PublicKey) -> str:
    """First 16 hex digits of SHA-256 over the raw public key, for display."""
    import hashlib

    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def save_private_key(key: Ed25519PrivateKey, path: str | Path, *, passphrase: bytes | None = None,
                     overwrite: bool = False) -> Path:
    """Write a PKCS#8 PEM with mode 0600; refuses to replace an existing key unless ``overwrite``."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise ConfigError(f"{path} already exists; refusing to overwrite a signing key (pass overwrite=True)")
    enc = (serialization.BestAvailableEncryption(passphrase) if passphrase
           else serialization.NoEncryption())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, pem)
    finally:
        os.close(fd)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return path


def load_private_key(path: str | Path, *, passphrase: bytes | None = None) -> Ed25519PrivateKey:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"signing key {path} not found; create one with `insitu audit keygen`")
    mode = path.stat().st_mode
    if os.name == "posix" and mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SecurityError(
            f"signing key {path} is accessible by group/others (mode {stat.S_IMODE(mode):o}); "
            f"run `chmod 600 {path}`"
        )
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=passphrase)
    except (ValueError, TypeError) as exc:
        raise SecurityError(f"cannot load signing key {path}: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SecurityError(f"{path} holds a {type(key).__name__}, not an Ed25519 private key")
    return key


def save_public_key(key: Ed25519PublicKey, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(key.public_bytes(serialization.Encoding.PEM,
                                      serialization.PublicFormat.SubjectPublicKeyInfo))
    return path


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    path = Path(path)
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except FileNotFoundError:
        raise ConfigError(f"public key {path} not found") from None
    except ValueError as exc:
        raise SecurityError(f"cannot load public key {path}: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SecurityError(f"{path} holds a {type(key).__name__}, not an Ed25519 public key")
    return key


def write_keypair(directory: str | Path, writer: str, *, overwrite: bool = False) -> tuple[Path, Path]:
    """Create ``<writer>.key`` and ``<writer>.pub`` in ``directory``; returns both paths."""
    check_writer_name(writer)
    directory = Path(directory)
    key = generate_signing_key()
    key_path = save_private_key(key, directory / f"{writer}.key", overwrite=overwrite)
    pub_path = save_public_key(key.public_key(), directory / f"{writer}.pub")
    return key_path, pub_path


def load_public_keys(directory: str | Path) -> dict[str, Ed25519PublicKey]:
    """Every ``<writer>.pub`` in ``directory``, keyed by writer name."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ConfigError(f"key directory {directory} does not exist")
    keys = {p.stem: load_public_key(p) for p in sorted(directory.glob("*.pub"))
            if _WRITER_RE.match(p.stem)}
    if not keys:
        raise ConfigError(f"no <writer>.pub files in {directory}; verification needs the writers' public keys")
    return keys


__all__ = [
    "check_writer_name",
    "fingerprint",
    "generate_signing_key",
    "load_private_key",
    "load_public_key",
    "load_public_keys",
    "save_private_key",
    "save_public_key",
    "write_keypair",
]
