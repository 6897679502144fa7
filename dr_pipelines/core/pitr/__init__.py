"""Point-in-time recovery from base backups and WAL."""
