"""Restoring logical backups: choose, then one streamed pass (fetch -> SHA-256 -> decrypt ->
decompress -> pg_restore), parallel index builds, validation, swap.

A restore never writes into the target directly: it restores into a staging database on the same
server, validates it there, and only then swaps it in (the old database is renamed and kept). A
failed fetch, decryption, pg_restore or validation therefore leaves the target as it was.

Plaintext touches disk only in a private 0700 directory on the restoring host, removed afterwards
even on failure. By default (`restore_spool`) the verified, decoded dump is spooled there and
`pg_restore -j N` loads tables and builds indexes in parallel, as a DBA would by hand. Without the
spool (disabled, or not enough free space) one stream feeds pg_restore and only the archive's head
(header + table of contents, which the parallel post-data step needs) is written.
"""
