#!/usr/bin/env bash
# Fuzzes a running-from-scratch Palpo with schemathesis, driven by our own OpenAPI document
# (openapi/client-server.json): generated requests, valid and not, on every operation, then
# stateful sequences following the document's links. Not part of `cargo test` (minutes long,
# random, needs PyPI once); run it after changing endpoints or input handling.
#
#   tests/fuzz/schemathesis.sh [sqlite|postgres|mysql] [seconds] [schemathesis options...]
#
# Exits non-zero when schemathesis reports a failure or the server logged an error or a panic.
# Default checks: no 5xx, status codes and response bodies as documented, JSON content type;
# `--checks all` adds the stricter ones (see docs/architecture.md, "Layers", for what we
# accept on purpose). Knobs (environment): PALPO_BIN (default: a release build made here),
# FUZZ_VENV (~/.cache/palpo-fuzz), FUZZ_OUT (a new /tmp/palpo-fuzz.* dir), PG_URL
# (postgres://postgres@127.0.0.1:5432), MYSQL_URL (mysql://root@127.0.0.1:3306).
set -euo pipefail

backend=${1:-sqlite}
seconds=${2:-120}
shift $(($# < 2 ? $# : 2))
root=$(cd "$(dirname "$0")/../.." && pwd)
venv=${FUZZ_VENV:-$HOME/.cache/palpo-fuzz}
out=${FUZZ_OUT:-$(mktemp -d /tmp/palpo-fuzz.XXXXXX)}
mkdir -p "$out/data"

if [ ! -x "$venv/bin/schemathesis" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet schemathesis
fi
if [ -z "${PALPO_BIN:-}" ]; then
    (cd "$root" && cargo build --release -q -p palpo)
    PALPO_BIN=${CARGO_TARGET_DIR:-$root/target}/release/palpo
fi

db=palpo_fuzz_$$_$RANDOM
db_url=
case "$backend" in
    sqlite) ;;
    postgres)
        base=${PG_URL:-postgres://postgres@127.0.0.1:5432}
        psql "$base/postgres" -qc "CREATE DATABASE $db"
        db_url=$base/$db
        ;;
    mysql)
        base=${MYSQL_URL:-mysql://root@127.0.0.1:3306}
        mysql -h 127.0.0.1 -u root -e "CREATE DATABASE $db CHARACTER SET utf8mb4"
        db_url=$base/$db
        ;;
    *)
        echo "backend: sqlite, postgres or mysql" >&2
        exit 2
        ;;
esac

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
url=http://127.0.0.1:$port
env PALPO__LISTEN=127.0.0.1:$port PALPO__SERVER_NAME=localhost PALPO__DATA_DIR="$out/data" \
    PALPO__RATE_LIMIT__ENABLED=false PALPO__LOG=warn ${db_url:+PALPO__DATABASE__URL=$db_url} \
    "$PALPO_BIN" serve >"$out/server.log" 2>&1 &
server=$!
cleanup() {
    kill -INT "$server" 2>/dev/null || true
    wait "$server" 2>/dev/null || true
    case "$backend" in
        postgres) psql "$base/postgres" -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" ;;
        mysql) mysql -h 127.0.0.1 -u root -e "DROP DATABASE IF EXISTS $db" ;;
    esac
}
trap cleanup EXIT
for _ in $(seq 100); do
    curl -sf "$url/_matrix/client/versions" >/dev/null && break
    sleep 0.1
done

# One account: authenticated operations are fuzzed with its token. Operations that would end
# the session (logout, deactivation, password change) are left out so the rest stays reachable.
token=$(curl -sf -X POST "$url/_matrix/client/v3/register" \
    -d '{"username":"fuzz","password":"fuzz-password","auth":{"type":"m.login.dummy"}}' |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["access_token"])')

status=0
# From the output directory: schemathesis keeps its cache (.schemathesis/) where it runs.
cd "$out"
"$venv/bin/schemathesis" run "$root/openapi/client-server.json" --url "$url" \
    -H "Authorization: Bearer $token" \
    --checks not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance \
    --exclude-path-regex 'logout|deactivate|password' \
    --max-time "$seconds" -w 2 "$@" | tee "$out/schemathesis.txt" || status=$?
if grep -E 'panicked| ERROR ' "$out/server.log"; then
    echo "the server logged errors: $out/server.log" >&2
    status=1
fi
echo "output in $out"
exit $status
