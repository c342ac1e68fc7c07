// plain.js with Node's one-line change for the cluster module without a primary on the data
// path (Node 22.12+): each cluster worker binds its own SO_REUSEPORT socket.
require('./hello')().listen({
  port: Number(process.env.PORT || 8000), host: '127.0.0.1', backlog: 1024, reusePort: true,
});
