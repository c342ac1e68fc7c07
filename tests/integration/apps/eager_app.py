#!/usr/bin/env python3
# A python3 HTTP app that stops the way uvicorn does: it accepts eagerly (every queued
# connection, each time the listener is readable) into one event loop, reads requests when
# they arrive, and on SIGTERM stops accepting, finishes the requests it has read, and
# closes the connections it accepted but has not read a request from yet. Env: DELAY_MS=N
# takes that long per request (inline, like a blocking handler); MAX_OPEN=N stops accepting
# while N connections are open (like Puma with every thread held by a keep-alive client);
# LINGER_MS=N keeps the listener open that long after SIGTERM before it closes (Puma keeps it
# until its threads are done). GET /sleep/MS blocks the process MS ms (a synchronous handler).
import os, selectors, signal, socket, time

assert int(os.environ["LISTEN_PID"]) == os.getpid()
listener = socket.socket(fileno=3)
listener.setblocking(False)
delay = int(os.environ.get("DELAY_MS", "0")) / 1000
max_open = int(os.environ.get("MAX_OPEN", "0"))
worker = os.environ["REUSEPORT_CLUSTER_WORKER"]
body = "pid={} worker={}\n".format(os.getpid(), worker).encode()
stop = False


def on_term(*_):
    global stop
    stop = True


signal.signal(signal.SIGTERM, on_term)
sel = selectors.DefaultSelector()
sel.register(listener, selectors.EVENT_READ)
buffers = {}


def serve(conn):
    data = buffers[conn]
    try:
        chunk = conn.recv(4096)
    except OSError:
        chunk = b""
    if not chunk:
        sel.unregister(conn)
        del buffers[conn]
        conn.close()
        return
    data += chunk
    buffers[conn] = data
    if b"\r\n\r\n" not in data:
        return
    if delay:
        time.sleep(delay)
    if data.startswith(b"GET /sleep/"):  # GET /sleep/MS blocks the whole process MS ms
        time.sleep(int(data.split(b" ")[1].split(b"/")[2]) / 1000)
    try:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nX-Worker: %s\r\n"
                     b"Connection: close\r\n\r\n%s" % (len(body), worker.encode(), body))
    except OSError:
        pass
    sel.unregister(conn)
    del buffers[conn]
    conn.close()


accepting = True
while not stop:
    full = max_open and len(buffers) >= max_open
    if full and accepting:
        sel.unregister(listener)
        accepting = False
    elif not full and not accepting:
        sel.register(listener, selectors.EVENT_READ)
        accepting = True
    for key, _ in sel.select(timeout=0.05):
        if stop:
            break
        if key.fileobj is listener:
            while not (max_open and len(buffers) >= max_open):
                try:
                    conn, _ = listener.accept()
                except (BlockingIOError, InterruptedError):
                    break
                conn.setblocking(False)
                buffers[conn] = b""
                sel.register(conn, selectors.EVENT_READ)
        elif key.fileobj in buffers:
            serve(key.fileobj)
if accepting:
    sel.unregister(listener)
time.sleep(int(os.environ.get("LINGER_MS", "0")) / 1000)
listener.close()
# Like uvicorn's shutdown: connections with no request read yet are closed at once.
for conn in list(buffers):
    conn.close()
