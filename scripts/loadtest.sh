#!/usr/bin/env bash
# Starts reuseport-cluster on an app, drives it with wrk or oha on 127.0.0.1, prints
# requests/s, latency p50/p99/max and errors, and exits non-zero on any error.
#
#   scripts/loadtest.sh [--duration 10s] [--connections 64] [--new-connection]
#                       [--tool wrk|oha] [--workers N] [-- PROGRAM ARGS]
#
# Without `-- PROGRAM ARGS` the built-in demo app runs. --new-connection sends
# `Connection: close`, so every request opens a new connection.
set -euo pipefail
cd "$(dirname "$0")/.."
duration=10s connections=64 tool=wrk workers=2 close=0 app=()
while [ $# -gt 0 ]; do
    case "$1" in
        --duration) duration=$2; shift 2 ;;
        --connections) connections=$2; shift 2 ;;
        --new-connection) close=1; shift ;;
        --tool) tool=$2; shift 2 ;;
        --workers) workers=$2; shift 2 ;;
        --) shift; app=("$@"); break ;;
        *) echo "error: unknown option $1 (see the header of $0)" >&2; exit 2 ;;
    esac
done
case "$tool" in
    wrk) command -v wrk >/dev/null || scripts/install-load-tools.sh --no-oha ;;
    oha) command -v oha >/dev/null || scripts/install-load-tools.sh ;;
    *) echo "error: --tool wrk or oha" >&2; exit 2 ;;
esac
cargo build --release --quiet
log=$(mktemp)
args=(--bind 127.0.0.1:0 --workers "$workers" --name "loadtest-$$")
[ ${#app[@]} -gt 0 ] && args+=(-- "${app[@]}")
target/release/reuseport-cluster "${args[@]}" 2>"$log" &
master=$!
trap 'kill -TERM $master 2>/dev/null; wait $master 2>/dev/null; rm -f "$log"' EXIT
for _ in $(seq 200); do grep -q "workers ready" "$log" && break; sleep 0.05; done
grep -q "workers ready" "$log" || { cat "$log" >&2; echo "error: the cluster did not come up" >&2; exit 1; }
addr=$(grep -o 'bind0=[0-9.]*:[0-9]*' "$log" | head -1 | cut -d= -f2)
url="http://$addr/"
echo "load: $tool, $duration, $connections connections, $([ $close = 1 ] && echo 'a new connection per request' || echo keep-alive), $workers workers"
if [ "$tool" = wrk ]; then
    hdr=(); [ $close = 1 ] && hdr=(-H "Connection: close")
    out=$(wrk -t2 -c"$connections" -d"$duration" --latency "${hdr[@]}" "$url")
    rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
    p50=$(awk '$1=="50%" {print $2}' <<<"$out"); p99=$(awk '$1=="99%" {print $2}' <<<"$out")
    max=$(awk '$1=="Latency" && NF>=4 {print $4; exit}' <<<"$out")
    errors=$(awk '/Socket errors/ {gsub(",", ""); s=$4+$6+$8+$10} /Non-2xx/ {n=$NF} END {print s+n+0}' <<<"$out")
else
    hdr=(); [ $close = 1 ] && hdr=(--disable-keepalive)
    out=$(oha -z "$duration" -c "$connections" --no-tui "${hdr[@]}" "$url")
    rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
    p50=$(awk '/50.00%/ {print $3 $4}' <<<"$out"); p99=$(awk '/99.00%/ {print $3 $4}' <<<"$out")
    max=$(awk '/Slowest/ {print $2 $3}' <<<"$out")
    # "Error distribution:" is followed by lines like "  [3] connection reset".
    errors=$(awk '/Error distribution/ {f=1; next} f && /^ *\[[0-9]+\]/ {gsub(/[][]/, "", $1); s+=$1} END {print s+0}' <<<"$out")
    bad=$(awk '/Status code distribution/ {f=1; next} f && /^ *\[[0-9]+\]/ && $1 != "[200]" {gsub(/[][]/, "", $2); s+=$2} /^$/ {f=0} END {print s+0}' <<<"$out")
    errors=$((errors + bad))
fi
printf 'requests/s: %s\nlatency p50: %s  p99: %s  max: %s\nerrors: %s\n' "$rps" "$p50" "$p99" "$max" "$errors"
[ "${errors:-0}" -eq 0 ] || { echo "$out" >&2; exit 1; }
