#!/usr/bin/env bash
# Runs the same palpo-bench profile against Palpo (SQLite; PostgreSQL; PostgreSQL + Redis) and
# Synapse (SQLite; PostgreSQL), then prints palpo/Synapse ratios per figure.
#
#   crates/palpo-bench/compare.sh
#
# Knobs (environment): BENCH_USERS (20) BENCH_ROOMS (5) BENCH_SENDERS (20) BENCH_LISTENERS (4)
# BENCH_SECONDS (10) BENCH_RATE (0 = flat out, else messages/s over all senders)
# BENCH_SYNC_ROOMS (100) BENCH_SYNC_EVENTS (100) BENCH_RAW_SECONDS (5)
# BENCH_TARGETS ("palpo-sqlite palpo-postgres palpo-postgres-redis synapse-sqlite synapse-postgres")
# BENCH_PG_HOST (127.0.0.1) BENCH_PG_USER (postgres) BENCH_REDIS (redis://127.0.0.1:6379)
# SYNAPSE_VENV (~/.cache/palpo-bench/synapse-venv) BENCH_OUT (a new /tmp/palpo-bench.* dir)
# CARGO_TARGET_DIR (./target). Every server listens on a free loopback port; every PostgreSQL
# database is a fresh palpo_bench_<random> (dropped at the end); Redis keys use a unique namespace.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
USERS=${BENCH_USERS:-20}
ROOMS=${BENCH_ROOMS:-5}
# 20 concurrent senders: the benchmark issue's profile (Synapse sends ~50 events/s there on
# SQLite). Runs one to nine used 8 (BENCH_SENDERS=8 repeats them); see docs/benchmarks.md.
SENDERS=${BENCH_SENDERS:-20}
LISTENERS=${BENCH_LISTENERS:-4}
SECS=${BENCH_SECONDS:-10}
RATE=${BENCH_RATE:-0}
SYNC_ROOMS=${BENCH_SYNC_ROOMS:-100}
SYNC_EVENTS=${BENCH_SYNC_EVENTS:-100}
RAW_SECONDS=${BENCH_RAW_SECONDS:-5}
TARGETS=${BENCH_TARGETS:-"palpo-sqlite palpo-postgres palpo-postgres-redis synapse-sqlite synapse-postgres"}
PG_HOST=${BENCH_PG_HOST:-127.0.0.1}
PG_USER=${BENCH_PG_USER:-postgres}
REDIS=${BENCH_REDIS:-redis://127.0.0.1:6379}
SYNAPSE_VENV=${SYNAPSE_VENV:-$HOME/.cache/palpo-bench/synapse-venv}
OUT=${BENCH_OUT:-$(mktemp -d /tmp/palpo-bench.XXXXXX)}
mkdir -p "$OUT"
BENCH="$TARGET_DIR/release/palpo-bench"
PALPO="$TARGET_DIR/release/palpo"
RUN=$(head -c 6 /dev/urandom | od -An -tx1 | tr -d ' \n')

PIDS=()
DBS=()
cleanup() {
    for pid in "${PIDS[@]}"; do
        if kill -0 "$pid" 2>/dev/null; then
            kill -TERM "$pid" 2>/dev/null || true
            wait "$pid" 2>/dev/null || true
        fi
    done
    # By this run's prefix: `new_pg_db` runs in a command substitution (a subshell), so what it
    # appends to DBS never reaches this shell.
    for db in "${DBS[@]}" $(psql -U "$PG_USER" -h "$PG_HOST" -Atc \
        "SELECT datname FROM pg_database WHERE datname LIKE 'palpo_bench_${RUN}_%'" 2>/dev/null); do
        dropdb -U "$PG_USER" -h "$PG_HOST" --if-exists --force "$db" 2>/dev/null || true
    done
}
trap cleanup EXIT

say() { printf '\n== %s\n' "$*" >&2; }

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

wait_up() { # URL PID
    for _ in $(seq 1 600); do
        if curl -fs "$1/_matrix/client/versions" >/dev/null 2>&1; then return 0; fi
        kill -0 "$2" 2>/dev/null || return 1
        sleep 0.1
    done
    return 1
}

new_pg_db() {
    local db="palpo_bench_${RUN}_$1"
    createdb -U "$PG_USER" -h "$PG_HOST" -T template0 -E UTF8 --locale=C "$db"
    DBS+=("$db")
    echo "$db"
}

# Always: cargo does nothing when the binaries are current, and a stale binary left in the
# target directory by another checkout or build would be measured in place of this one.
say "building palpo and palpo-bench (release)"
(cd "$ROOT" && cargo build --release -p palpo -p palpo-bench)

SYNAPSE_OK=1
SYNAPSE_WHY=""
ensure_synapse() {
    if "$SYNAPSE_VENV/bin/python" -c 'import synapse, psycopg2' 2>/dev/null; then return 0; fi
    say "installing Synapse into $SYNAPSE_VENV"
    if ! { python3 -m venv "$SYNAPSE_VENV" && "$SYNAPSE_VENV/bin/pip" install -q matrix-synapse psycopg2-binary; } >"$OUT/synapse-install.log" 2>&1; then
        SYNAPSE_OK=0
        SYNAPSE_WHY="pip install matrix-synapse failed (see $OUT/synapse-install.log)"
    fi
}
if [[ "$TARGETS" == *synapse* ]]; then ensure_synapse; fi

# prepare_TARGET writes $DIR/start.sh (which execs the server) and sets URL and RAW_DB.
prepare_palpo() { # backend(sqlite|postgres|postgres-redis)
    local port env
    port=$(free_port)
    URL="http://127.0.0.1:$port"
    env="PALPO__LISTEN=127.0.0.1:$port PALPO__SERVER_NAME=localhost PALPO__DATA_DIR=$DIR/data"
    env+=" PALPO__RATE_LIMIT__ENABLED=false PALPO__LOG=warn"
    case "$1" in
        sqlite) RAW_DB="sqlite://$DIR/raw.db" ;;
        postgres*)
            local db
            db=$(new_pg_db "${1//-/_}")
            env+=" PALPO__DATABASE__URL=postgres://$PG_USER@$PG_HOST:5432/$db"
            RAW_DB="postgres://$PG_USER@$PG_HOST:5432/$db"
            ;;
    esac
    if [[ "$1" == *redis ]]; then
        env+=" PALPO__CACHE__REDIS_URL=$REDIS PALPO__CACHE__NAMESPACE=palpo_bench_$RUN"
    fi
    printf '#!/bin/sh\ncd %s\nexec env %s %s serve\n' "$DIR" "$env" "$PALPO" >"$DIR/start.sh"
}

