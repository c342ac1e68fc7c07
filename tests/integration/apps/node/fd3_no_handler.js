// Serves fd 3 itself but has no SIGTERM handler (Node's default: die at once).
const http = require('http');
http.createServer((req, res) => {
  console.log(`request ${req.url}`);
  setTimeout(() => res.end(`slow answer from pid ${process.pid}\n`), req.url === '/slow' ? 1500 : 0);
}).listen({ fd: 3 }, 1024);
