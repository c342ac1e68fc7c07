// Node's cluster module with round-robin scheduling: the primary accepts every connection
// and hands it to a worker (the design reuseport-cluster replaces). WORKERS workers.
// APP: the worker's script [default: plain.js]; APP=./reuseport.js is the cluster module
// with reusePort (Node 22.12+), each worker on its own SO_REUSEPORT socket.
const cluster = require('cluster');
// NODE_CLUSTER_SCHED_POLICY=none: the workers share the listening socket instead.
if (process.env.NODE_CLUSTER_SCHED_POLICY !== 'none') cluster.schedulingPolicy = cluster.SCHED_RR;
if (cluster.isPrimary) {
  const n = Number(process.env.WORKERS || 1);
  for (let i = 0; i < n; i++) cluster.fork();
  process.on('SIGTERM', () => {
    for (const id in cluster.workers) cluster.workers[id].kill('SIGTERM');
    cluster.disconnect(() => process.exit(0));
  });
} else {
  require(process.env.APP || './plain.js');
}
