// The app from Node's http guide, unchanged but for the port, taken from argv: it binds the
// port itself, has no SIGTERM handler and knows nothing of the launcher.
const http = require('http');
const port = Number(process.argv[2]);
http.createServer((req, res) => {
  if (req.url === '/slow') {
    setTimeout(() => res.end(`slow answer from pid ${process.pid}\n`), Number(process.env.SLOW_MS || 1500));
    return;
  }
  res.end(`hello from pid ${process.pid}\n`);
}).listen(port, () => console.log(`listening on ${port}`));
