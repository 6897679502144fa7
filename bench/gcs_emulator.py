"""The tests' GCS emulator (gcp-storage-emulator, in memory) for the benchmarks (`bench/peers.py`).

    python bench/gcs_emulator.py PORT

The emulator reads a multipart upload (a JSON part, then the object's bytes: how the client sends an
object under 8 MB in one request) with Python's email parser, which takes ~28 ms per MB: 170 ms for a
6 MB WAL object, a cost no real GCS charges, which would time the emulator rather than the tool. This
server splits such a body on its boundary instead, giving the handler the same metadata and bytes;
other requests go to the emulator's own parser, and a multipart body of another shape fails the
request (its bytes are read by then). The tests, and bench/system.py, keep the emulator as is.
"""

from __future__ import annotations

import json
import re
import sys

from gcp_storage_emulator import server
from gcp_storage_emulator.__main__ import main as emulator_main

_stock_read_data = server._read_data
_BOUNDARY = re.compile(r'boundary="?([^";]+)"?')


def _split_multipart(body: bytes, boundary: bytes) -> dict | None:
    """{"meta", "content", "content-type"} of `--B CRLF headers CRLF CRLF json CRLF --B CRLF headers
    CRLF CRLF bytes CRLF --B-- CRLF`, or None when the body is not of that shape."""
    delimiter = b"\r\n--" + boundary
    first = b"--" + boundary + b"\r\n"
    if not body.startswith(first):
        return None
    meta_end = body.find(delimiter, len(first))
    content_end = body.rfind(delimiter + b"--")
    if meta_end < 0 or content_end <= meta_end:
        return None
    meta_headers, _, meta = body[len(first) : meta_end].partition(b"\r\n\r\n")
    part = body[meta_end + len(delimiter) + 2 : content_end]  # after the delimiter's CRLF
    headers, sep, content = part.partition(b"\r\n\r\n")
    if not sep:
        return None
    content_type = "application/octet-stream"
    for line in headers.decode("latin-1").split("\r\n"):
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-type":
            content_type = value.strip().split(";")[0]
        elif name.strip().lower() == "content-transfer-encoding":
            return None  # an encoded part: not what the client sends
    return {"meta": json.loads(meta), "content": content, "content-type": content_type}


def _read_data(handler, query):
    content_type = handler.headers.get("Content-Type") or ""
    match = _BOUNDARY.search(content_type)
    if not content_type.startswith("multipart/related") or match is None:
        return _stock_read_data(handler, query)
    raw = server._decode_raw_data(server._read_raw_data(handler), handler)
    if not raw:
        return None
    parsed = _split_multipart(raw, match.group(1).encode())
    if parsed is None:
        raise ValueError("a multipart upload this benchmark server cannot split; use the stock emulator")
    return parsed


server._read_data = _read_data

if __name__ == "__main__":
    port = sys.argv[1]
    emulator_main(["start", "--host", "127.0.0.1", "--port", port, "--in-memory", "--quiet"])
