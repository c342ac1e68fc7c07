#!/usr/bin/env bash
# Installs what scripts/multihost-demo.sh needs: HAProxy, wrk and iproute2 (Debian packages).
# Idempotent: installs nothing that is already there. With --optional (as the test suite
# calls it), a failed install only warns: the multi-host test then skips and says why.
set -euo pipefail
need=()
command -v haproxy >/dev/null || need+=(haproxy)
command -v wrk >/dev/null || need+=(wrk)
command -v ip >/dev/null || need+=(iproute2)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null; then sudo=sudo; else sudo=; fi
echo "installing ${need[*]} (apt-get)" >&2
if ! { $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null; }; then
    if [ "${1:-}" = --optional ]; then
        echo "warning: could not install ${need[*]}; the multi-host test will be skipped" >&2
        exit 0
    fi
    echo "error: could not install ${need[*]} (apt-get); install them and retry" >&2
    exit 1
fi
