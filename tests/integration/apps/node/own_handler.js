// An app with its own SIGTERM handler: the launcher's preload must leave the stop to it.
const http = require('http');
const server = http.createServer((req, res) => res.end(`hello from pid ${process.pid}\n`));
server.listen(process.env.PORT);
process.on('SIGTERM', () => {
  console.log(`app handler called in pid ${process.pid}`);
  server.close(() => process.exit(0));
  server.closeIdleConnections();
});
