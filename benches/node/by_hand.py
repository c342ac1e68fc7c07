#!/usr/bin/env python3
"""N node processes started by hand, each with its own SO_REUSEPORT socket as fd 3 and
pinned to one CPU: what reuseport-cluster does, without it (the ceiling for our design).

    by_hand.py PORT N APP.js [CPU ...]
"""
import os, signal, socket, subprocess, sys

port, n, app = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
cpus = [int(c) for c in sys.argv[4:]] or sorted(os.sched_getaffinity(0))
children = []
for i in range(n):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("127.0.0.1", port))
    s.listen(1024)

    # Python makes sockets close-on-exec; the first one may already be fd 3.
    os.set_inheritable(s.fileno(), True)

    def child_setup(fd=s.fileno(), cpu=cpus[i % len(cpus)]):
        if fd != 3:
            os.dup2(fd, 3)  # the copy at fd 3 is inheritable
        os.sched_setaffinity(0, {cpu})

    env = dict(os.environ, LISTEN_FDS="1")
    children.append(subprocess.Popen(["node", app], preexec_fn=child_setup, env=env, close_fds=False))
    s.close()


def stop(*_):
    for c in children:
        c.send_signal(signal.SIGTERM)


signal.signal(signal.SIGTERM, stop)
signal.signal(signal.SIGINT, stop)
for c in children:
    c.wait()
