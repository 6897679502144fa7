"""Restoring logical backups: choose, then one streamed pass (fetch -> SHA-256 -> decrypt ->
decompress -> pg_restore), parallel index builds, validation, swap.

A restore never writes into the target directly: it restores into a staging database on the same
server, validates it there, and only then swaps it in (the old database is renamed and kept). A
failed fetch, decryption, pg_restore or validation therefore leaves the target as it was.

Plaintext touches disk only in a private 0700 directory on the restoring host, removed afterwards
even on failure. By default (`restore_spool`) the decoded dump is spooled there and, while it
decodes, parallel pg_restore loaders read it and load their share of the tables; indexes then build
with `pg_restore --section=post-data -j N`. A copy that fails its checksum at the end fails the
restore and the staging database is dropped; into an existing database (data only) only a verified
spool is loaded, with `pg_restore -j N`. Without the
spool (disabled, or not enough free space) one stream feeds pg_restore and only the archive's head
(header + table of contents, which the parallel post-data step needs) is written.
"""
