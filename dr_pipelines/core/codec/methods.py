"""The one table of compression and encryption methods: suffix, streaming encoder, decode sink,
decoding tool, whole-buffer encode and decode. Adding a method touches this file (and the config's Literal)."""

from __future__ import annotations

CHUNK = 1 << 20
