#!/usr/bin/env bash
# What scripts/build-deb.sh needs: cargo-deb (crates.io; a minute or two to build, once) and
# dpkg-shlibdeps (dpkg-dev), which computes the package's Depends from the libraries the
# binary links. Idempotent.
set -euo pipefail
if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null; then sudo=sudo; else sudo=; fi
if ! command -v dpkg-shlibdeps >/dev/null; then
    echo "installing dpkg-dev (apt-get)" >&2
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq dpkg-dev >/dev/null
fi
if ! cargo deb --version >/dev/null 2>&1; then
    echo "installing cargo-deb (cargo install, a minute or two once)" >&2
    cargo install --locked cargo-deb
fi
