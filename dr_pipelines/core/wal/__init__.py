"""The WAL archive: `wal-push` (PostgreSQL's archive_command) and `wal-fetch` (its restore_command).

Layout on every location (the sidecar is written after the object: it is the commit marker)::

    <database>/wal/<timeline>/<file name><.zst><.age>     the file, compressed and encrypted
    <database>/wal/<timeline>/<file name>.json           its size and SHA-256 (plain and stored),
                                                          the cluster's system identifier
    <database>/wal/cluster.json                           the system identifier this archive belongs to

The rules PostgreSQL needs (docs, and pgBackRest's behaviour):
  - push exits 0 only when the file is durable on every location; the same name pushed again with
    the same content succeeds, with different content fails (never overwrite archived WAL);
  - a segment whose header names another cluster is refused;
  - fetch exits 1 only when the file exists nowhere; a transient error is retried and then aborts
    recovery (exit > 125), because PostgreSQL reads exit 1..125 as "not found" and would end
    recovery early; a corrupt copy is skipped for a good one, and if none is good recovery aborts.
"""
