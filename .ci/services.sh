#!/usr/bin/env bash
# Services the test-suite needs (started fresh on every CI machine).
set -euo pipefail
command -v openssl >/dev/null || { apt-get update -qq && apt-get install -y -qq openssl >/dev/null; }
# Chromium from the OS packages for the browser tests (driven by Playwright with executable_path=/usr/bin/chromium;
# Playwright's own browser download is never used)
command -v chromium >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

# --- PostgreSQL 15 on 127.0.0.1 for the PostgreSQL paths of record sources and the audit log
# (issue 6).  Idempotent: installs only when missing, starts only when down, creates the role and
# database only once.  Exports INSITU_TEST_PG_URL for tests/data, tests/deid and tests/audit.
insitu_pg_as_postgres() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else sudo -u postgres "$@"; fi; }
insitu_pg_up() {
  if [ ! -x /usr/lib/postgresql/15/bin/postgres ] || ! command -v pg_ctlcluster >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  fi
  [ -d /etc/postgresql/15/main ] || pg_createcluster 15 main >/dev/null
  mkdir -p /etc/postgresql/15/main/conf.d
  printf "listen_addresses = '127.0.0.1'\n" > /etc/postgresql/15/main/conf.d/insitu.conf
  local port; port="$(pg_conftool -s 15 main show port)"
  if ! pg_ctlcluster 15 main status >/dev/null 2>&1; then pg_ctlcluster 15 main start; fi
  pg_isready -q -h 127.0.0.1 -p "$port" -t 30
  insitu_pg_as_postgres psql -p "$port" -qtAc "SELECT 1 FROM pg_roles WHERE rolname = 'insitu'" | grep -q 1 \
    || insitu_pg_as_postgres psql -p "$port" -qc "CREATE ROLE insitu LOGIN PASSWORD 'insitu'"
  insitu_pg_as_postgres psql -p "$port" -qtAc "SELECT 1 FROM pg_database WHERE datname = 'insitu_test'" | grep -q 1 \
    || insitu_pg_as_postgres psql -p "$port" -qc "CREATE DATABASE insitu_test OWNER insitu"
  export INSITU_TEST_PG_URL="postgresql+psycopg://insitu:insitu@127.0.0.1:${port}/insitu_test"
}
insitu_pg_up
