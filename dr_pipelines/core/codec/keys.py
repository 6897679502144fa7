"""age keys: recipients (public, on the backup host), identities (private, only to restore), and their
fingerprints (which key opens a backup, never a key)."""

from __future__ import annotations

import hashlib

import pyrage

from dr_pipelines.core.config import (
    ConfigError,
    EncryptionConfig,
)


def age_recipients(encryption: EncryptionConfig) -> list:
    try:
        return [pyrage.x25519.Recipient.from_str(r) for r in encryption.recipients]
    except Exception as e:
        raise ValueError(f"encryption.recipients: not a valid age public key ({e})") from None


def recipient_fingerprints(encryption: EncryptionConfig) -> list[str]:
    """Short fingerprints of the recipients for manifests: which key can open a backup, never a key."""
    return [hashlib.sha256(r.encode()).hexdigest()[:16] for r in encryption.recipients]


def load_identities(config) -> list:
    """The age identities that decrypt this repository (only restores need them)."""
    enc = config.encryption
    path = enc.identity_path()
    if path is None:
        var = enc.identity_file_env or "DR_AGE_IDENTITY_FILE"
        raise ConfigError(
            f"this backup is encrypted with age; set {var} to the identity file (encryption.identity_file_env) "
            f"whose public key has fingerprint {', '.join(recipient_fingerprints(enc)) or '(see the manifest)'}"
        )
    try:
        lines = [ln.strip() for ln in path.read_text().splitlines()]
    except OSError as e:
        raise ConfigError(f"cannot read the age identity file {path}: {e.strerror}") from None
    keys = [ln for ln in lines if ln.startswith("AGE-SECRET-KEY-")]
    if not keys:
        raise ConfigError(f"{path} holds no age identity (AGE-SECRET-KEY-... line)")
    try:
        return [pyrage.x25519.Identity.from_str(k) for k in keys]
    except Exception:
        raise ConfigError(f"{path}: not a valid age identity") from None


# --------------------------------------------------------------------------- identities


def identity_fingerprints(identities: list) -> list[str]:
    return [hashlib.sha256(str(i.to_public()).encode()).hexdigest()[:16] for i in identities]
