#!/bin/bash
# A hot standby of the `postgres` service: on first start (empty data directory) clone the
# primary with pg_basebackup -R (which writes primary_conninfo and standby.signal), then run
# postgres. Later starts resume streaming from where the replica stopped.
set -euo pipefail

PGDATA="${PGDATA:-/var/lib/postgresql/data}"
PRIMARY_HOST="${PRIMARY_HOST:-postgres}"
PRIMARY_PORT="${PRIMARY_PORT:-5432}"

mkdir -p "$PGDATA"
chown postgres:postgres "$PGDATA"
chmod 700 "$PGDATA"

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    until pg_isready -q -h "$PRIMARY_HOST" -p "$PRIMARY_PORT"; do
        echo "waiting for the primary at $PRIMARY_HOST:$PRIMARY_PORT..."
        sleep 1
    done
    echo "cloning the primary into $PGDATA"
    gosu postgres pg_basebackup \
        --dbname="host=$PRIMARY_HOST port=$PRIMARY_PORT user=$REPLICATION_USER password=$REPLICATION_PASSWORD application_name=postgres-replica" \
        --pgdata="$PGDATA" \
        --write-recovery-conf \
        --wal-method=stream \
        --checkpoint=fast \
        --progress
fi

exec gosu postgres postgres -c hot_standby=on "$@"
