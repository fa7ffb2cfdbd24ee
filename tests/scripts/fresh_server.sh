# Sourced by the test scripts that drive a real server (tests/fuzz/schemathesis.sh,
# tests/clients/run.sh): `fresh_server BACKEND OUT` builds Palpo unless PALPO_BIN names a
# binary, creates a uniquely named database on PostgreSQL or MySQL (none for SQLite), starts
# the server on a free loopback port with its data and log (server.log) in OUT, rate limits
# off and server name `localhost`, and waits until it answers. It sets `url`, and traps EXIT
# to stop the server and drop the database. Knobs: PALPO_BIN, PG_URL
# (postgres://postgres@127.0.0.1:5432), MYSQL_URL (mysql://root@127.0.0.1:3306).

fresh_server() {
    local backend=$1 out=$2
    local root
    root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
    if [ -z "${PALPO_BIN:-}" ]; then
        (cd "$root" && cargo build --release -q -p palpo)
        PALPO_BIN=${CARGO_TARGET_DIR:-$root/target}/release/palpo
    fi
    mkdir -p "$out/data"
    fresh_backend=$backend
    fresh_db=palpo_test_$$_$RANDOM
    local db_url=
    case "$backend" in
        sqlite) ;;
        postgres)
            fresh_base=${PG_URL:-postgres://postgres@127.0.0.1:5432}
            psql "$fresh_base/postgres" -qc "CREATE DATABASE $fresh_db"
            db_url=$fresh_base/$fresh_db
            ;;
        mysql)
            fresh_base=${MYSQL_URL:-mysql://root@127.0.0.1:3306}
            mysql -h 127.0.0.1 -u root -e "CREATE DATABASE $fresh_db CHARACTER SET utf8mb4"
            db_url=$fresh_base/$fresh_db
            ;;
        *)
            echo "backend: sqlite, postgres or mysql" >&2
            exit 2
            ;;
    esac
    local port
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    url=http://127.0.0.1:$port
    env PALPO__LISTEN=127.0.0.1:$port PALPO__SERVER_NAME=localhost PALPO__DATA_DIR="$out/data" \
        PALPO__RATE_LIMIT__ENABLED=false PALPO__LOG=warn ${db_url:+PALPO__DATABASE__URL=$db_url} \
        "$PALPO_BIN" serve >"$out/server.log" 2>&1 &
    fresh_pid=$!
    trap fresh_server_stop EXIT
    for _ in $(seq 100); do
        curl -sf "$url/_matrix/client/versions" >/dev/null && return 0
        sleep 0.1
    done
    echo "the server did not answer: $out/server.log" >&2
    exit 1
}

fresh_server_stop() {
    kill -INT "$fresh_pid" 2>/dev/null || true
    wait "$fresh_pid" 2>/dev/null || true
    case "$fresh_backend" in
        postgres) psql "$fresh_base/postgres" -qc "DROP DATABASE IF EXISTS $fresh_db WITH (FORCE)" ;;
        mysql) mysql -h 127.0.0.1 -u root -e "DROP DATABASE IF EXISTS $fresh_db" ;;
    esac
}
