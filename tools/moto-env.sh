# shellcheck shell=bash
# Source this to run the S3 asset-store tests against a real S3-protocol
# server (moto in server mode, from PyPI):
#
#     source tools/moto-env.sh
#     EASEL_REQUIRE_SERVERS=1 cargo test -p easel-server asset_store
#
# Installs (once, cached) the pinned `moto[server]` into a virtual
# environment outside the repository, ${TMPDIR:-/tmp}/easel-ci-moto-<version>
# (EASEL_MOTO_VENV overrides it), and exports EASEL_MOTO_SERVER, the
# `moto_server` the tests start on a free loopback port (one per test,
# stopped when the test ends). Nothing is started here.

EASEL_MOTO_VERSION=5.2.6

_easel_moto_env() {
    local venv=${EASEL_MOTO_VENV:-${TMPDIR:-/tmp}/easel-ci-moto-$EASEL_MOTO_VERSION}
    if [[ ! -x "$venv/bin/moto_server" ]]; then
        echo "moto-env: installing moto[server]==$EASEL_MOTO_VERSION into $venv" >&2
        rm -rf "$venv"
        if ! python3 -m venv "$venv" 2>/dev/null; then
            rm -rf "$venv"
            apt-get update && apt-get install -y python3-venv || return 1
            python3 -m venv "$venv" || return 1
        fi
        "$venv/bin/pip" install --quiet --disable-pip-version-check \
            "moto[server]==$EASEL_MOTO_VERSION" || return 1
    fi
    export EASEL_MOTO_SERVER="$venv/bin/moto_server"
}

_easel_moto_env
