#!/usr/bin/env bash
# The whole test suite: unit tests and integration tests against the real binary, real
# worker processes and real TCP clients on 127.0.0.1. This is what CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-test-deps.sh
exec cargo nextest run --no-fail-fast "$@"
