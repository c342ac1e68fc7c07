#!/usr/bin/env python3
"""What listen(2) costs on a socket that listened before, against the sockets bound to its port.

An evacuation (sockets/slots.rs) shuts a stalled worker's listening socket down and calls
listen(2) on it again. The kernel then checks that socket against every socket bound to the
port (established and TIME_WAIT ones included) with the port's bind lock held; a socket that
never listened, in a port whose sockets all have SO_REUSEPORT, skips the check. This script
measures both, with N established connections or N TIME_WAIT sockets (closed by the server
first) on the port, in a network namespace of its own (root; net.ipv4.tcp_migrate_req=1 there
keeps a stopped socket in its group, as the steering program's migrate hook does).

Usage: scripts/measure-relisten.py [N ...]   (default: 1000 8000 25000; N established is
capped by the open-file limit, two descriptors per connection)
"""
import os
import resource
import socket
import subprocess
import sys
import time

PORT = 9000


def listener():
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("127.0.0.1", PORT))
    s.listen(4096)
    s.setblocking(False)
    return s


def drain(listeners, into):
    for l in listeners:
        try:
            while True:
                into.append(l.accept()[0])
        except BlockingIOError:
            pass


def measure(n, mode):
    a, b = listener(), listener()
    clients, servers = [], []
    for _ in range(n):
        c = socket.socket()
        c.connect(("127.0.0.1", PORT))
        clients.append(c)
        drain((a, b), servers)
        if mode == "time-wait" and len(clients) >= 1000:
            for s in servers:  # the server closes first: its side goes to TIME_WAIT
                s.close()
            time.sleep(0.05)
            for c in clients:
                c.close()
            clients, servers = [], []
    drain((a, b), servers)
    bound = sum(1 for _ in open("/proc/net/tcp")) - 1
    relisten = []
    for _ in range(21):
        b.shutdown(socket.SHUT_RD)
        t = time.perf_counter()
        b.listen(4096)
        relisten.append((time.perf_counter() - t) * 1e3)
    fresh = []
    for _ in range(21):
        t = time.perf_counter()
        f = listener()
        fresh.append((time.perf_counter() - t) * 1e3)
        f.close()
    relisten.sort()
    fresh.sort()
    print(
        f"| {n} | {mode} | {bound} | {relisten[10]:.3f} ({relisten[0]:.3f}-{relisten[-1]:.3f}) "
        f"| {fresh[10]:.3f} |",
        flush=True,
    )
    for s in clients + servers + [a, b]:
        s.close()


def main():
    if os.environ.get("RELISTEN_IN_NETNS") == "1":
        measure(int(sys.argv[1]), sys.argv[2])
        return
    if os.geteuid() != 0:
        sys.exit("measure-relisten: needs root (a network namespace of its own per row)")
    sizes = [int(x) for x in sys.argv[1:]] or [1000, 8000, 25000]
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    print("| N | sockets | lines of /proc/net/tcp | listen(2) again, ms: median (min-max of 21) | bind + listen of a fresh socket, ms |")
    print("|---|---|---|---|---|", flush=True)
    cmd = "ip link set lo up && sysctl -qw net.ipv4.tcp_migrate_req=1 && exec \"$0\" \"$@\""
    env = dict(os.environ, RELISTEN_IN_NETNS="1")
    for n in sizes:
        for mode in ("established", "time-wait"):
            if mode == "established" and 2 * n + 64 > limit:
                print(f"| {n} | established | skipped: {2 * n} descriptors, the limit is {limit} | | |")
                continue
            args = ["unshare", "-n", "sh", "-c", cmd, sys.executable, __file__, str(n), mode]
            if subprocess.run(args, env=env).returncode != 0:
                sys.exit(f"measure-relisten: {n} {mode} failed")


if __name__ == "__main__":
    main()
