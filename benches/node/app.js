// The hello app of benches/compare.rs's by-hand launcher (and the steering bench): the
// socket from LISTEN_FDS (fd 3) when set, else its own on PORT.
const http = require('http');
const body = `hello from ${process.pid}\n`;
const server = http.createServer((req, res) => {
  res.writeHead(200, {
    'Content-Type': 'text/plain',
    'Content-Length': Buffer.byteLength(body),
    'X-Pid': String(process.pid),
  });
  res.end(body);
});
server.keepAliveTimeout = 65000;
if (process.env.LISTEN_FDS) {
  // Pass the backlog: without one, node calls listen() again with 511.
  server.listen({ fd: 3 }, 1024);
} else {
  server.listen(Number(process.env.PORT || 8000), '127.0.0.1', 1024);
}
// Stop accepting, finish what was accepted, exit.
process.on('SIGTERM', () => server.close(() => process.exit(0)));
