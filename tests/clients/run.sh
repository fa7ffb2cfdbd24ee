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
cache=${CLIENTS_CACHE:-$HOME/.cache/palpo-clients}
out=${CLIENTS_OUT:-$(mktemp -d /tmp/palpo-clients.XXXXXX)}
mkdir -p "$cache"

if [[ $which == nio || $which == all ]] && [ ! -x "$cache/venv/bin/python" ]; then
    python3 -m venv "$cache/venv"
    "$cache/venv/bin/pip" install --quiet matrix-nio
fi
if [[ $which == js || $which == all ]] && [ ! -d "$cache/node_modules/matrix-js-sdk" ]; then
    (cd "$cache" && npm install --silent --no-audit --no-fund matrix-js-sdk >/dev/null)
fi
# shellcheck source=../scripts/fresh_server.sh
source "$(dirname "$0")/../scripts/fresh_server.sh"
fresh_server "$backend" "$out"

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
