// The hello app of benches/compare.rs's by-hand launcher, the stalled-worker bench and the
// kill storm's Node run: the socket from LISTEN_FDS (fd 3) when set, else its own on PORT.
const server = require('./hello')();
if (process.env.LISTEN_FDS) {
  // Pass the backlog: without one, node calls listen() again with 511.
  server.listen({ fd: 3 }, 1024);
} else {
  server.listen(Number(process.env.PORT || 8000), '127.0.0.1', 1024);
}
// Stop accepting, finish what was accepted, exit.
process.on('SIGTERM', () => server.close(() => process.exit(0)));
