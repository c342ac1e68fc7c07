// An ES module, with named imports from node:cluster.
import http from 'node:http';
import { isPrimary, isWorker } from 'node:cluster';
const server = http.createServer((req, res) => {
  if (req.url === '/slow') {
    setTimeout(() => res.end(`slow answer from pid ${process.pid}\n`), Number(process.env.SLOW_MS || 1500));
    return;
  }
  res.end(`hello from pid ${process.pid} primary=${isPrimary} worker=${isWorker}\n`);
});
server.listen({ port: Number(process.env.PORT), host: '127.0.0.1' });
