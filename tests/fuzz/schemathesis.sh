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

if [ ! -x "$venv/bin/schemathesis" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet schemathesis
fi
# shellcheck source=../scripts/fresh_server.sh
source "$(dirname "$0")/../scripts/fresh_server.sh"
fresh_server "$backend" "$out"

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
