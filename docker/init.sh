#!/bin/sh
# One-time set-up of docker/: the secrets compose mounts, the .env it reads, and dr.yaml with the
# age recipient of the generated identity. Never overwrites what exists.
set -eu
cd "$(dirname "$0")"
umask 077
mkdir -p secrets
[ -s secrets/age_identity.txt ] || age-keygen -o secrets/age_identity.txt 2>/dev/null
[ -s secrets/app_db_password ] || head -c 24 /dev/urandom | base64 | tr -d '/+=' > secrets/app_db_password
if [ ! -s .env ]; then
  {
    echo "DAGSTER_PG_PASSWORD=$(head -c 24 /dev/urandom | base64 | tr -d '/+=')"
    echo "APP_DB_PASSWORD=$(cat secrets/app_db_password)"
    echo "DR_S3_ACCESS_KEY_ID=testing"
    echo "DR_S3_SECRET_ACCESS_KEY=testing"
    echo "DR_ALERT_WEBHOOK_URL="
  } > .env
fi
recipient=$(age-keygen -y secrets/age_identity.txt)
[ -s dr.yaml ] || sed "s/AGE_RECIPIENT/$recipient/" dr.template.yaml > dr.yaml
chmod 0644 dr.yaml
# the containers run as the image's postgres user (uid 999): it must read the secrets
chown 999 secrets/* 2>/dev/null || echo "note: run as root, or: sudo chown 999 docker/secrets/*" >&2
echo "wrote secrets/, .env and dr.yaml; copy secrets/age_identity.txt somewhere safe, then: docker compose up --build"