prepare_synapse() { # backend(sqlite|postgres)
    local port db="" py="$SYNAPSE_VENV/bin/python"
    port=$(free_port)
    URL="http://127.0.0.1:$port"
    RAW_DB=""
    (cd "$DIR" && "$py" -m synapse.app.homeserver -H localhost --config-path "$DIR/homeserver.yaml" \
        --generate-config --report-stats=no --data-directory "$DIR") >"$DIR/generate.log" 2>&1
    if [[ "$1" == postgres ]]; then db=$(new_pg_db synapse); fi
    "$py" - "$DIR/homeserver.yaml" "$port" "$db" "$PG_USER" "$PG_HOST" <<'PY'
import sys, yaml
path, port, db, pg_user, pg_host = sys.argv[1:6]
c = yaml.safe_load(open(path))
c["listeners"] = [{"port": int(port), "bind_addresses": ["127.0.0.1"], "type": "http",
                   "tls": False, "x_forwarded": False,
                   "resources": [{"names": ["client"], "compress": False}]}]
if db:
    c["database"] = {"name": "psycopg2", "args": {"user": pg_user, "host": pg_host, "port": 5432,
                     "database": db, "cp_min": 5, "cp_max": 10}}
else:
    c["database"] = {"name": "sqlite3", "args": {"database": path.rsplit("/", 1)[0] + "/homeserver.db"}}
c["enable_registration"] = True
c["enable_registration_without_verification"] = True
big = {"per_second": 1000000, "burst_count": 1000000}
for key in ["rc_message", "rc_registration", "rc_room_creation", "rc_3pid_validation",
            "rc_joins_per_room", "rc_admin_redaction", "rc_presence", "rc_delayed_event_mgmt"]:
    c[key] = big
c["rc_login"] = {"address": big, "account": big, "failed_attempts": big}
c["rc_joins"] = {"local": big, "remote": big}
c["rc_invites"] = {"per_room": big, "per_user": big, "per_issuer": big}
c["trusted_key_servers"] = []
c["suppress_key_server_warning"] = True
c["report_stats"] = False
c["presence"] = {"enabled": False}
yaml.safe_dump(c, open(path, "w"))
PY
    sed -i 's/level: INFO/level: WARNING/' "$DIR"/*.log.config 2>/dev/null || true
    printf '#!/bin/sh\ncd %s\nexec %s -m synapse.app.homeserver -c %s\n' "$DIR" "$py" "$DIR/homeserver.yaml" >"$DIR/start.sh"
}

run_target() { # name
    local name=$1 json="$OUT/$1.json" pid
    DIR="$OUT/$name"
    mkdir -p "$DIR"
    case "$name" in
        palpo-*) prepare_palpo "${name#palpo-}" ;;
        synapse-*)
            if [[ $SYNAPSE_OK != 1 ]]; then say "SKIPPING $name: Synapse is not available here: $SYNAPSE_WHY"; return 0; fi
            prepare_synapse "${name#synapse-}" ;;
    esac
    chmod +x "$DIR/start.sh"
    # Every target starts with the disk quiet: the previous target's dirty pages written out
    # (writeback throttles any process that writes, which shows as a stall in the send tail).
    sync
    say "$name: starting ($URL)"
    "$DIR/start.sh" >"$DIR/server.log" 2>&1 &
    pid=$!
    PIDS+=("$pid")
    if ! wait_up "$URL" "$pid"; then
        say "$name: the server did not come up; last log lines:"
        tail -20 "$DIR/server.log" >&2 || true
        if [[ $name == synapse-* ]]; then SYNAPSE_WHY="Synapse failed to start"; fi
        kill -TERM "$pid" 2>/dev/null || true
        return 0
    fi
    sleep 2 # idle
    "$BENCH" --url "$URL" --label "$name" --phase load,sync --users "$USERS" --rooms "$ROOMS" \
        --senders "$SENDERS" --listeners "$LISTENERS" --seconds "$SECS" --rate "$RATE" --sync-rooms "$SYNC_ROOMS" \
        --sync-events "$SYNC_EVENTS" --server-pid "$pid" --json "$json" || say "$name: load/sync failed"
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    # Restart on the now populated database and time it to the first /versions.
    "$BENCH" --url "$URL" --label "$name" --phase startup --start-cmd "$DIR/start.sh" \
        --json "$json" >/dev/null || say "$name: startup phase failed"
    if [[ -n "$RAW_DB" ]]; then
        "$BENCH" --label "$name" --phase raw-db --db-url "$RAW_DB" --raw-seconds "$RAW_SECONDS" \
            --senders "$SENDERS" --json "$json" >/dev/null || say "$name: raw-db phase failed"
    fi
}

for t in $TARGETS; do run_target "$t"; done

say "results in $OUT"
pair() { # A B
    if [[ -f "$OUT/$1.json" && -f "$OUT/$2.json" ]]; then
        say "ratios $1 / $2"
        "$BENCH" --ratio "$OUT/$1.json" "$OUT/$2.json"
    fi
}
pair palpo-sqlite synapse-sqlite
pair palpo-postgres synapse-postgres
pair palpo-postgres-redis synapse-postgres
if [[ "$TARGETS" == *synapse* && $SYNAPSE_OK != 1 ]]; then
    say "NOTE: Synapse was NOT benchmarked: $SYNAPSE_WHY. Palpo figures only."
fi
for t in $TARGETS; do
    if [[ $t == palpo-* && -f "$OUT/$t.json" ]]; then
        jq -r --arg t "$t" '.figures as $f | if $f["load.sent_events_per_s"] and $f["raw.insert_c_writers_per_s"]
            then "\($t): sent events/s = \(($f["load.sent_events_per_s"] / $f["raw.insert_c_writers_per_s"] * 1000 | round) / 10)% of the raw concurrent insert rate"
            else empty end' "$OUT/$t.json"
    fi
done
