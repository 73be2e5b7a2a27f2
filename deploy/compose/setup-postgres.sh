#!/bin/sh
# One-shot, in temporalio/admin-tools: create Temporal's two databases and bring their schemas to the
# image's version. Safe to run at every `docker compose up`: an existing database is only updated.
set -eu
: "${POSTGRES_SEEDS:?}" "${POSTGRES_USER:?}" "${SQL_PASSWORD:?}"
port=${DB_PORT:-5432}
schemas=/etc/temporal/schema/postgresql/v12

echo "waiting for PostgreSQL at ${POSTGRES_SEEDS}:${port}"
i=0
until nc -z -w 5 "${POSTGRES_SEEDS}" "${port}"; do
  i=$((i + 1)); [ "$i" -lt 60 ] || { echo "PostgreSQL did not answer" >&2; exit 1; }
  sleep 2
done

for db in temporal temporal_visibility; do
  case "$db" in temporal) dir=$schemas/temporal/versioned ;; *) dir=$schemas/visibility/versioned ;; esac
  sql() { temporal-sql-tool --plugin postgres12 --ep "${POSTGRES_SEEDS}" -u "${POSTGRES_USER}" -p "${port}" --db "$db" "$@"; }
  # update-schema succeeds only on a database that was set up before: then it is all there is to do.
  if ! sql update-schema -d "$dir" 2>/dev/null; then
    sql create
    sql setup-schema -v 0.0
    sql update-schema -d "$dir"
  fi
  echo "database $db ready"
done
