// The hello app as its author would write it for any launcher: it binds its port, has no
// SIGTERM handler and knows nothing of LISTEN_FDS. benches/compare.rs runs it unchanged
// under node, the cluster module, PM2 and reuseport-cluster (whose preload maps the listen
// to the worker's socket).
require('./hello')().listen(Number(process.env.PORT || 8000), '127.0.0.1', 1024);
