"""The file-snapshot format: where its objects live, what a pack and a snapshot manifest hold.

Layout on every location (beside the databases; `_` cannot start a database name)::

    _files/keys/<key id>-<recipients>.age        the dedup key, encrypted to the recipients (one per set of them)
    _files/packs/<2 hex>/<pack id>.pack[.age]    chunks; the pack id is the SHA-256 of the stored bytes
    _files/sets/<set>/<snapshot id>/chunks.bin   plaintext: the chunk ids it uses and their packs (36 bytes each)
    _files/sets/<set>/<snapshot id>/index.json   plaintext: stats, key id, format, packs (no names)
    _files/sets/<set>/<snapshot id>/manifest.jsonl.zst[.age]   the tree (encrypted); written last: the commit marker
    _files/sets/<set>/<snapshot id>/pin.json     retention never removes a pinned snapshot
    _files/sets/<set>/reports/<kind>/<time>.json attempt and restore-test records
    _files/locks/<kind>-<owner>.json             a snapshot or a pack collection in progress

A pack, before encryption (age, to the recipients)::

    b"DRPACK1\\n" | 4-byte big-endian length of the table | table (JSON) | chunk blobs

The table lists `[chunk id (hex), offset, stored length, plain length]`, offsets counted from the
end of the table; each blob is one zstd frame (or the plain bytes where compression is none).
Chunks are shuffled within a pack, and the table is inside the encryption: the stored object
reveals neither the chunk sizes nor their order in any file.

The manifest is JSON lines, zstd-compressed, then encrypted: a header line, then one line per
entry (see `Entry`), in scan order (a directory before what it holds).
"""

from __future__ import annotations

import base64
import json
import os
import struct
from dataclasses import dataclass, field
from typing import Any

ROOT = "_files"
PACK_MAGIC = b"DRPACK1\n"
MANIFEST_NAME = "manifest.jsonl.zst"
INDEX = "index.json"
CHUNKS = "chunks.bin"
PIN = "pin.json"
FORMAT = "dr-files/1"


SETS = f"{ROOT}/sets"


def set_prefix(file_set: str) -> str:
    return f"{SETS}/{file_set}"


def snapshot_prefix(file_set: str, snapshot_id: str) -> str:
    return f"{SETS}/{file_set}/{snapshot_id}"


def parse_snapshot_key(key: str) -> tuple[str, str, str] | None:
    """(set, snapshot id, object name) of an object of a snapshot; None for anything else."""
    parts = key.split("/")
    if len(parts) != 5 or f"{parts[0]}/{parts[1]}" != SETS or parts[3] == "reports":
        return None
    return parts[2], parts[3], parts[4]


def chunks_key(file_set: str, snapshot_id: str) -> str:
    return f"{snapshot_prefix(file_set, snapshot_id)}/{CHUNKS}"


CHUNK_RECORD = 36  # chunk id (32 bytes) + the position of its pack in the index's `packs` (4, big-endian)


def encode_chunk_record(cid: bytes, position: int) -> bytes:
    return cid + position.to_bytes(4, "big")


def decode_chunk_records(data: bytes) -> list[tuple[bytes, int]]:
    if len(data) % CHUNK_RECORD:
        raise ValueError("a chunk list whose size is not a multiple of 36 bytes")
    return [(data[i : i + 32], int.from_bytes(data[i + 32 : i + 36], "big")) for i in range(0, len(data), CHUNK_RECORD)]


def manifest_key(file_set: str, snapshot_id: str, encrypted: bool) -> str:
    return f"{snapshot_prefix(file_set, snapshot_id)}/{MANIFEST_NAME}{'.age' if encrypted else ''}"


def index_key(file_set: str, snapshot_id: str) -> str:
    return f"{snapshot_prefix(file_set, snapshot_id)}/{INDEX}"


def pack_key(pack_id: str, encrypted: bool) -> str:
    return f"{ROOT}/packs/{pack_id[:2]}/{pack_id}.pack{'.age' if encrypted else ''}"


def pack_id_of(key: str) -> str:
    return key.rsplit("/", 1)[1].split(".", 1)[0]


def key_object(key_id: str, recipients: str) -> str:
    """`recipients`: a fingerprint of the recipient set, so a rotation stores the key anew for the new ones."""
    return f"{ROOT}/keys/{key_id}-{recipients}.age"


def records_owner(file_set: str) -> str:
    """What records are stored under (`store_record`'s database argument): `_files/<set>`."""
    return set_prefix(file_set)


# --------------------------------------------------------------------------- packs


