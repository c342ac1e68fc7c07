// fastify on the launcher's socket (fd 3): fastify serves on a server it is handed. On
// SIGTERM the server stops accepting and closes idle keep-alive connections; fastify's own
// app.close() would answer 503 to every request until its connections are gone.
const http = require("http");
let handler;
const server = http.createServer((req, res) => handler(req, res));
const app = require("fastify")({ serverFactory: (h) => { handler = h; return server; } });
app.get("/", async () => `hello from pid ${process.pid}\n`);
app.ready().then(() => server.listen({ fd: 3 }));
process.on("SIGTERM", () => { server.close(); server.closeIdleConnections(); });
