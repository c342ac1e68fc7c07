#!/usr/bin/env bash
# Makes (once) and prints the cached Debian 12 root filesystems scripts/deploy-test.sh boots:
#   $CACHE/rootfs-252  debootstrap --variant=minbase bookworm (systemd 252), ~60 s, 260 MB
#   $CACHE/rootfs-254  the same with systemd 254 from bookworm-backports, ~15 s more
# They live outside the clone (CACHE, default /var/cache/reuseport-cluster-test) and are
# never modified by a test, which boots them through an overlay. A directory is only
# renamed into place once complete, so an interrupted run leaves no half rootfs behind.
set -euo pipefail
CACHE=${REUSEPORT_CLUSTER_TEST_CACHE:-/var/cache/reuseport-cluster-test}
mkdir -p "$CACHE"
exec 9>"$CACHE/rootfs.lock"
flock 9

mirror() {
    cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null \
        | grep -vE '^\s*#' | grep -oE 'https?://[^ ]+/debian\b' | grep -v security | head -1 || true
}
MIRROR=$(mirror)
[ -n "$MIRROR" ] || { echo "error: no Debian mirror in /etc/apt/sources.list*" >&2; exit 1; }

if [ ! -d "$CACHE/rootfs-252" ]; then
    echo "making $CACHE/rootfs-252 (debootstrap bookworm, about a minute, once)" >&2
    rm -rf "$CACHE/rootfs-252.tmp"
    debootstrap --variant=minbase \
        --include=systemd,systemd-sysv,dbus,curl,procps,iproute2,passwd \
        bookworm "$CACHE/rootfs-252.tmp" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 \
        || { tail -5 "$CACHE/debootstrap.log" >&2; exit 1; }
    chroot "$CACHE/rootfs-252.tmp" apt-get clean
    mv "$CACHE/rootfs-252.tmp" "$CACHE/rootfs-252"
fi
if [ ! -d "$CACHE/rootfs-254" ]; then
    echo "making $CACHE/rootfs-254 (systemd from bookworm-backports, once)" >&2
    R=$CACHE/rootfs-254.tmp
    rm -rf "$R"
    cp -a "$CACHE/rootfs-252" "$R"
    echo "deb $MIRROR bookworm-backports main" > "$R/etc/apt/sources.list.d/backports.list"
    mount -t proc proc "$R/proc"
    trap 'umount "$R/proc" 2>/dev/null || true' EXIT
    { chroot "$R" apt-get update -qq \
        && DEBIAN_FRONTEND=noninteractive chroot "$R" apt-get install -y -qq -t bookworm-backports systemd systemd-sysv \
        && chroot "$R" apt-get clean; } >"$CACHE/backports.log" 2>&1 \
        || { tail -5 "$CACHE/backports.log" >&2; exit 1; }
    umount "$R/proc"
    trap - EXIT
    mv "$R" "$CACHE/rootfs-254"
fi
echo "$CACHE"
