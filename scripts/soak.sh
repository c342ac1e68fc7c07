#!/usr/bin/env bash
# The chaos test of the suite (tests/integration/chaos.rs, load_chaos_) run for 30 minutes:
# under 8 load clients, at random every 0.4-1.2 s, a worker SIGKILLed or SIGSTOPped for
# 0.5-2 s, SIGHUP, scale +-1, a stray USR1/USR2/WINCH to the master. Every 10 s it prints
# what the clients saw (ok, failed, refused), the faults so far and the master's fds and RSS;
# at the end the same checks as the test (workers all back, nothing stopped or unreaped,
# fds and RSS flat, 0 refused, failed <= 3 per SIGKILL + 3, SIGTERM exits 0).
#
#   scripts/soak.sh [--minutes 30] [--seed N]
#
# Runs through `cargo test`, not nextest, whose slow-timeout would end it after 3 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
minutes=30 seed=
while [ $# -gt 0 ]; do
    case "$1" in
        --minutes) minutes=$2; shift 2 ;;
        --seed) seed=$2; shift 2 ;;
        *) echo "error: unknown option $1 (see the header of $0)" >&2; exit 2 ;;
    esac
done
case "$minutes" in
    ''|*[!0-9]*|0) echo "error: --minutes $minutes: a whole number of minutes above 0" >&2; exit 2 ;;
esac
export REUSEPORT_CLUSTER_CHAOS_SECS=$((minutes * 60))
if [ -n "$seed" ]; then
    export REUSEPORT_CLUSTER_CHAOS_SEED=$seed
fi
echo "soak: $minutes min of chaos (scripts/soak.sh)" >&2
exec cargo test --quiet --test integration -- --exact --nocapture \
    chaos::load_chaos_kills_stops_reloads_scales_and_stray_signals_the_cluster_keeps_serving
