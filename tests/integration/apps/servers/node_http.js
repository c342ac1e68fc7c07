// Node's http module on the launcher's socket (fd 3); drains on SIGTERM.
const http = require("http");
const server = http.createServer((req, res) => res.end(`hello from pid ${process.pid}\n`));
server.listen({ fd: 3 });
process.on("SIGTERM", () => { server.close(); server.closeIdleConnections(); });
