"""Taking backups: logical (pg_dump) and base (pg_basebackup), with their shared bookkeeping."""
