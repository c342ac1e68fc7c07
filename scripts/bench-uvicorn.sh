#!/usr/bin/env bash
# uvicorn on its own port against uvicorn --fd 3 under reuseport-cluster (one worker each),
# keep-alive, driven by wrk on 127.0.0.1, in interleaved rounds within one run; prints
# requests/s per round, the medians and the ratio. Also runs the launcher with --no-nodelay
# to show what TCP_NODELAY on the listening socket is for: uvicorn wraps fd 3 as a unix
# socket and never sets TCP_NODELAY on what it accepts, so without it every keep-alive
# response waits on Nagle's algorithm and the client's delayed ACK.
#
#   scripts/bench-uvicorn.sh [--duration 5s] [--connections 16] [--rounds 3]
#
# uvicorn (from PyPI, pinned) goes to a venv in ~/.cache/reuseport-cluster, outside the clone.
set -euo pipefail
cd "$(dirname "$0")/.."
duration=5s connections=16 rounds=3
while [ $# -gt 0 ]; do
    case "$1" in
        --duration) duration=$2; shift 2 ;;
        --connections) connections=$2; shift 2 ;;
        --rounds) rounds=$2; shift 2 ;;
        *) echo "error: unknown option $1 (see the header of $0)" >&2; exit 2 ;;
    esac
done
command -v wrk >/dev/null || scripts/install-load-tools.sh --no-oha
venv=${XDG_CACHE_HOME:-$HOME/.cache}/reuseport-cluster/uvicorn-venv
if [ ! -x "$venv/bin/uvicorn" ]; then
    echo "installing uvicorn 0.54.0 into $venv (pip)" >&2
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q uvicorn==0.54.0
fi
cargo build --release --quiet
work=$(mktemp -d)
cat >"$work/app.py" <<'PY'
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"hello\n"})
PY
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
uv=("$venv/bin/uvicorn" --app-dir "$work" --no-access-log --log-level warning)

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_http() { for _ in $(seq 200); do curl -sf "http://$1/" >/dev/null 2>&1 && return 0; sleep 0.05; done; echo "error: nothing answers on $1" >&2; exit 1; }

own=127.0.0.1:$(free_port)
"${uv[@]}" --host 127.0.0.1 --port "${own##*:}" app:app &
pids+=($!)
launched=127.0.0.1:$(free_port)
target/release/reuseport-cluster --bind "$launched" --workers 1 --name "bench-uv-$$" \
    --control "$work/a.sock" -- "${uv[@]}" --fd 3 app:app 2>"$work/a.log" &
pids+=($!)
nagle=127.0.0.1:$(free_port)
target/release/reuseport-cluster --bind "$nagle" --workers 1 --name "bench-uv-nagle-$$" \
    --control "$work/b.sock" --no-nodelay -- "${uv[@]}" --fd 3 app:app 2>"$work/b.log" &
pids+=($!)
for a in "$own" "$launched" "$nagle"; do wait_http "$a"; done

rps() { wrk -t1 -c"$connections" -d"$duration" "http://$1/" | awk '/^Requests\/sec/ {print int($2)}'; }
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
echo "uvicorn 0.54.0 (h11), keep-alive, wrk -t1 -c$connections -d$duration, $rounds interleaved rounds, one worker each"
printf '%-6s %14s %22s %30s\n' round "own port" "under the launcher" "launcher --no-nodelay"
: >"$work/own"; : >"$work/launched"; : >"$work/nagle"
for r in $(seq "$rounds"); do
    a=$(rps "$own"); b=$(rps "$launched"); c=$(rps "$nagle")
    echo "$a" >>"$work/own"; echo "$b" >>"$work/launched"; echo "$c" >>"$work/nagle"
    printf '%-6s %14s %22s %30s\n' "$r" "$a req/s" "$b req/s" "$c req/s"
done
a=$(median <"$work/own"); b=$(median <"$work/launched"); c=$(median <"$work/nagle")
printf '%-6s %14s %22s %30s\n' median "$a req/s" "$b req/s" "$c req/s"
ratio=$(awk -v a="$a" -v b="$b" 'BEGIN {printf "%.2f", b / a}')
echo "under the launcher / own port: ${ratio}x (the goal: >= 0.9x)"
awk -v r="$ratio" 'BEGIN {exit !(r >= 0.9)}' || { echo "error: below 0.9x" >&2; exit 1; }
