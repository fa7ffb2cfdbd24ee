#!/usr/bin/env bash
# Real Matrix clients against a fresh Palpo: matrix-nio (PyPI) and matrix-js-sdk (npm, the
# library under Element Web) each run a two-user chat (nio_smoke.py, js_sdk_smoke.mjs). Not
# part of `cargo test` (needs PyPI and npm once); run it after changing what clients see.
#
#   tests/clients/run.sh [sqlite|postgres|mysql] [nio|js|all]
#
# Exits non-zero when a client step fails or the server logged an error or a panic. Knobs
# (environment): PALPO_BIN (default: a release build made here), CLIENTS_CACHE
# (~/.cache/palpo-clients: the venv and node_modules), CLIENTS_OUT (a new /tmp dir), PG_URL,
# MYSQL_URL as for tests/fuzz/schemathesis.sh.
set -euo pipefail

backend=${1:-sqlite}
which=${2:-all}
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
cache=${CLIENTS_CACHE:-$HOME/.cache/palpo-clients}
out=${CLIENTS_OUT:-$(mktemp -d /tmp/palpo-clients.XXXXXX)}
mkdir -p "$out/data" "$cache"

if [[ $which == nio || $which == all ]] && [ ! -x "$cache/venv/bin/python" ]; then
    python3 -m venv "$cache/venv"
    "$cache/venv/bin/pip" install --quiet matrix-nio
fi
if [[ $which == js || $which == all ]] && [ ! -d "$cache/node_modules/matrix-js-sdk" ]; then
    (cd "$cache" && npm install --silent --no-audit --no-fund matrix-js-sdk >/dev/null)
fi
if [ -z "${PALPO_BIN:-}" ]; then
    (cd "$root" && cargo build --release -q -p palpo)
    PALPO_BIN=${CARGO_TARGET_DIR:-$root/target}/release/palpo
fi

db=palpo_clients_$$_$RANDOM
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
# The clients build room aliases on `localhost`, the server name here.
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

status=0
if [[ $which == nio || $which == all ]]; then
    echo "== matrix-nio"
    "$cache/venv/bin/python" "$here/nio_smoke.py" "$url" 2>&1 | tee "$out/nio.txt" || status=1
fi
if [[ $which == js || $which == all ]]; then
    echo "== matrix-js-sdk"
    # Run beside the cache's node_modules, where an ES module finds its imports. The SDK logs
    # every request; its verdicts are the lines this script prints.
    cp "$here/js_sdk_smoke.mjs" "$cache/"
    node "$cache/js_sdk_smoke.mjs" "$url" >"$out/js-sdk.txt" 2>&1 || status=1
    grep -E '^(ok  |FAIL|answered|failures)' "$out/js-sdk.txt" || true
fi
if grep -E 'panicked| ERROR ' "$out/server.log"; then
    echo "the server logged errors: $out/server.log" >&2
    status=1
fi
echo "output in $out"
exit $status
