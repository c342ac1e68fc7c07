// plain.js with Node's one-line change for the cluster module without a primary on the data
// path (Node 22.12+): each cluster worker binds its own SO_REUSEPORT socket.
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
server.listen({ port: Number(process.env.PORT || 8000), host: '127.0.0.1', backlog: 1024, reusePort: true });
