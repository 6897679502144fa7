#!/usr/bin/env python3
"""Restore a dr_pipelines file snapshot with `age`, `zstd` and this standard-library script alone.

    python3 restore_files_by_hand.py REPO SET SNAPSHOT_ID IDENTITY_FILE INTO

REPO is a copy of one location's root (a local location as it is; for S3 or GCS first
`aws s3 cp --recursive s3://BUCKET/PREFIX/_files REPO/_files`, or `gcloud storage cp -r`).
A snapshot is `REPO/_files/sets/SET/SNAPSHOT_ID/`: index.json, chunks.bin (36-byte records: a chunk
id, then the big-endian position of its pack in the index's `packs`), manifest.jsonl.zst[.age].
Every file is checked against its SHA-256 from the manifest.
"""

import base64
import hashlib
import json
import os
import struct
import subprocess
import sys


def decode(cmd, data):
    return subprocess.run(cmd, input=data, capture_output=True, check=True).stdout


def main(repo, file_set, snapshot, identity, into):
    snap = os.path.join(repo, "_files", "sets", file_set, snapshot)
    with open(os.path.join(snap, "index.json")) as f:
        index = json.load(f)
    with open(os.path.join(snap, "chunks.bin"), "rb") as f:
        records = f.read()
    encrypted = index["encryption"]["method"] == "age"
    age = ["age", "--decrypt", "--identity", identity]

    def open_object(path):
        with open(path + (".age" if encrypted else ""), "rb") as f:
            data = f.read()
        return decode(age, data) if encrypted else data

    manifest = decode(["zstd", "-d", "-c"], open_object(os.path.join(snap, "manifest.jsonl.zst")))
    where = {
        records[i : i + 32].hex(): index["packs"][int.from_bytes(records[i + 32 : i + 36], "big")]
        for i in range(0, len(records), 36)
    }
    packs = {}

    def chunk(cid):
        pack_id = where[cid]
        if pack_id not in packs:
            body = open_object(os.path.join(repo, "_files", "packs", pack_id[:2], pack_id + ".pack"))
            assert body[:8] == b"DRPACK1\n", "not a pack"
            (n,) = struct.unpack(">I", body[8:12])
            table = json.loads(body[12 : 12 + n])["chunks"]
            blobs = b"".join(body[12 + n + off : 12 + n + off + size] for _, off, size, _ in table)
            plain = decode(["zstd", "-d", "-c"], blobs) if index["compression"] == "zstd" else blobs
            packs.clear()  # one pack in memory at a time
            pos = 0
            for cid2, _, _, length in table:
                packs.setdefault(pack_id, {})[cid2] = plain[pos : pos + length]
                pos += length
        return packs[pack_id][cid]

    def raw(d, text="p", b64="pb"):
        return d[text].encode() if text in d else base64.b64decode(d[b64])

    dirs = []
    for line in manifest.splitlines()[1:]:
        e = json.loads(line)
        path = os.path.join(os.fsencode(into), raw(e).lstrip(b"/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if e["t"] == "dir":
            os.makedirs(path, exist_ok=True)
            dirs.append((path, e))
            continue
        if e["t"] == "file":
            h = hashlib.sha256()
            with open(path, "wb") as f:
                for cid, _ in e["chunks"]:
                    data = chunk(cid)
                    h.update(data)
                    f.write(data)
            if h.hexdigest() != e["sha256"]:
                sys.exit(f"SHA-256 mismatch: {path!r}")
        elif e["t"] == "symlink":
            os.symlink(raw(e, "target", "target_b64"), path)
        elif e["t"] == "hardlink":
            os.link(os.path.join(os.fsencode(into), raw(e, "target", "target_b64").lstrip(b"/")), path)
            continue
        else:
            continue  # fifos and devices: recreate by hand if needed
        if e["t"] != "symlink":
            os.chmod(path, e["mode"])
        os.utime(path, ns=(e["mtime_ns"], e["mtime_ns"]), follow_symlinks=False)
    for path, e in reversed(dirs):
        os.chmod(path, e["mode"])
        os.utime(path, ns=(e["mtime_ns"], e["mtime_ns"]))
    print(f"restored {snapshot} of {file_set} into {into}; every file matched its SHA-256")


if __name__ == "__main__":
    if len(sys.argv) != 6:
        sys.exit(__doc__)
    main(*sys.argv[1:])
