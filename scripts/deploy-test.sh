#!/usr/bin/env bash
# The production targets, for real: the .deb installed with dpkg -i into Debian 12 booted
# under systemd 252 and 254 (systemd-nspawn), the Dockerfile's runtime stage run by a Docker
# engine this script starts, and the Kubernetes manifests validated against the API schemas.
#
#   scripts/deploy-test.sh [systemd-252] [systemd-254] [docker] [kubernetes]   (default: all)
#
# Prints one line per check (ok / FAIL / pending, with the measured time) and ends with
# "deploy-test: N passed, N failed". Every daemon, mount and namespace it makes is removed on
# exit, also on failure or SIGTERM. Big downloads are cached outside the clone in
# $REUSEPORT_CLUSTER_TEST_CACHE (default /var/cache/reuseport-cluster-test): the rootfs
# (once ~80 s), Docker's image store and the kubernetes-validate venv; a second run takes
# about a minute.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
AREAS=("$@")
[ ${#AREAS[@]} -gt 0 ] || AREAS=(systemd-252 systemd-254 docker kubernetes)

if [ "$(id -u)" -ne 0 ]; then
    echo "deploy-test: skipped: booting systemd, mounting overlays and running dockerd need root"
    exit 0
fi
# A step skips, saying why, only when its tools cannot be installed here.
if ! scripts/install-deploy-tools.sh; then
    echo "deploy-test: skipped: systemd-container, debootstrap or docker.io could not be installed (apt-get)"
    exit 0
fi
if ! CACHE=$(scripts/deploy-rootfs.sh); then
    echo "deploy-test: skipped: the Debian 12 rootfs could not be made (debootstrap from the Debian mirror)"
    exit 0
fi

PASSED=0
FAILED=0
PENDING=0
ok() { echo "ok      $*"; PASSED=$((PASSED + 1)); }
bad() { echo "FAIL    $*"; FAILED=$((FAILED + 1)); }
pending() { echo "pending $*"; PENDING=$((PENDING + 1)); }
check() { # check "what" command...: ok when the command succeeds
    local what=$1; shift
    if "$@"; then ok "$what"; else bad "$what"; fi
}
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'; }
lt() { awk -v a="$1" -v b="$2" 'BEGIN { exit !(a < b) }'; }
# poll SECONDS command...: runs the command every 0.1 s until it succeeds or time is up.
poll() {
    local deadline; deadline=$(awk -v n="$(now)" -v s="$1" 'BEGIN { printf "%.3f", n + s }'); shift
    until "$@" >/dev/null 2>&1; do
        lt "$(now)" "$deadline" || return 1
        sleep 0.1
    done
}

WORK=$(mktemp -d /tmp/rct-deploy.XXXXXX)
MOUNTS=()
CONTAINER_INITS=()
NSPAWNS=()
DOCKERD=
DOCKER_EXEC_ROOT=
cleanup() {
    set +e
    trap '' TERM INT # a second signal must not cut the cleanup short
    for l in "${CONTAINER_INITS[@]}"; do
        timeout 10 nsenter -t "$l" -a systemctl poweroff >/dev/null 2>&1
    done
    for n in "${NSPAWNS[@]}"; do
        for _ in $(seq 100); do kill -0 "$n" 2>/dev/null || break; sleep 0.1; done
    done
    # The container's PID 1: killing it ends every process of its PID namespace, and nspawn.
    for l in "${CONTAINER_INITS[@]}"; do kill -KILL "$l" 2>/dev/null; done
    for n in "${NSPAWNS[@]}"; do
        for _ in $(seq 50); do kill -0 "$n" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$n" 2>/dev/null
        wait "$n" 2>/dev/null
    done
    for m in "${MOUNTS[@]}"; do umount "$m" 2>/dev/null || umount -l "$m"; done
    if [ -n "$DOCKERD" ]; then
        $DOCKER ps -aq 2>/dev/null | xargs -r $DOCKER rm -f >/dev/null 2>&1
        kill -TERM "$DOCKERD"
        for _ in $(seq 150); do kill -0 "$DOCKERD" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$DOCKERD" 2>/dev/null
        wait "$DOCKERD" 2>/dev/null
        # dockerd's own containerd, if it outlived it: only the one under our exec root.
        for p in /proc/[0-9]*; do
            grep -qs -- "$DOCKER_EXEC_ROOT" "$p/cmdline" && kill -KILL "${p#/proc/}" 2>/dev/null
        done
        for m in $(awk -v r="$DOCKER_EXEC_ROOT" '$5 ~ "^"r { print $5 }' /proc/self/mountinfo | sort -r); do
            umount -l "$m"
        done
        rm -rf "$DOCKER_EXEC_ROOT"
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 143' TERM INT

BIN=$ROOT/target/release/reuseport-cluster
if [[ " ${AREAS[*]} " == *" systemd-"* ]]; then
    if ! scripts/install-deb-tools.sh; then
        echo "deploy-test: skipped: cargo-deb or dpkg-dev could not be installed"
        exit 0
    fi
    echo "building the .deb (scripts/build-deb.sh --fast)"
    scripts/build-deb.sh --fast >"$WORK/build-deb.log" 2>&1 || { tail -20 "$WORK/build-deb.log"; exit 1; }
    DEB=$(ls -t target/debian/reuseport-cluster_*.deb | head -1)
elif [[ " ${AREAS[*]} " == *" docker "* ]]; then
    cargo build -q --release --locked --bin reuseport-cluster
fi
# `reuseport-cluster reload` that waits for the outcome and fails on a rollback (issue 11).
if "$BIN" reload --help 2>/dev/null | grep -q -- --no-wait; then RELOAD_WAITS=1; else RELOAD_WAITS=; fi

# ---------------------------------------------------------------- systemd (nspawn)
# The app: the built-in demo, 1 s slow to start (so a start or reload that returned early
# shows), and a deploy that crashes at once while /srv/app/broken exists.
APP='#!/bin/sh
[ -e /srv/app/broken ] && { echo "broken build: exiting" >&2; exit 1; }
sleep 1
exec /usr/bin/reuseport-cluster __demo-worker'
ENV='REUSEPORT_CLUSTER_ARGS=--bind 127.0.0.1:80 --workers 2 --user nobody --grace 5s --ready-timeout 10s --cmd /srv/app/run'
DROPIN='[Service]
WatchdogSec=5s'

# The worker pids that answer 40 new connections, sorted and unique.
answering_pids() {
    for _ in $(seq 40); do $E curl -s -m 2 http://127.0.0.1:80/ || true; echo; done \
        | grep -o 'pid [0-9]*' | awk '{ print $2 }' | sort -un | tr '\n' ' '
}
generations() { # the generation of every worker, from the control socket
    $E reuseport-cluster status --name web --json \
        | python3 -c 'import json,sys; print(" ".join(str(w["generation"]) for w in json.load(sys.stdin)["workers"]))'
}
journal() { $E journalctl -u reuseport-cluster@web -n 40 -o short-precise --no-pager | sed 's/^/        /'; }
show() { $E systemctl show -p "$1" --value reuseport-cluster@web; }
all_gen() { [ "$(generations)" = "$1 $1" ]; }
disjoint() { [ -z "$(comm -12 <(tr ' ' '\n' <<<"$1" | sed '/^$/d') <(tr ' ' '\n' <<<"$2" | sed '/^$/d'))" ]; }

systemd_test() {
    local v=$1 d=$WORK/systemd-$1 t
    local S="systemd $v"
    mkdir -p "$d/upper" "$d/work" "$d/root"
    mount -t overlay overlay -o "lowerdir=$CACHE/rootfs-$v,upperdir=$d/upper,workdir=$d/work" "$d/root"
    MOUNTS+=("$d/root")
    cp "$DEB" "$d/root/root/"
    mkdir -p "$d/root/srv/app"
    printf '%s\n' "$APP" > "$d/root/srv/app/run"
    chmod 755 "$d/root/srv/app/run"
    systemd-nspawn -q -b -D "$d/root" --machine="rct-$v-$$" --register=no --keep-unit \
        --private-network --console=pipe </dev/null >"$d/nspawn.log" 2>&1 &
    local ns=$!
    NSPAWNS+=("$ns")
    # The container's PID 1: nspawn's child that is pid 1 of its own PID namespace (nspawn
    # forks a short-lived helper first, which must not be taken for it).
    local l=
    container_init() { pgrep -P "$1" | while read -r p; do
        [ "$(awk '/^NSpid:/ { print $NF }' "/proc/$p/status" 2>/dev/null)" = 1 ] && echo "$p"; done | head -1; }
    poll 30 eval '[ -n "$(container_init "$ns")" ]' || { bad "$S: the container did not boot: $(tail -5 "$d/nspawn.log")"; return; }
    l=$(container_init "$ns")
    CONTAINER_INITS+=("$l")
    E="timeout 60 nsenter -t $l -a"
    # Booted: "running", or "degraded" when some unit of the minimal rootfs failed.
    if ! poll 60 eval '[[ "$($E systemctl is-system-running 2>/dev/null)" =~ ^(running|degraded)$ ]]'; then
        bad "$S: systemd in the container did not finish booting: $(tail -5 "$d/nspawn.log")"; return
    fi
    version=$($E systemctl --version | awk 'NR == 1 { print $2 }')
    check "$S: the container runs systemd $version as PID 1" [ "$version" = "$v" ]

    t=$(now)
    if $E dpkg -i "/root/$(basename "$DEB")" >"$d/dpkg.log" 2>&1; then
        ok "$S: dpkg -i $(basename "$DEB") ($(since "$t") s)"
    else
        bad "$S: dpkg -i: $(tail -3 "$d/dpkg.log")"; return
    fi
    check "$S: the package's sysctl.d file applied: tcp_migrate_req=1" \
        [ "$($E cat /proc/sys/net/ipv4/tcp_migrate_req)" = 1 ]
    printf '%s\n' "$ENV" > "$d/root/etc/reuseport-cluster/web.env"
    mkdir -p "$d/root/etc/systemd/system/reuseport-cluster@web.service.d"
    printf '%s\n' "$DROPIN" > "$d/root/etc/systemd/system/reuseport-cluster@web.service.d/watchdog.conf"
    $E systemctl daemon-reload

    # start returns once the workers are ready: they answer at once, and it took the app's 1 s.
    t=$(now)
    if ! $E systemctl start reuseport-cluster@web; then
        bad "$S: systemctl start failed:"; journal; return
    fi
    local took; took=$(since "$t")
    [ -z "${DEPLOY_TEST_DEBUG:-}" ] || $E journalctl -o short-precise --no-pager -b | tail -60
    local gen1; gen1=$(answering_pids)
    check "$S: systemctl start returned once both workers were ready (${took} s, app takes 1 s)" \
        eval 'lt 1 "$took" && [ "$(wc -w <<<"$gen1")" = 2 ]'
    local p users=
    for p in $gen1; do users+="$($E awk '/^Uid:/ { print $2 }' "/proc/$p/status") "; done
    check "$S: --user nobody on port 80: workers $gen1 run as uid $users" [ "$users" = "65534 65534 " ]
    check "$S: status: $(show StatusText)" eval '[[ "$(show StatusText)" == "2/2 workers ready"* ]]'

    # A healthy master keeps the watchdog (WatchdogSec=5s here) fed; a bounded wait, as
    # nothing announces that a watchdog did not fire.
    local main; main=$(show MainPID)
    sleep 11
    check "$S: the watchdog does not fire on a healthy master (11 s, WatchdogSec=5s)" \
        eval '[ "$(show NRestarts)" = 0 ] && [ "$(show MainPID)" = "$main" ]'

    # reload: a rolling restart; returns when every slot serves generation 2.
    t=$(now)
    local rc=0
    $E systemctl reload reuseport-cluster@web || rc=$?
    took=$(since "$t")
    local gens; gens=$(generations)
    local gen2; gen2=$(answering_pids)
    if [ $rc = 0 ] && [ "$gens" = "2 2" ] && [ "$(wc -w <<<"$gen2")" = 2 ] && disjoint "$gen1" "$gen2"; then
        ok "$S: systemctl reload returned when every slot served generation 2 (${took} s; new pids $gen2)"
    else
        local what="systemctl reload exit $rc after ${took} s; then generations $gens, answering pids $gen2 (before: $gen1)"
        if [ -n "$RELOAD_WAITS" ]; then bad "$S: $what"; else
            pending "$S: $what: needs \`reuseport-cluster reload\` to wait for the outcome (issue 11)"
            poll 20 all_gen 2 || true
            gen2=$(answering_pids)
        fi
    fi

    # A broken deploy: the reload fails, generation 2 keeps serving.
    touch "$d/root/srv/app/broken"
    rc=0
    t=$(now)
    $E systemctl reload reuseport-cluster@web >/dev/null 2>&1 || rc=$?
    took=$(since "$t")
    if [ $rc != 0 ]; then
        ok "$S: a broken deploy makes systemctl reload fail (exit $rc, ${took} s; ReloadResult=$(show ReloadResult))"
    elif [ -n "$RELOAD_WAITS" ]; then
        bad "$S: a broken deploy: systemctl reload exit 0"
    else
        pending "$S: a broken deploy: systemctl reload exit 0 after ${took} s: a failure needs issue 11's waiting \`reuseport-cluster reload\`"
        # Let the rollback finish before checking what serves.
        poll 20 eval '$E journalctl -u reuseport-cluster@web --no-pager | grep -q "rolled back\|roll.*fail\|failed"' || true
    fi
    rm "$d/root/srv/app/broken"
    poll 20 eval '[ "$(show ActiveState)" = active ]' || true
    local after; after=$(answering_pids)
    check "$S: after the rollback generation 2 still serves (pids $after)" \
        eval '[ "$after" = "$gen2" ] && all_gen 2'
    [ -z "${DEPLOY_TEST_DEBUG:-}" ] || journal

    # stop: the master stops its workers gracefully and exits 0, well within --grace 5s.
    t=$(now)
    rc=0
    $E systemctl stop reuseport-cluster@web || rc=$?
    took=$(since "$t")
    check "$S: systemctl stop exited cleanly in ${took} s (--grace 5s; Result=$(show Result), status $(show ExecMainStatus))" \
        eval '[ $rc = 0 ] && lt "$took" 5 && [ "$(show Result)" = success ] && [ "$(show ExecMainStatus)" = 0 ]'
    check "$S: nothing of the cluster left after stop" \
        eval '! $E pgrep -f "reuseport-cluster|/srv/app/run" >/dev/null'

    # The watchdog fires on a stuck (SIGSTOPped) master, and systemd starts a new one.
    if ! $E systemctl start reuseport-cluster@web; then
        bad "$S: systemctl start (again) failed:"; journal; return
    fi
    main=$(show MainPID)
    $E kill -STOP "$main"
    t=$(now)
    # systemd sends SIGABRT (and SIGCONT); SIGKILL only after TimeoutAbortSec (40 s here).
    if poll 50 eval '[ "$(show NRestarts)" -ge 1 ] && [ "$(show ActiveState)" = active ]'; then
        ok "$S: the watchdog fired on the SIGSTOPped master; restarted in $(since "$t") s (MainPID $main -> $(show MainPID))"
    else
        bad "$S: the watchdog did not restart the SIGSTOPped master: $(show ActiveState) $(show Result)"
    fi
    [ -z "${DEPLOY_TEST_DEBUG:-}" ] || journal
    check "$S: the journal names the watchdog" \
        eval '$E journalctl -u reuseport-cluster@web --no-pager | grep -q "Watchdog timeout"'
    check "$S: the restarted cluster answers" eval '[ "$(wc -w <<<"$(answering_pids)")" = 2 ]'
    $E systemctl stop reuseport-cluster@web
    if [ "$v" -ge 253 ]; then notify_reload_test "$d"; fi
}

# systemd >= 253 also offers Type=notify-reload (docs/deploy.md): systemd sends SIGHUP and
# waits for the master's RELOADING=1 ... READY=1. What it does on a good and a broken deploy.
notify_reload_test() {
    local d=$1 t rc
    local S="systemd $version, Type=notify-reload drop-in"
    printf '[Service]\nType=notify-reload\nExecReload=\n' \
        > "$d/root/etc/systemd/system/reuseport-cluster@web.service.d/notify-reload.conf"
    $E systemctl daemon-reload
    $E systemctl start reuseport-cluster@web
    local before; before=$(answering_pids)
    t=$(now)
    rc=0
    $E systemctl reload reuseport-cluster@web || rc=$?
    local took; took=$(since "$t")
    local gens; gens=$(generations)
    local after; after=$(answering_pids)
    check "$S: systemctl reload returned when every slot served generation 2 (${took} s; pids $before-> $after)" \
        eval '[ $rc = 0 ] && [ "$gens" = "2 2" ] && disjoint "$before" "$after"'
    touch "$d/root/srv/app/broken"
    rc=0
    t=$(now)
    $E systemctl reload reuseport-cluster@web >/dev/null 2>&1 || rc=$?
    took=$(since "$t")
    rm "$d/root/srv/app/broken"
    # Not a pass/fail check: what notify-reload reports for a rolled-back deploy, for the docs.
    echo "note    $S: a broken deploy: systemctl reload exit $rc after ${took} s, ReloadResult=$(show ReloadResult), generations $(generations)"
    $E systemctl stop reuseport-cluster@web
    rm "$d/root/etc/systemd/system/reuseport-cluster@web.service.d/notify-reload.conf"
}

# ---------------------------------------------------------------- Docker
docker_test() {
    DOCKER_EXEC_ROOT=/run/rct-docker-$$
    local sock=$DOCKER_EXEC_ROOT.sock
    dockerd --data-root "$CACHE/docker" --exec-root "$DOCKER_EXEC_ROOT" --pidfile "$WORK/dockerd.pid" \
        -H "unix://$sock" --iptables=false --ip6tables=false --bridge=none >"$WORK/dockerd.log" 2>&1 &
    DOCKERD=$!
    DOCKER="/usr/bin/docker -H unix://$sock"
    if ! poll 60 $DOCKER version; then
        bad "docker: dockerd did not start: $(tail -3 "$WORK/dockerd.log")"; return
    fi
    local version; version=$($DOCKER version -f '{{.Server.Version}}')
    ok "docker: dockerd $version started"
    # The runtime stage's base image, made here: no registry is reachable.
    local base; base=$(awk '/^FROM / { b = $2 } END { print b }' deploy/Dockerfile)
    if ! $DOCKER image inspect "$base" >/dev/null 2>&1; then
        tar -C "$CACHE/rootfs-252" -c . | $DOCKER import - "$base" >/dev/null
    fi
    # The Dockerfile's runtime stage as written, with the binary of the build stage taken
    # from target/release instead (the build stage's rust image is not reachable either).
    local ctx=$WORK/docker-context
    mkdir -p "$ctx"
    cp "$BIN" "$ctx/reuseport-cluster"
    awk '/^FROM / { stage = "" } { stage = stage $0 "\n" } END { printf "%s", stage }' deploy/Dockerfile \
        | sed 's|^COPY --from=build /src/target/release/reuseport-cluster |COPY reuseport-cluster |' \
        > "$ctx/Dockerfile"
    local t; t=$(now)
    if ! $DOCKER build -q -t reuseport-cluster:deploy-test "$ctx" >"$WORK/docker-build.log" 2>&1; then
        bad "docker: build of the runtime stage: $(tail -3 "$WORK/docker-build.log")"; return
    fi
    ok "docker: built the runtime stage on $base ($(since "$t") s)"

    local c=rct-$$
    $DOCKER run -d --name "$c" --network none reuseport-cluster:deploy-test >/dev/null
    local hp; hp=$($DOCKER inspect -f '{{.State.Pid}}' "$c")
    local curl="nsenter -t $hp -n curl -s -m 2 http://127.0.0.1:8000/"
    poll 20 $curl || true
    dstatus() { $DOCKER exec "$c" reuseport-cluster status --control /tmp/reuseport-cluster.sock --json; }
    dgens() { dstatus | python3 -c 'import json,sys; print(" ".join(str(w["generation"]) for w in json.load(sys.stdin)["workers"]))'; }
    check "docker: the master is PID 1 of the container, as uid 65534, and a worker answers" \
        eval '[ "$(awk "/^NSpid:/ { print \$3 }" /proc/$hp/status)" = 1 ] && [ "$(awk "/^Uid:/ { print \$2 }" /proc/$hp/status)" = 65534 ] && $curl | grep -q hello'
    local g="$(dgens)"
    t=$(now)
    $DOCKER kill -s HUP "$c" >/dev/null
    if poll 30 eval '[ "$(dgens)" = "2 2" ]'; then
        ok "docker: docker kill -s HUP rolled every worker to generation 2 ($g -> 2 2, $(since "$t") s)"
    else
        bad "docker: docker kill -s HUP: generations $(dgens)"
    fi
    # An orphan: its parent exits, so the kernel hands it to PID 1, the master, which must reap it.
    local orphan; orphan=$($DOCKER exec "$c" sh -c 'sleep 600 >/dev/null 2>&1 & echo $!')
    local ppid; ppid=$($DOCKER exec "$c" awk '/^PPid:/ { print $2 }' "/proc/$orphan/status")
    $DOCKER exec "$c" kill "$orphan"
    if [ "$ppid" = 1 ] && poll 5 eval '! $DOCKER exec "$c" test -e /proc/$orphan'; then
        ok "docker: an orphan adopted by the master (PPid $ppid) is reaped when it exits"
    else
        bad "docker: orphan $orphan (PPid $ppid): $($DOCKER exec "$c" cat /proc/"$orphan"/stat 2>&1)"
    fi
    t=$(now)
    $DOCKER stop "$c" >/dev/null
    local took; took=$(since "$t")
    local code; code=$($DOCKER inspect -f '{{.State.ExitCode}}' "$c")
    check "docker: docker stop: exit $code in ${took} s (Docker's default stop timeout 10 s, CMD --grace 8s)" \
        eval '[ "$code" = 0 ] && lt "$took" 10'
    $DOCKER rm "$c" >/dev/null
    # An app that ignores SIGTERM: the master SIGKILLs it when --grace ends, before the
    # runtime's stop timeout, and says so with exit 3 (137 would mean Docker killed the master).
    $DOCKER run -d --name "$c" --network none --stop-timeout 4 reuseport-cluster:deploy-test \
        --bind 127.0.0.1:8000 --workers 2 --grace 2s --ready delay:100ms --control /tmp/rc.sock \
        -- sh -c 'trap "" TERM; while :; do sleep 1; done' >/dev/null
    poll 10 $DOCKER exec "$c" reuseport-cluster status --control /tmp/rc.sock || true
    t=$(now)
    $DOCKER stop "$c" >/dev/null
    took=$(since "$t")
    code=$($DOCKER inspect -f '{{.State.ExitCode}}' "$c")
    check "docker: an app ignoring SIGTERM: the master SIGKILLed it at --grace 2s, exit $code in ${took} s (--stop-timeout 4)" \
        eval '[ "$code" = 3 ] && lt "$took" 4'
    $DOCKER rm "$c" >/dev/null
}

# ---------------------------------------------------------------- Kubernetes
kubernetes_test() {
    local venv=$CACHE/venv-kubernetes-validate
    if [ ! -x "$venv/bin/kubernetes-validate" ]; then
        echo "installing kubernetes-validate into $venv (pip, once)"
        rm -rf "$venv"
        { python3 -m venv "$venv" && "$venv/bin/pip" install -q kubernetes-validate; } >"$WORK/pip.log" 2>&1 \
            || { bad "kubernetes: pip install kubernetes-validate: $(tail -3 "$WORK/pip.log")"; rm -rf "$venv"; return; }
    fi
    local kv=$venv/bin/kubernetes-validate out
    if out=$("$kv" --strict deploy/kubernetes/*.yaml 2>&1); then
        ok "kubernetes: kubernetes-validate --strict accepts deploy/kubernetes/*.yaml ($("$kv" --version 2>/dev/null | tr -d '\n'))"
    else
        bad "kubernetes: kubernetes-validate --strict: $out"
    fi
    # Control: a misspelled field must be rejected, or the check above proves nothing.
    sed 's/terminationGracePeriodSeconds:/terminationGracePeriodSecond:/' deploy/kubernetes/deployment.yaml \
        > "$WORK/typo.yaml"
    if out=$("$kv" --strict "$WORK/typo.yaml" 2>&1); then
        bad "kubernetes: a misspelled field was accepted"
    else
        check "kubernetes: a misspelled field is rejected" grep -q terminationGracePeriodSecond <<<"$out"
    fi
}

start=$(now)
for area in "${AREAS[@]}"; do
    case $area in
        systemd-252|systemd-254) systemd_test "${area#systemd-}" ;;
        docker) docker_test ;;
        kubernetes) kubernetes_test ;;
        *) echo "error: unknown area $area (systemd-252, systemd-254, docker, kubernetes)" >&2; exit 2 ;;
    esac
done
echo "deploy-test took $(since "$start") s"
echo "deploy-test: $PASSED passed, $FAILED failed, $PENDING pending"
[ "$FAILED" = 0 ]
