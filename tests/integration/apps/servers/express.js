// express on the launcher's socket (fd 3); drains on SIGTERM.
const express = require("express");
const app = express();
app.get("/", (req, res) => res.send(`hello from pid ${process.pid}\n`));
const server = app.listen({ fd: 3 });
process.on("SIGTERM", () => { server.close(); server.closeIdleConnections(); });
