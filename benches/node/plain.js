// The hello app as its author would write it for any launcher: it binds its port, has no
// SIGTERM handler and knows nothing of LISTEN_FDS. benches/compare.rs runs it unchanged
// under node, the cluster module, PM2 and reuseport-cluster (whose preload maps the listen
// to the worker's socket).
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
server.listen(Number(process.env.PORT || 8000), '127.0.0.1', 1024);
