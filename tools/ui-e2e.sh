#!/usr/bin/env bash
# End-to-end tests of the web page (`easel serve` at /) in a real browser:
# Debian's chromium driven by playwright-core (pinned in tests/ui/package.json
# and package-lock.json), against `easel serve` on the tiny fixture models
# (tests/ui/server.mjs starts it on a free loopback port with a fresh data
# dir and an API key). Installs what is missing: the chromium package (apt)
# and the npm packages (npm ci); builds the easel binary if there is none.
# Any failure to start chromium or the server fails the run (nothing skips).
#
# Usage: tools/ui-e2e.sh [--screenshots]
#   --screenshots  write the phone (390 px) and desktop (1280 px) screenshots
#                  of the generate page and the gallery into docs/ui/
# Environment:
#   EASEL_BIN      the easel binary (default $CARGO_TARGET_DIR/debug/easel)
#   CHROMIUM       the browser (default /usr/bin/chromium)
# The tests of e2e.test.mjs run one after another (node:test runs a file's
# tests in order); they share one server.
set -euo pipefail
cd "$(dirname "$0")/.."

easel="${EASEL_BIN:-${CARGO_TARGET_DIR:-target}/debug/easel}"
if [[ ! -x "$easel" ]]; then
    cargo build -p easel-cli
fi
chromium="${CHROMIUM:-/usr/bin/chromium}"
if [[ ! -x "$chromium" ]]; then
    if [[ -n "${CHROMIUM:-}" ]]; then
        echo "ui-e2e.sh: CHROMIUM=$chromium is not an executable" >&2
        exit 2
    fi
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y chromium
fi
if ! command -v npm >/dev/null; then
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y nodejs npm
fi
(cd tests/ui && npm ci --no-audit --no-fund)

shots=""
if [[ "${1:-}" == "--screenshots" ]]; then
    shots="$PWD/docs/ui"
fi
# Absolute before the cd below (EASEL_BIN may be relative to the repository).
easel="$(realpath "$easel")"
cd tests/ui
EASEL_BIN="$easel" CHROMIUM="$chromium" UI_SCREENSHOT_DIR="$shots" \
    node --test --test-reporter=spec e2e.test.mjs
