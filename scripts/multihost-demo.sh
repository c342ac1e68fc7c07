#!/usr/bin/env bash
# Two "hosts" each running a reuseport-cluster, behind HAProxy on a third, all in network
# namespaces on this machine (addresses exist only inside the namespaces). wrk drives load
# through HAProxy while host 1 does rolling restarts and host 2's master is SIGTERMed and
# started again. Prints wrk's figures. Bounded in time; removes its namespaces on exit.
#
#   sudo scripts/multihost-demo.sh [SECONDS]        (default 20; needs root for ip netns)
#
#      rc-lb  (HAProxy 127.0.0.1:8080, wrk)
#     10.77.1.1 |            | 10.77.2.1
#     10.77.1.2 |            | 10.77.2.2
#      rc-h1 (reuseport-cluster :8000)   rc-h2 (reuseport-cluster :8000)
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_TOTAL=${1:-20}
[ "$(id -u)" -eq 0 ] || { echo "error: ip netns needs root; run with sudo" >&2; exit 1; }
scripts/install-multihost-tools.sh
# REUSEPORT_CLUSTER_BIN: the binary to run (the test suite passes the one under test).
if [ -z "${REUSEPORT_CLUSTER_BIN:-}" ]; then
    cargo build --release --quiet
    REUSEPORT_CLUSTER_BIN=${CARGO_TARGET_DIR:-$PWD/target}/release/reuseport-cluster
fi
BIN=$REUSEPORT_CLUSTER_BIN
WORK=$(mktemp -d /tmp/rc-multihost.XXXXXX)
NS=(rc-lb rc-h1 rc-h2)

cleanup() {
    for pidfile in "$WORK"/*.pid; do
        [ -f "$pidfile" ] || continue
        pid=$(cat "$pidfile")
        [ "$pid" -gt 1 ] && kill -TERM "$pid" 2>/dev/null || true
    done
    sleep 1
    for ns in "${NS[@]}"; do
        ip netns pids "$ns" 2>/dev/null | while read -r pid; do [ "$pid" -gt 1 ] && kill -KILL "$pid" 2>/dev/null || true; done
        ip netns del "$ns" 2>/dev/null || true
    done
    rm -rf "$WORK"
}
trap cleanup EXIT

for ns in "${NS[@]}"; do
    ip netns del "$ns" 2>/dev/null || true
    ip netns add "$ns"
    ip -n "$ns" link set lo up
done
for i in 1 2; do
    ip link add "rc-lb-h$i" type veth peer name "rc-h$i-lb"
    ip link set "rc-lb-h$i" netns rc-lb
    ip link set "rc-h$i-lb" netns "rc-h$i"
    ip -n rc-lb addr add "10.77.$i.1/24" dev "rc-lb-h$i"
    ip -n "rc-h$i" addr add "10.77.$i.2/24" dev "rc-h$i-lb"
    ip -n rc-lb link set "rc-lb-h$i" up
    ip -n "rc-h$i" link set "rc-h$i-lb" up
done

start_host() { # $1: 1 or 2
    ip netns exec "rc-h$1" "$BIN" --bind 0.0.0.0:8000 --workers 2 --grace 10s --name "multihost-h$1" \
        --control "$WORK/h$1.sock" \
        >>"$WORK/h$1.log" 2>&1 &
    echo $! >"$WORK/h$1.pid"
}
wait_ready() { # $1: 1 or 2; $2: how many starts the log must show (default 1)
    for _ in $(seq 100); do
        [ "$(grep -c "workers ready" "$WORK/h$1.log" 2>/dev/null)" -ge "${2:-1}" ] && return 0
        sleep 0.1
    done
    echo "error: host $1 did not come up:" >&2; cat "$WORK/h$1.log" >&2; exit 1
}
start_host 1; start_host 2; wait_ready 1; wait_ready 2

cat >"$WORK/haproxy.cfg" <<CFG
global
    maxconn 4096
defaults
    mode http
    timeout connect 1s
    timeout client 10s
    timeout server 10s
    retries 3
    option redispatch
    retry-on conn-failure empty-response response-timeout
frontend web
    bind 127.0.0.1:8080
    default_backend hosts
backend hosts
    balance roundrobin
    option httpchk GET /
    default-server check inter 200ms fall 2 rise 2
    server h1 10.77.1.2:8000
    server h2 10.77.2.2:8000
CFG
ip netns exec rc-lb haproxy -f "$WORK/haproxy.cfg" -db >"$WORK/haproxy.log" 2>&1 &
echo $! >"$WORK/haproxy.pid"
for _ in $(seq 50); do
    ip netns exec rc-lb bash -c 'exec 3<>/dev/tcp/127.0.0.1/8080' 2>/dev/null && break
    sleep 0.1
done

echo "load: wrk -t2 -c32 -d${SECONDS_TOTAL}s through HAProxy; host 1 rolls, host 2 restarts"
ip netns exec rc-lb wrk -t2 -c32 -d"${SECONDS_TOTAL}s" --timeout 5s http://127.0.0.1:8080/ >"$WORK/wrk.txt" 2>&1 &
WRK=$!
step=$((SECONDS_TOTAL / 5))
sleep "$step"
echo "t=${step}s: host 1 rolling restart (SIGHUP)"
kill -HUP "$(cat "$WORK/h1.pid")"
sleep "$step"
echo "t=$((2 * step))s: host 2 master SIGTERM"
kill -TERM "$(cat "$WORK/h2.pid")"
wait "$(cat "$WORK/h2.pid")" 2>/dev/null || true
sleep 1
echo "t=$((2 * step + 1))s: host 2 started again"
start_host 2; wait_ready 2 2
sleep "$step"
echo "t=$((3 * step + 1))s: host 1 rolling restart (SIGHUP)"
kill -HUP "$(cat "$WORK/h1.pid")"
wait "$WRK"
# The last rolling restart may still be finishing (each old worker lingers up to 1 s for
# HAProxy's idle keep-alive connections): wait for it, bounded.
for _ in $(seq 150); do
    [ "$(grep -c 'rolling restart to generation .* done' "$WORK/h1.log")" -ge 2 ] && break
    sleep 0.1
done
echo
cat "$WORK/wrk.txt"
echo
echo "host 1: $(grep -c 'rolling restart to generation .* done' "$WORK/h1.log") rolling restarts done"
echo "host 2: $(grep -c 'all workers stopped' "$WORK/h2.log") graceful stop(s), $(grep -c 'workers ready' "$WORK/h2.log") start(s)"
errors=$(grep -E "Socket errors|Non-2xx" "$WORK/wrk.txt" || true)
if [ -n "$errors" ]; then echo "FAILED REQUESTS: $errors"; else echo "failed requests: 0"; fi
