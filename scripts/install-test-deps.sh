#!/usr/bin/env bash
# Installs what the test suite needs and a fresh Linux machine with Rust may lack:
# cargo-nextest (the test runner), python3 (apps in other languages), node (an app using
# server.listen({fd: 3})), util-linux (unshare), and HAProxy, wrk and iproute2 for the
# multi-host test (scripts/install-multihost-tools.sh), and the real servers
# (scripts/install-servers.sh), and what scripts/deploy-test.sh needs (its tools, cargo-deb
# and the cached rootfs).
# Idempotent: installs nothing that is already there.
set -euo pipefail

if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null; then sudo=sudo; else sudo=; fi
apt_install() { # $1: required|optional, then packages
    local kind=$1; shift
    echo "installing $* (apt-get)" >&2
    if ! { $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >/dev/null; }; then
        [ "$kind" = required ] && { echo "error: could not install $* (apt-get)" >&2; exit 1; }
        echo "warning: could not install $*; the tests that need it will be skipped" >&2
    fi
}

# Required: most integration tests run python3 apps.
need=()
command -v python3 >/dev/null || need+=(python3)
command -v sleep >/dev/null || need+=(coreutils)
[ ${#need[@]} -eq 0 ] || apt_install required "${need[@]}"
# Optional: the node readiness test and the PID 1 test skip with a reason without them.
need=()
command -v node >/dev/null || need+=(nodejs)
command -v unshare >/dev/null || need+=(util-linux)
[ ${#need[@]} -eq 0 ] || apt_install optional "${need[@]}"

"$(dirname "$0")/install-multihost-tools.sh" --optional
# The real servers of tests/integration/servers.rs (pip, npm, Debian), cached outside the
# clone; a server that cannot be installed makes its test skip with the reason.
"$(dirname "$0")/install-servers.sh" || echo "warning: some servers could not be installed; their tests will be skipped" >&2
# scripts/deploy-test.sh (tests real_deploy::*): systemd-nspawn, debootstrap, Docker, cargo-deb
# and the cached Debian 12 rootfs, made here once (~4 min) rather than inside a timed test.
if [ "$(id -u)" -eq 0 ]; then
    { "$(dirname "$0")/install-deploy-tools.sh" && "$(dirname "$0")/install-deb-tools.sh" \
        && "$(dirname "$0")/deploy-rootfs.sh" >/dev/null; } \
        || echo "warning: the deploy tools or the rootfs could not be installed; scripts/deploy-test.sh will skip" >&2
fi

if ! cargo nextest --version >/dev/null 2>&1; then
    echo "installing cargo-nextest (cargo install, a few minutes once)" >&2
    cargo install --locked cargo-nextest
fi
