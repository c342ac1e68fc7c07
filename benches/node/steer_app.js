// benches/steering.rs's app: the hello app (fd 3 from LISTEN_FDS, else its own socket on
// PORT, or a Node cluster worker), with SLOW_PERMILLE of every 1000 requests blocking the
// whole process for SLOW_MS (a synchronous handler), and, with COUNT_DIR, its request count
// written to COUNT_DIR/<pid> every 200 ms.
const http = require('http');
const fs = require('fs');
const body = `hello from ${process.pid}\n`;
const slowPermille = Number(process.env.SLOW_PERMILLE || 0);
const slowMs = Number(process.env.SLOW_MS || 200);
const blocker = new Int32Array(new SharedArrayBuffer(4));
let count = 0;
const server = http.createServer((req, res) => {
  count++;
  if (slowPermille > 0 && Math.random() * 1000 < slowPermille) {
    Atomics.wait(blocker, 0, 0, slowMs); // blocks the event loop, as a synchronous handler does
  }
  res.writeHead(200, {
    'Content-Type': 'text/plain',
    'Content-Length': Buffer.byteLength(body),
    'X-Pid': String(process.pid),
  });
  res.end(body);
});
server.keepAliveTimeout = 65000;
if (process.env.COUNT_DIR) {
  setInterval(() => fs.writeFileSync(`${process.env.COUNT_DIR}/${process.pid}`, String(count)), 200).unref();
}
if (process.env.LISTEN_FDS) {
  server.listen({ fd: 3 }, 1024);
} else {
  server.listen(Number(process.env.PORT || 8000), '127.0.0.1', 1024);
}
process.on('SIGTERM', () => server.close(() => process.exit(0)));
