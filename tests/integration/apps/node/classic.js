// The classic script of Node's cluster guide: the primary forks one worker per CPU and
// re-forks the dead; each worker serves the port.
const cluster = require('cluster');
const http = require('http');
const os = require('os');
const cpus = os.availableParallelism ? os.availableParallelism() : os.cpus().length;
if (cluster.isMaster) {
  console.log(`Primary ${process.pid} is running`);
  for (let i = 0; i < cpus; i++) cluster.fork();
  cluster.on('exit', (worker) => {
    console.log(`worker ${worker.process.pid} died`);
    cluster.fork();
  });
} else {
  http.createServer((req, res) => {
    if (req.url === '/slow') {
      setTimeout(() => res.end(`slow answer from pid ${process.pid}\n`), Number(process.env.SLOW_MS || 1500));
      return;
    }
    res.writeHead(200);
    res.end(`hello from pid ${process.pid} (cluster worker ${cluster.worker.id})\n`);
  }).listen(process.env.PORT);
  console.log(`Worker ${process.pid} started`);
}
