#!/usr/bin/env bash
# Fuzz the live HTTP API against its own /openapi.json with schemathesis.
#
# Starts `easel serve` with the fake engine on 127.0.0.1 (a free port, a
# temporary data dir), creates an API key, runs `schemathesis run --checks
# all` with that key, stops the server, and exits non-zero when schemathesis
# found any failure (a 5xx, a response that violates the schema, an
# undocumented status, a valid request refused, ...).
#
# Usage: tools/schemathesis.sh [MAX_SECONDS] [MAX_EXAMPLES]
#   MAX_SECONDS   time budget of the run (default 150)
#   MAX_EXAMPLES  examples per operation and phase (default 50)
# Environment:
#   EASEL_BIN     the easel binary (default target/debug/easel)
#   SCHEMATHESIS  the schemathesis executable (default: `schemathesis` on PATH)
#   ST_ARGS       more arguments for `schemathesis run`
# Loopback only: the server binds 127.0.0.1 and schemathesis calls nothing
# else (the fake engine downloads no model).
set -euo pipefail
cd "$(dirname "$0")/.."

max_time="${1:-150}"
max_examples="${2:-50}"
easel="${EASEL_BIN:-${CARGO_TARGET_DIR:-target}/debug/easel}"
st="${SCHEMATHESIS:-schemathesis}"

if [[ ! -x "$easel" ]]; then
    echo "schemathesis.sh: no easel binary at $easel (cargo build -p easel-cli, or set EASEL_BIN)" >&2
    exit 2
fi

work="$(mktemp -d)"
server_pid=""
cleanup() {
    if [[ -n "$server_pid" ]]; then
        kill "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

# A high submission rate limit: the fuzzer sends far more than a client would.
cat > "$work/easel.toml" <<EOF
engine = "fake"
fake_step_ms = 1
offline = true
default_model = "fake/model"
max_wait_seconds = 5
max_queue = 100000
rate_limit_per_minute = 1000000
rate_limit_burst = 100000
EOF

port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
key="$("$easel" keys create --config "$work/easel.toml" --data-dir "$work/data" --name schemathesis \
    | grep -o 'esk_[A-Za-z0-9]*' | head -n1)"
if [[ -z "$key" ]]; then
    echo "schemathesis.sh: could not create an API key" >&2
    exit 2
fi

"$easel" serve --config "$work/easel.toml" --data-dir "$work/data" \
    --bind "127.0.0.1:$port" > "$work/serve.log" 2>&1 &
server_pid=$!
for _ in $(seq 1 100); do
    if python3 -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:$port/healthz', timeout=1)" 2>/dev/null; then
        break
    fi
    sleep 0.1
done

echo "schemathesis.sh: $("$st" --version) against http://127.0.0.1:$port (${max_time}s, ${max_examples} examples)"
status=0
# shellcheck disable=SC2086
"$st" --config-file tools/schemathesis.toml run "http://127.0.0.1:$port/openapi.json" \
    --header "Authorization: Bearer $key" \
    --checks all \
    --max-time "$max_time" \
    --max-examples "$max_examples" \
    --request-timeout 20 \
    --workers 2 \
    --suppress-health-check all \
    --no-color \
    ${ST_ARGS:-} || status=$?

if ! kill -0 "$server_pid" 2>/dev/null; then
    echo "schemathesis.sh: the server died during the run; its log:" >&2
    cat "$work/serve.log" >&2
    status=1
fi
if [[ $status -eq 0 ]]; then
    echo "schemathesis.sh: no failures"
else
    echo "schemathesis.sh: FAILED (schemathesis exit $status); server log tail:" >&2
    tail -n 20 "$work/serve.log" >&2
fi
exit "$status"
