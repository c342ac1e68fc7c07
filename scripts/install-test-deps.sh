#!/usr/bin/env bash
# Installs what the test suite needs and a fresh Linux machine with Rust may lack:
# cargo-nextest (the test runner), python3 (apps in other languages), node (an app using
# server.listen({fd: 3})), util-linux (unshare), and HAProxy, wrk and iproute2 for the
# multi-host test (scripts/install-multihost-tools.sh).
# Idempotent: installs nothing that is already there.
set -euo pipefail

need_apt=()
command -v python3 >/dev/null || need_apt+=(python3)
command -v sleep >/dev/null || need_apt+=(coreutils)
command -v node >/dev/null || need_apt+=(nodejs)
command -v unshare >/dev/null || need_apt+=(util-linux)
if [ ${#need_apt[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null; then sudo=sudo; else sudo=; fi
    echo "installing ${need_apt[*]} (apt-get)" >&2
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

"$(dirname "$0")/install-multihost-tools.sh"

if ! cargo nextest --version >/dev/null 2>&1; then
    echo "installing cargo-nextest (cargo install, a few minutes once)" >&2
    cargo install --locked cargo-nextest
fi
