"""The dedup key: chunk ids are HMAC-SHA256 under it, so an id reveals only that two chunks are
equal, never what they hold (a plain hash would let anyone with the repository test for a known file).

The backup host keeps it in its state directory; the repository keeps it encrypted to the
recipients (`_files/keys/<key id>.age`), so a restoring host, or a rebuilt backup host that has the
identity, gets it back. A backup host that lost it and has no identity makes a new key: its chunks
get new ids (stored again once, never confused with the old ones, whose key id differs).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import pyrage

from dr_pipelines.core.codec.keys import age_recipients
from dr_pipelines.core.config import DrConfig
from dr_pipelines.core.files.format import ROOT, key_object
from dr_pipelines.core.log import Log
from dr_pipelines.core.storage.base import Location, LocationError, ObjectNotFound


@dataclass(frozen=True)
class DedupKey:
    key_id: str
    secret: bytes

    def chunk_id(self, data) -> bytes:
        h = hmac.new(self.secret, digestmod=hashlib.sha256)
        h.update(data)  # unlike hmac.digest, update releases the GIL: chunks are hashed in parallel
        return h.digest()


def _key_id(secret: bytes) -> str:
    return hashlib.sha256(b"dr-files key id\0" + secret).hexdigest()[:16]


def _parse(text: str) -> DedupKey:
    secret = bytes.fromhex(text.strip())
    return DedupKey(_key_id(secret), secret)


def local_key_path(config: DrConfig) -> Path:
    return config.files.resolved_state_dir(config.base_dir) / "dedup.key"


def recipients_fingerprint(config: DrConfig) -> str:
    if config.encryption.method != "age":
        return "plain"
    return hashlib.sha256("\n".join(sorted(config.encryption.recipients)).encode()).hexdigest()[:12]


def _store_everywhere(config: DrConfig, locations: dict[str, Location], key: DedupKey, log: Log) -> None:
    data = key.secret.hex().encode()
    if config.encryption.method == "age":
        data = pyrage.encrypt(data, age_recipients(config.encryption))
    for name, loc in locations.items():
        try:
            # never overwritten: an existing one is the same key for the same recipients
            loc.create(key_object(key.key_id, recipients_fingerprint(config)), data)
        except LocationError as e:
            log(f"warning: could not store the dedup key on {name}: {e}")


def backup_key(config: DrConfig, locations: dict[str, Location], log: Log) -> DedupKey:
    """The key this host snapshots with: its own, else one recovered from the repository with the
    identity (when this host has it), else a new one."""
    path = local_key_path(config)
    if path.exists():
        key = _parse(path.read_text())
    else:
        recovered = _recover(config, locations)
        if recovered is None and _stored_keys(locations):
            log(
                f"warning: the repository's dedup key is not in {path} (the state directory was lost?) and this host "
                "has no identity to recover it: a new key is made, and everything is stored again once. To avoid "
                f"that, put the key file back, or run one snapshot with the identity set (it recovers the key)"
            )
        key = recovered or DedupKey("", secrets.token_bytes(32))
        key = DedupKey(_key_id(key.secret), key.secret)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(key.secret.hex() + "\n")
            f.flush()
            os.fsync(f.fileno())
        log(f"file snapshots: dedup key {key.key_id} kept in {path} (keep it; it is also in the repository, encrypted)")
    _store_everywhere(config, locations, key, log)
    return key


def _stored_keys(locations: dict[str, Location]) -> bool:
    for loc in locations.values():
        try:
            if any(o.key.endswith(".age") for o in loc.list(f"{ROOT}/keys/")):
                return True
        except LocationError:
            continue
    return False


def _recover(config: DrConfig, locations: dict[str, Location]) -> DedupKey | None:
    if config.encryption.method != "age" or config.encryption.identity_path() is None:
        return None
    try:
        keys = restore_keys(config, locations)
    except Exception:  # an unreadable identity: this host is a backup host, make a new key
        return None
    return max(keys.values(), key=lambda k: k.key_id, default=None)


def restore_keys(config: DrConfig, locations: dict[str, Location]) -> dict[str, DedupKey]:
    """Every dedup key in the repository, decrypted with the identity (restores verify chunk ids)."""
    identities = None
    if config.encryption.method == "age":
        from dr_pipelines.core.codec.keys import load_identities

        identities = load_identities(config)
    keys: dict[str, DedupKey] = {}
    for loc in locations.values():
        try:
            objs = [o.key for o in loc.list(f"{ROOT}/keys/") if o.key.endswith(".age")]
        except LocationError:
            continue
        for obj in objs:
            key_id = obj.rsplit("/", 1)[1].removesuffix(".age").split("-", 1)[0]
            if key_id in keys:
                continue
            try:
                data = loc.get_bytes(obj)
            except (ObjectNotFound, LocationError):
                continue
            if identities is not None:
                try:
                    data = pyrage.decrypt(data, identities)
                except Exception:
                    continue  # another location's copy may be whole
            try:
                key = _parse(data.decode())
            except ValueError:
                continue
            if key.key_id == key_id:
                keys[key_id] = key
    return keys
