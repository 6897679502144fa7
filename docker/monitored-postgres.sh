#!/bin/sh
# The sample monitored PostgreSQL: a cluster whose WAL is archived by `dr-pipelines wal-push`.
# Started as root by compose; initializes the data directory once, then runs the server as postgres.
set -eu
PGDATA=${PGDATA:-/var/lib/postgresql/data}
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  install -d -o postgres -m 0700 "$PGDATA"
  pwfile=$(mktemp) && cat "$APP_DB_PASSWORD_FILE" > "$pwfile" && chown postgres "$pwfile"
  runuser -u postgres -- initdb -D "$PGDATA" -U postgres --pwfile="$pwfile" --auth-local=peer --auth-host=scram-sha-256 --data-checksums
  rm -f "$pwfile"
  echo "host all all 0.0.0.0/0 scram-sha-256" >> "$PGDATA/pg_hba.conf"
  echo "host replication all 0.0.0.0/0 scram-sha-256" >> "$PGDATA/pg_hba.conf"
  # archiving, as `dr-pipelines pg-config app` prints it for this config
  cat >> "$PGDATA/postgresql.conf" <<CONF
listen_addresses = '*'
wal_level = replica
archive_mode = on
archive_timeout = 60
archive_command = '/opt/dr_pipelines/.venv/bin/dr-pipelines-wal --config /etc/dr_pipelines/dr.yaml wal-push %p'
CONF
  runuser -u postgres -- pg_ctl -D "$PGDATA" -w start -o "-c listen_addresses=''"
  runuser -u postgres -- psql -q -c "CREATE DATABASE ${APP_DB_NAME:-app}"
  runuser -u postgres -- pg_ctl -D "$PGDATA" -w stop
fi
exec runuser -u postgres -- postgres -D "$PGDATA"
