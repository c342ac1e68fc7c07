// The hello server of benches/compare.rs: every launcher's app is this server, listening
// the way that launcher needs (plain.js, reuseport.js, app.js).
const http = require('http');

module.exports = function hello() {
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
  return server;
};
