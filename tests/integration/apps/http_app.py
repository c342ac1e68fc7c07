#!/usr/bin/env python3
# An unmodified-style python3 HTTP app for the tests: it takes fd 3 the systemd way
# (LISTEN_FDS/LISTEN_PID), says READY=1 when it has a NOTIFY_SOCKET, stops gracefully on
# SIGTERM (finishes what it accepted, then closes the socket so queued connections migrate),
# and exits 42 at start when the file $CRASH_MARKER exists (a broken deploy).
import http.server, os, signal, socket, sys, threading

marker = os.environ.get("CRASH_MARKER")
if marker and os.path.exists(marker):
    sys.exit(42)
assert int(os.environ["LISTEN_PID"]) == os.getpid(), "LISTEN_PID is not my pid"
assert os.environ["LISTEN_FDS"] == "1"


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        env = os.environ
        body = "python pid={} worker={} gen={} names={}\n".format(
            os.getpid(), env["REUSEPORT_CLUSTER_WORKER"],
            env["REUSEPORT_CLUSTER_GENERATION"], env["LISTEN_FDNAMES"]).encode()
        self.send_response(200)
        self.send_header("X-Worker", env["REUSEPORT_CLUSTER_WORKER"])
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class Server(http.server.ThreadingHTTPServer):
    # ThreadingHTTPServer makes handler threads daemons, which server_close() does not wait
    # for: a request accepted just before the stop would be cut off when the process exits.
    daemon_threads = False

    def server_bind(self):
        pass  # fd 3 is bound already

    def server_activate(self):
        pass  # and listening


server = Server(("", 0), Handler, bind_and_activate=False)
server.socket.close()
server.socket = socket.socket(fileno=3)
signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
addr = os.environ.get("NOTIFY_SOCKET")
if addr:
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.connect("\0" + addr[1:] if addr.startswith("@") else addr)
    notify.send(b"READY=1")
server.serve_forever()
server.server_close()  # closes the socket (queued connections migrate), joins handlers
