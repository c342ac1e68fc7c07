'use strict';
// reuseport-cluster's Node preload, loaded into every Node process of a worker with
// NODE_OPTIONS=--require (src/node/mod.rs writes this file and sets the environment).
//
// In the one process of the worker the sockets are meant for, it:
//  1. makes net.Server#listen on a --bind's port serve the socket the launcher gave the
//     worker (fd 3, 4, ...) instead of binding the port again (which fails: EADDRINUSE);
//  2. makes the cluster module say this is a worker (isPrimary false, isWorker true), so an
//     app written for cluster.fork() runs its worker branch: the launcher forks and restarts;
//  3. on the stop signal, unless the app handles that signal itself, stops accepting, lets
//     the requests in flight finish (each answered with Connection: close) and exits 0;
//  4. tells the master the moment every socket is listened on (readiness, no /proc scan).
// Every other process (a wrapper such as npm, a child the app forks) is left untouched.
// Plain CommonJS for Node 18 to 26. Before the stop signal it costs one listener call per
// connection (to find the idle ones at the stop) and nothing per request.
(function reuseportClusterPreload() {
  const env = process.env;
  const spec = env.REUSEPORT_CLUSTER_NODE_FDS;
  if (!spec) return;
  const me = String(process.pid);
  // Without a wrapper the worker's own process (LISTEN_PID) owns the sockets. Under a
  // wrapper (npm start, npx, yarn, pnpm, tsx) the worker's process is the wrapper, and the
  // owner is the first Node process it starts on each branch of its tree: the owner marks
  // the environment its own children inherit.
  const wrapped = env.REUSEPORT_CLUSTER_NODE_WRAPPER === '1';
  if (wrapped && env.LISTEN_PID === me && !env.REUSEPORT_CLUSTER_NODE_OWNER) {
    passSocketsOn(spec);
    return;
  }
  const owner = wrapped
    ? env.LISTEN_PID !== me && !env.REUSEPORT_CLUSTER_NODE_OWNER
    : env.LISTEN_PID === me && !env.REUSEPORT_CLUSTER_NODE_OWNER;
  if (!owner) return;
  env.REUSEPORT_CLUSTER_NODE_OWNER = me;

  const net = require('net');
  const slot = Number(env.REUSEPORT_CLUSTER_WORKER || 0);
  const say = (line) => process.stderr.write(`reuseport-cluster: worker ${slot} (pid ${me}): ${line}\n`);
  const binds = parseBinds(spec);
  if (binds === null) {
    say(`REUSEPORT_CLUSTER_NODE_FDS=${spec} is not fd=host:port,...; listen() is left as Node has it`);
    return;
  }
  const backlog = Number(env.REUSEPORT_CLUSTER_BACKLOG) || undefined;
  const ours = new Map(binds.map((b) => [b.fd, b]));
  const served = new Map(); // fd -> the server listening on it
  const closed = new Set(); // fds whose socket this process closed (server.close())
  const listening = new Set();
  const warned = new Set();

  // 2. The cluster module. Its primary half is loaded (NODE_UNIQUE_ID is unset: there is no
  // IPC channel to a primary), then told it is a worker. net and dgram ask the primary for
  // a handle when isPrimary is false and the listen is not exclusive, so every listen and
  // bind below is made exclusive, and isPrimary is true for the length of each call.
  const cluster = require('cluster');
  const worker = new (require('events'))();
  Object.assign(worker, {
    id: slot + 1,
    process,
    state: 'online',
    exitedAfterDisconnect: false,
    isConnected: () => false,
    isDead: () => false,
    send: () => false,
    kill: (signal) => process.kill(process.pid, signal || 'SIGTERM'),
    disconnect: () => stop(),
  });
  cluster.isPrimary = false;
  cluster.isMaster = false;
  cluster.isWorker = true;
  cluster.worker = worker;
  cluster.fork = () => {
    throw new Error('reuseport-cluster: cluster.fork() is the launcher\'s job here: '
      + '--workers N runs N copies of this app and restarts them');
  };
  try { require('module').syncBuiltinESMExports(); } catch (_) { /* Node < 12 */ }
  const asPrimary = (fn) => {
    cluster.isPrimary = true;
    cluster.isMaster = true;
    try { return fn(); } finally { cluster.isPrimary = false; cluster.isMaster = false; }
  };

  // 1. listen().
  const listen = net.Server.prototype.listen;
  net.Server.prototype.listen = function reuseportClusterListen(...args) {
    const call = parseListen(args);
    if (call.fd !== undefined && ours.has(call.fd)) return serve(this, ours.get(call.fd), call);
    if (call.port === undefined) return asPrimary(() => listen.apply(this, call.exclusive));
    const matches = binds.filter((b) => b.port === call.port);
    if (matches.length === 0) {
      if (!warned.has(call.port)) {
        warned.add(call.port);
        say(`listen on port ${call.port}, which no --bind has (${describe(binds)}): that port is `
          + 'this process\'s own, not shared by the workers (a second worker listening on it '
          + `gets EADDRINUSE); listen on ${binds[0].port} or add --bind HOST:${call.port}`);
      }
      return asPrimary(() => listen.apply(this, call.exclusive));
    }
    const bind = pick(matches, call.host);
    if (typeof bind === 'string') return fail(this, bind, call.port);
    return serve(this, bind, call);
  };

  function serve(server, bind, call) {
    if (closed.has(bind.fd)) {
      return fail(server, `port ${bind.port}: this process closed the launcher's socket `
        + `(fd ${bind.fd}) with server.close(); it cannot be listened on again until the `
        + 'worker restarts', bind.port);
    }
    const other = served.get(bind.fd);
    if (other && other !== server) {
      return fail(server, `port ${bind.port} is already served by another server of this `
        + `process (fd ${bind.fd}); one server per --bind in a worker`, bind.port);
    }
    served.set(bind.fd, server);
    track(server);
    server.once('listening', () => {
      listening.add(bind.fd);
      if (listening.size === binds.length) ready();
    });
    server.once('close', () => {
      if (served.get(bind.fd) === server) {
        served.delete(bind.fd);
        closed.add(bind.fd);
      }
    });
    const options = { fd: bind.fd, backlog: backlog || call.backlog, exclusive: true };
    if (call.signal) options.signal = call.signal;
    const args = call.callback ? [options, call.callback] : [options];
    return asPrimary(() => listen.apply(server, args));
  }

  function fail(server, message, port) {
    const err = new Error(`reuseport-cluster: ${message}`);
    err.code = 'EADDRINUSE';
    err.port = port;
    process.nextTick(() => server.emit('error', err));
    return server;
  }

  // dgram: a bind in a cluster worker asks the primary unless exclusive.
  try {
    const dgram = require('dgram');
    const bind = dgram.Socket.prototype.bind;
    dgram.Socket.prototype.bind = function reuseportClusterBind(...args) {
      let a = args;
      if (args[0] !== null && typeof args[0] === 'object') {
        a = [{ ...args[0], exclusive: true }, ...args.slice(1)];
      } else {
        const cb = typeof args[args.length - 1] === 'function' ? args[args.length - 1] : undefined;
        const options = { port: args[0], exclusive: true };
        if (typeof args[1] === 'string') options.address = args[1];
        a = cb ? [options, cb] : [options];
      }
      return asPrimary(() => bind.apply(this, a));
    };
  } catch (_) { /* no dgram */ }

  // 4. Readiness: a connection to the master's ready socket (a unix stream socket); the
  // kernel tells the master which pid connected. Nothing is sent.
  function ready() {
    const name = env.REUSEPORT_CLUSTER_READY_SOCKET;
    if (!name || ready.sent) return;
    ready.sent = true;
    const socket = net.connect({ path: name });
    socket.on('connect', () => socket.destroy());
    socket.on('error', (e) => say(`could not tell the master this worker is ready (${e.code || e.message}); it looks in /proc instead`));
    socket.unref();
  }

  // 3. The stop signal. A listener stands in for Node's default (die at once); it does
  // nothing when the app listens for that signal too.
  const signal = env.REUSEPORT_CLUSTER_STOP_SIGNAL || 'SIGTERM';
  // How long an idle keep-alive connection may still bring a request after the stop
  // signal: a client that is sending gets its answer (with Connection: close); one that
  // is idle is closed after this.
  const IDLE_GRACE_MS = 250;
  const connections = new Map(); // server -> Set of its sockets
  let stopping = false;
  const onSignal = () => {
    if (process.listenerCount(signal) > 1) return; // the app's own handler decides
    stop();
  };
  try { process.on(signal, onSignal); } catch (_) { /* not a signal Node can listen for */ }

  function track(server) {
    if (connections.has(server)) return;
    const set = new Set();
    connections.set(server, set);
    // An https server's requests arrive on the TLS socket, not the TCP one under it.
    const event = typeof server.addContext === 'function' ? 'secureConnection' : 'connection';
    server.on(event, (socket) => {
      set.add(socket);
      socket.once('close', () => set.delete(socket));
    });
  }

  function stop() {
    if (stopping) return;
    stopping = true;
    const servers = [...new Set(served.values())];
    if (servers.length === 0) {
      // Nothing to drain: die of the signal as Node would have.
      process.removeListener(signal, onSignal);
      process.kill(process.pid, signal);
      return;
    }
    let open = servers.length;
    const done = () => { if (--open === 0) process.exit(0); };
    for (const server of servers) {
      // net's close, not http's: http's also destroys every idle connection at once,
      // including one whose request has arrived but is not read yet.
      net.Server.prototype.close.call(server, done);
      if (!isHttp(server)) continue;
      server.prependListener('request', (req, res) => { res.shouldKeepAlive = false; });
      for (const socket of connections.get(server) || []) closeAfterResponse(socket);
    }
  }

  // HTTP/1: its connections are closed here once their answers are out. HTTP/2 sessions
  // are left to end as their streams do.
  function isHttp(server) {
    if (/^Http2/.test(server.constructor && server.constructor.name)) return false;
    return typeof server.closeIdleConnections === 'function' || server.listenerCount('request') > 0;
  }

  // A connection is closed once it has no request in flight: an answer under way gets
  // Connection: close, or the connection closes after it; an idle one is given
  // IDLE_GRACE_MS for a request already on its way.
  function closeAfterResponse(socket) {
    const res = socket._httpMessage;
    if (res && !res.finished) {
      if (!res.headersSent) {
        res.shouldKeepAlive = false;
        return; // Node closes the connection after this answer
      }
      res.once('finish', () => setImmediate(() => closeAfterResponse(socket)));
      return;
    }
    const timer = setTimeout(() => {
      if (socket._httpMessage && !socket._httpMessage.finished) closeAfterResponse(socket);
      else socket.destroy();
    }, IDLE_GRACE_MS);
    timer.unref();
    socket.once('close', () => clearTimeout(timer));
  }

  // A wrapper's children get fds 0-2 only, as Node spawns them: the wrapper (npm, tsx…)
  // hands its children the sockets too, after the stdio they ask for (tsx's IPC channel
  // takes fd 3), and tells them at which fds.
  function passSocketsOn(text) {
    const fds = text.split(',').map((part) => part.split('='));
    if (!fds.every(([fd, addr]) => /^\d+$/.test(fd) && addr)) return;
    const { ChildProcess } = require('child_process');
    const spawn = ChildProcess.prototype.spawn;
    ChildProcess.prototype.spawn = function reuseportClusterSpawn(options) {
      const pairs = options && options.envPairs;
      if (Array.isArray(pairs) && pairs.some((p) => p.startsWith('REUSEPORT_CLUSTER_NODE_FDS='))) {
        let stdio = options.stdio || 'pipe';
        stdio = typeof stdio === 'string' ? [stdio, stdio, stdio] : stdio.slice();
        while (stdio.length < 3) stdio.push(undefined);
        const moved = fds.map(([fd, addr]) => {
          const at = stdio.length;
          stdio.push(Number(fd));
          return `${at}=${addr}`;
        });
        const envPairs = pairs.filter((p) => !p.startsWith('REUSEPORT_CLUSTER_NODE_FDS='));
        envPairs.push(`REUSEPORT_CLUSTER_NODE_FDS=${moved.join(',')}`);
        options = { ...options, stdio, envPairs };
      }
      return spawn.call(this, options);
    };
  }

  function parseBinds(text) {
    const out = [];
    for (const part of text.split(',')) {
      const m = /^(\d+)=(?:\[([^\]]+)\]|([^:]+)):(\d+)$/.exec(part);
      if (!m) return null;
      out.push({ fd: Number(m[1]), host: m[2] || m[3], port: Number(m[4]), v6: Boolean(m[2]) });
    }
    return out.length ? out : null;
  }

  function describe(list) {
    return list.map((b) => (b.v6 ? `[${b.host}]:${b.port}` : `${b.host}:${b.port}`)).join(', ');
  }

  // Several binds on one port: the host the app gave picks one.
  function pick(matches, host) {
    if (matches.length === 1) return matches[0];
    const wanted = host === undefined || host === null ? null : String(host).replace(/^\[|\]$/g, '');
    const found = wanted === null ? [] : matches.filter((b) => b.host === wanted
      || (wanted === 'localhost' && (b.host === '127.0.0.1' || b.host === '::1')));
    if (found.length === 1) return found[0];
    return `listen(${matches[0].port}${wanted === null ? '' : `, '${wanted}'`}) matches `
      + `${found.length || matches.length} binds (${describe(found.length ? found : matches)}): `
      + 'pass the host of one of them to listen(), or give one --bind for this port';
  }

  // Node's listen() forms, reduced to what decides the mapping, and the same call made
  // exclusive (so that the cluster module never asks a primary).
  function parseListen(args) {
    const last = args[args.length - 1];
    const callback = typeof last === 'function' ? last : undefined;
    const rest = callback ? args.slice(0, -1) : args;
    const first = rest[0];
    const call = { callback, exclusive: args };
    if (first !== null && typeof first === 'object') {
      if (typeof first.fd === 'number') {
        call.fd = first.fd;
        call.backlog = first.backlog;
        call.signal = first.signal;
        return call;
      }
      if (first.path !== undefined || first._handle || first.handle) return call;
      const port = asPort(first.port);
      call.exclusive = callback ? [{ ...first, exclusive: true }, callback] : [{ ...first, exclusive: true }];
      if (port === undefined) return call;
      call.port = port;
      call.host = first.host;
      call.backlog = first.backlog;
      call.signal = first.signal;
      return call;
    }
    const numeric = first === undefined || first === null || typeof first === 'number'
      || (typeof first === 'string' && first.trim() !== '' && !Number.isNaN(Number(first)));
    if (!numeric) {
      if (typeof first === 'string') {
        // A pipe: listen(path[, backlog][, cb]).
        const options = { path: first, exclusive: true };
        if (typeof rest[1] === 'number') options.backlog = rest[1];
        call.exclusive = callback ? [options, callback] : [options];
      }
      return call;
    }
    const port = asPort(first);
    const options = { port: first === undefined || first === null ? 0 : first, exclusive: true };
    if (typeof rest[1] === 'string') {
      options.host = rest[1];
      if (typeof rest[2] === 'number') options.backlog = rest[2];
    } else if (typeof rest[1] === 'number') {
      options.backlog = rest[1];
    }
    call.exclusive = callback ? [options, callback] : [options];
    if (port === undefined) return call;
    call.port = port;
    call.host = options.host;
    call.backlog = options.backlog;
    return call;
  }

  // A listen port as Node reads it: a number or a numeric string; 0 and none stay Node's.
  function asPort(value) {
    if (typeof value !== 'number' && typeof value !== 'string') return undefined;
    if (typeof value === 'string' && value.trim() === '') return undefined;
    const n = Number(value);
    return Number.isInteger(n) && n > 0 && n < 65536 ? n : undefined;
  }
}());
