// A Node http app that calls server.close() on SIGTERM: it stops accepting, closes its
// listening socket and idle keep-alive connections, and exits once the requests in flight
// are answered (what most Node apps do).
const http = require("http");
const worker = process.env.REUSEPORT_CLUSTER_WORKER;
const server = http.createServer((req, res) => {
  res.setHeader("X-Worker", worker);
  res.end(`node pid=${process.pid} worker=${worker}\n`);
});
server.keepAliveTimeout = 5000;
server.listen({ fd: 3 });
process.on("SIGTERM", () => server.close(() => process.exit(0)));
