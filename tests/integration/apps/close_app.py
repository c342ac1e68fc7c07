#!/usr/bin/env python3
# A python3 HTTP app that, like many real servers, closes its listening socket (fd 3) at
# once on SIGTERM without accepting what is queued on it, then finishes the requests it
# accepted and exits. Env: SHUTDOWN_ON_STOP=1 calls shutdown(2) on the listener first (which
# ends the socket for every process that holds it); INLINE=1 serves one request at a time;
# DELAY_MS=N takes that long per request; CRASH_MARKER=path exits 1 at start when it exists;
# LEAK_MB=N keeps N MB per request (a leak, for --max-memory).
import os, selectors, signal, socket, sys, threading, time

marker = os.environ.get("CRASH_MARKER")
if marker and os.path.exists(marker):
    sys.exit(1)
assert int(os.environ["LISTEN_PID"]) == os.getpid()
listener = socket.socket(fileno=3)
listener.setblocking(False)
delay = int(os.environ.get("DELAY_MS", "0")) / 1000
inline = os.environ.get("INLINE") == "1"
leak_mb = int(os.environ.get("LEAK_MB", "0"))
leaked = []
body = "pid={} worker={} gen={}\n".format(
    os.getpid(), os.environ["REUSEPORT_CLUSTER_WORKER"],
    os.environ["REUSEPORT_CLUSTER_GENERATION"]).encode()
stop = False


def on_term(*_):
    global stop
    stop = True


signal.signal(signal.SIGTERM, on_term)


def handle(conn):
    try:
        conn.settimeout(10)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(4096)
            if not chunk:
                return
            data += chunk
        if delay:
            time.sleep(delay)
        if leak_mb:
            leaked.append(bytearray(b"x" * (leak_mb << 20)))
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nX-Worker: %s\r\n"
                     b"Connection: close\r\n\r\n%s" % (
                         len(body), os.environ["REUSEPORT_CLUSTER_WORKER"].encode(), body))
    except OSError:
        pass
    finally:
        conn.close()


sel = selectors.DefaultSelector()
sel.register(listener, selectors.EVENT_READ)
threads = []
while not stop:
    for _ in sel.select(timeout=0.05):
        try:
            conn, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            continue
        conn.setblocking(True)
        if inline:
            handle(conn)
        else:
            t = threading.Thread(target=handle, args=(conn,))
            t.start()
            threads.append(t)
if os.environ.get("SHUTDOWN_ON_STOP") == "1":
    listener.shutdown(socket.SHUT_RDWR)
listener.close()
for t in threads:
    t.join()
