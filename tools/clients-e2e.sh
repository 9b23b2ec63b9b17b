#!/usr/bin/env bash
# The official client libraries of the APIs easel stands in for, against a
# live `easel serve` (issue 19): each `tests/clients/test_*.py` runs with the
# real client pointed at easel's base URL and exits non-zero on any failure.
#
# Starts `easel serve` on the tiny fixture models (a free loopback port, a
# fresh data dir, an API key; `default_model = "tiny-sd15"`), installs the
# clients pinned below in a virtual environment outside the repository, runs
# every test script, stops the server. Nothing skips: a client that cannot
# be installed or a server that does not start fails the run.
#
# Usage: tools/clients-e2e.sh [SCRIPT...]   (default: every tests/clients/test_*.py)
# Environment:
#   EASEL_BIN  the easel binary (default $CARGO_TARGET_DIR/debug/easel)
# The scripts get EASEL_URL (http://127.0.0.1:PORT), EASEL_KEY (the API key),
# EASEL_DATA_DIR and EASEL_FIXTURES (tests/fixtures, absolute).
set -euo pipefail
cd "$(dirname "$0")/.."

# Pinned client versions (PyPI).
CLIENTS=(openai==3.63.0 replicate==1.0.7 webuiapi==0.9.17)

easel="${EASEL_BIN:-${CARGO_TARGET_DIR:-target}/debug/easel}"
if [[ ! -x "$easel" ]]; then
    cargo build -p easel-cli
fi
easel="$(realpath "$easel")"

pins="$(printf '%s\n' "${CLIENTS[@]}" | sha256sum | cut -c1-12)"
venv="${TMPDIR:-/tmp}/easel-clients-$pins"
if [[ ! -x "$venv/bin/python" ]] || ! "$venv/bin/python" -c 'import openai, replicate, webuiapi' 2>/dev/null; then
    rm -rf "$venv"
    if ! python3 -m venv "$venv" 2>/dev/null; then
        rm -rf "$venv"
        apt-get update && apt-get install -y python3-venv
        python3 -m venv "$venv"
    fi
    "$venv/bin/pip" install --quiet "${CLIENTS[@]}"
fi

work="$(mktemp -d)"
server_pid=""
cleanup() {
    if [[ -n "$server_pid" ]]; then kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT

port="$("$venv/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
# Loopback is allow-listed for the webhook receivers of the client scripts.
cat > "$work/easel.toml" <<TOML
default_model = "tiny-sd15"
allow_fetch_hosts = ["127.0.0.1"]
TOML
key="$("$easel" keys create --data-dir "$work/data" --name clients-e2e 2>&1 | grep -o 'esk_[A-Za-z0-9_]*' | head -1)"
if [[ -z "$key" ]]; then
    echo "clients-e2e.sh: easel keys create gave no key" >&2
    exit 1
fi
"$easel" serve --offline --config "$work/easel.toml" --data-dir "$work/data" \
    --models-dir "$PWD/tests/fixtures/models" --bind "127.0.0.1:$port" > "$work/serve.log" 2>&1 &
server_pid=$!
for _ in $(seq 1 600); do
    if curl -fsS "http://127.0.0.1:$port/readyz" > /dev/null 2>&1; then break; fi
    if ! kill -0 "$server_pid" 2>/dev/null; then
        echo "clients-e2e.sh: easel serve stopped; its log:" >&2
        cat "$work/serve.log" >&2
        exit 1
    fi
    sleep 0.1
done

if [[ $# -gt 0 ]]; then scripts=("$@"); else scripts=(tests/clients/test_*.py); fi
failed=()
for script in "${scripts[@]}"; do
    echo "clients-e2e.sh: $script"
    if ! EASEL_URL="http://127.0.0.1:$port" EASEL_KEY="$key" EASEL_DATA_DIR="$work/data" \
        EASEL_FIXTURES="$PWD/tests/fixtures" "$venv/bin/python" "$script"; then
        failed+=("$script")
    fi
done
if ! kill -0 "$server_pid" 2>/dev/null; then
    echo "clients-e2e.sh: the server died during the run; its log:" >&2
    cat "$work/serve.log" >&2
    exit 1
fi
if [[ ${#failed[@]} -gt 0 ]]; then
    echo "clients-e2e.sh: FAILED: ${failed[*]}; server log tail:" >&2
    tail -n 30 "$work/serve.log" >&2
    exit 1
fi
echo "clients-e2e.sh: ${#scripts[@]} client script(s) passed"