def encode_pack_body(chunks: list[tuple[bytes, bytes, int]]) -> bytes:
    """(chunk id, stored blob, plain length) in the order given -> the pack's plaintext."""
    table, offset = [], 0
    for cid, blob, plain_len in chunks:
        table.append([cid.hex(), offset, len(blob), plain_len])
        offset += len(blob)
    head = json.dumps({"chunks": table}, separators=(",", ":")).encode()
    return b"".join([PACK_MAGIC, struct.pack(">I", len(head)), head, *(blob for _, blob, _ in chunks)])


class PackFormatError(ValueError):
    pass


def decode_pack_table(body: bytes) -> tuple[dict[bytes, tuple[int, int, int]], int]:
    """The pack's table: chunk id -> (offset, stored length, plain length), and where blobs start."""
    if not body.startswith(PACK_MAGIC) or len(body) < len(PACK_MAGIC) + 4:
        raise PackFormatError("not a dr_pipelines pack (bad magic)")
    (n,) = struct.unpack(">I", body[len(PACK_MAGIC) : len(PACK_MAGIC) + 4])
    start = len(PACK_MAGIC) + 4
    try:
        table = json.loads(body[start : start + n])["chunks"]
    except (ValueError, KeyError) as e:
        raise PackFormatError(f"unreadable pack table ({e})") from None
    return {bytes.fromhex(c): (o, s, p) for c, o, s, p in table}, start + n


# --------------------------------------------------------------------------- manifest entries


def encode_name(raw: bytes) -> dict[str, str]:
    """A path as JSON: text when it is UTF-8, else base64 of the raw bytes (`pb`)."""
    try:
        return {"p": raw.decode("utf-8")}
    except UnicodeDecodeError:
        return {"pb": base64.b64encode(raw).decode()}


def decode_name(d: dict[str, Any], text: str = "p", raw: str = "pb") -> bytes:
    if text in d:
        return d[text].encode("utf-8")
    return base64.b64decode(d[raw])


@dataclass
class Entry:
    """One thing in the tree: a directory, a regular file, a symlink, a hardlink to an earlier
    file, or a special file (fifo, device: recorded, recreated as root)."""

    path: bytes  # absolute, raw bytes
    type: str  # dir | file | symlink | hardlink | fifo | chardev | blockdev | socket
    mode: int  # full st_mode permission bits, setuid/setgid/sticky included
    uid: int
    gid: int
    user: str | None
    group: str | None
    mtime_ns: int
    size: int = 0
    chunks: list[tuple[bytes, int]] = field(default_factory=list)  # (chunk id, plain length)
    sha256: str | None = None
    target: bytes | None = None  # symlink target; for a hardlink, the path of the first of its group
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    rdev: int = 0
    changed_while_read: bool = False
    nlink: int = 1  # a regular file's link count: >1 heads a hardlink group
    ctime_ns: int = 0  # not stored: what the backup host's cache compares
    ino: int = 0

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            **encode_name(self.path),
            "t": self.type,
            "mode": self.mode,
            "uid": self.uid,
            "gid": self.gid,
            "mtime_ns": self.mtime_ns,
        }
        if self.user:
            d["user"] = self.user
        if self.group:
            d["group"] = self.group
        if self.type == "file":
            d["size"] = self.size
            d["chunks"] = [[c.hex(), n] for c, n in self.chunks]
            d["sha256"] = self.sha256
        if self.target is not None:
            t = encode_name(self.target)
            d.update({"target": t["p"]} if "p" in t else {"target_b64": t["pb"]})
        if self.xattrs:
            d["xattrs"] = {
                base64.b64encode(k).decode(): base64.b64encode(v).decode() for k, v in sorted(self.xattrs.items())
            }
        if self.rdev:
            d["rdev"] = self.rdev
        if self.changed_while_read:
            d["changed_while_read"] = True
        if self.nlink > 1:
            d["nlink"] = self.nlink
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Entry:
        target = None
        if "target" in d or "target_b64" in d:
            target = decode_name(d, "target", "target_b64")
        return cls(
            path=decode_name(d),
            type=d["t"],
            mode=d["mode"],
            uid=d["uid"],
            gid=d["gid"],
            user=d.get("user"),
            group=d.get("group"),
            mtime_ns=d["mtime_ns"],
            size=d.get("size", 0),
            chunks=[(bytes.fromhex(c), n) for c, n in d.get("chunks", [])],
            sha256=d.get("sha256"),
            target=target,
            xattrs={base64.b64decode(k): base64.b64decode(v) for k, v in d.get("xattrs", {}).items()},
            rdev=d.get("rdev", 0),
            changed_while_read=d.get("changed_while_read", False),
            nlink=d.get("nlink", 1),
        )

    def shown(self) -> str:
        return os.fsdecode(self.path)
