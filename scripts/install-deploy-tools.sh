#!/usr/bin/env bash
# What scripts/deploy-test.sh needs from Debian's packages: systemd-nspawn
# (systemd-container), debootstrap, the Docker engine (docker.io) and python3-venv (for
# kubernetes-validate). Idempotent; exit 1 when something could not be installed.
set -euo pipefail
if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null; then sudo=sudo; else sudo=; fi
need=()
command -v systemd-nspawn >/dev/null || need+=(systemd-container)
command -v debootstrap >/dev/null || need+=(debootstrap)
{ command -v dockerd >/dev/null && [ -x /usr/bin/docker ]; } || need+=(docker.io)
python3 -c 'import ensurepip, venv' 2>/dev/null || need+=(python3-venv)
[ ${#need[@]} -eq 0 ] && exit 0
echo "installing ${need[*]} (apt-get)" >&2
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
