//! The listening socket each worker opens, and the master's start-up check of every address.
//!
//! [`open`] runs in the forked child between fork and exec, so it only makes syscalls
//! through socket2 and never allocates. The master calls the same code once per bind before
//! any fork ([`reserve`]) so that a port that is taken, privileged or not local is reported
//! as one clear line instead of N identical worker failures; the socket it keeps is bound
//! but never listens, so it takes no connections: it only keeps a port-0 choice stable
//! across worker restarts.

use std::io;
use std::net::SocketAddr;

use anyhow::Context;
use nix::libc;
use socket2::{Domain, SockAddr, Socket, Type};

use crate::cli::Migrate;
use crate::config::Bind;
use crate::log::Level;

/// Options of the listening sockets, as systemd `.socket` units and nginx `listen` have
/// them. Linux copies a listening socket's TCP_NODELAY and keepalive settings into every
/// socket it accepts, so an app that never sets them (uvicorn wraps fd 3 as a unix socket
/// and skips TCP_NODELAY) still gets them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenOptions {
    /// TCP_NODELAY (on by default: Nagle's algorithm and delayed ACKs cost a keep-alive
    /// request/response exchange about 40 ms).
    pub nodelay: bool,
    /// TCP_DEFER_ACCEPT: wake the app only once data arrived, up to this many seconds.
    pub defer_accept: Option<u32>,
    /// TCP_FASTOPEN with this queue length.
    pub fastopen: Option<u32>,
    /// SO_KEEPALIVE, with TCP_KEEPIDLE, TCP_KEEPINTVL and TCP_KEEPCNT when given.
    pub keepalive: Option<Keepalive>,
}

impl Default for ListenOptions {
    fn default() -> Self {
        ListenOptions {
            nodelay: true,
            defer_accept: None,
            fastopen: None,
            keepalive: None,
        }
    }
}

/// TCP keepalive probes; `None` keeps the kernel's default (net.ipv4.tcp_keepalive_*).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Keepalive {
    /// Idle time before the first probe.
    pub idle: Option<std::time::Duration>,
    /// Time between probes.
    pub interval: Option<std::time::Duration>,
    /// Unanswered probes before the connection is dropped.
    pub count: Option<u32>,
}

/// A bind prepared before fork: the sockaddr bytes and the options it needs.
#[derive(Debug, Clone)]
pub struct ListenSpec {
    addr: SockAddr,
    domain: Domain,
    v6only: bool,
    options: Option<ListenOptions>,
}

impl ListenSpec {
    /// Prepares `addr` for [`open`], with no TCP options (the master's reserved socket).
    pub fn new(addr: SocketAddr) -> ListenSpec {
        ListenSpec {
            addr: SockAddr::from(addr),
            domain: Domain::for_address(addr),
            // Lets 0.0.0.0:P and [::]:P be two separate binds of one cluster.
            v6only: addr.is_ipv6(),
            options: None,
        }
    }

    /// The same, with the TCP options of a worker's listening socket.
    pub fn with_options(mut self, options: ListenOptions) -> ListenSpec {
        self.options = Some(options);
        self
    }
}

/// The syscall of [`open`] that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketStep {
    /// socket(2).
    Socket,
    /// setsockopt(2): SO_REUSEADDR, SO_REUSEPORT, IPV6_V6ONLY, the TCP options.
    Options,
    /// bind(2).
    Bind,
    /// listen(2).
    Listen,
}

/// Creates a SO_REUSEADDR + SO_REUSEPORT socket bound to `spec`, listening when `backlog` is
/// given. Close-on-exec and blocking, as systemd passes sockets. Async-signal-safe.
pub fn open(spec: &ListenSpec, backlog: Option<i32>) -> Result<Socket, (SocketStep, io::Error)> {
    let socket =
        Socket::new(spec.domain, Type::STREAM, None).map_err(|e| (SocketStep::Socket, e))?;
    let options = || -> io::Result<()> {
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        if spec.v6only {
            socket.set_only_v6(true)?;
        }
        if let Some(o) = &spec.options {
            set_tcp_options(&socket, o)?;
        }
        Ok(())
    };
    options().map_err(|e| (SocketStep::Options, e))?;
    socket.bind(&spec.addr).map_err(|e| (SocketStep::Bind, e))?;
    if let Some(backlog) = backlog {
        socket
            .listen(backlog)
            .map_err(|e| (SocketStep::Listen, e))?;
    }
    Ok(socket)
}

/// Sets `options` on a TCP socket: plain setsockopt calls, nothing allocated (this runs
/// between fork and exec).
fn set_tcp_options(socket: &Socket, options: &ListenOptions) -> io::Result<()> {
    socket.set_tcp_nodelay(options.nodelay)?;
    if let Some(secs) = options.defer_accept {
        let secs = secs.min(i32::MAX as u32) as i32;
        crate::master::spawn::set_int_option(
            socket,
            libc::IPPROTO_TCP,
            libc::TCP_DEFER_ACCEPT,
            secs,
        )?;
    }
    if let Some(qlen) = options.fastopen {
        let qlen = qlen.min(i32::MAX as u32) as i32;
        crate::master::spawn::set_int_option(socket, libc::IPPROTO_TCP, libc::TCP_FASTOPEN, qlen)?;
    }
    if let Some(k) = options.keepalive {
        socket.set_keepalive(true)?;
        let mut params = socket2::TcpKeepalive::new();
        if let Some(idle) = k.idle {
            params = params.with_time(idle);
        }
        if let Some(interval) = k.interval {
            params = params.with_interval(interval);
        }
        if let Some(count) = k.count {
            params = params.with_retries(count);
        }
        if k != Keepalive::default() {
            socket.set_tcp_keepalive(&params)?;
        }
    }
    Ok(())
}

/// Binds every address once in the master, fills in ports given as 0, and keeps the bound
/// (never listening) sockets so those ports stay ours.
pub fn reserve(binds: &mut [Bind]) -> anyhow::Result<Vec<Socket>> {
    let mut kept = Vec::with_capacity(binds.len());
    for bind in binds.iter_mut() {
        let socket = open(&ListenSpec::new(bind.addr), None)
            .map_err(|(step, e)| anyhow::anyhow!(explain(step, bind.addr, &e)))?;
        if bind.addr.port() == 0 {
            bind.addr = socket
                .local_addr()
                .ok()
                .and_then(|a| a.as_socket())
                .context("reading the port the kernel picked")?;
        }
        kept.push(socket);
    }
    Ok(kept)
}

/// One actionable line for a failed socket step on `addr`.
pub fn explain(step: SocketStep, addr: SocketAddr, err: &io::Error) -> String {
    let port = addr.port();
    let hint = match (step, err.raw_os_error()) {
        (SocketStep::Bind, Some(libc::EADDRINUSE)) => format!(
            ": the port is held by a socket without SO_REUSEPORT, or by another user's socket \
             (the kernel only groups SO_REUSEPORT sockets of the same effective uid); \
             find it with: ss -ltnp 'sport = :{port}'"
        ),
        (SocketStep::Bind, Some(libc::EACCES)) => format!(
            ": port {port} is privileged (below net.ipv4.ip_unprivileged_port_start); run as \
             root, grant CAP_NET_BIND_SERVICE, or use a port >= 1024"
        ),
        (SocketStep::Bind, Some(libc::EADDRNOTAVAIL)) => {
            ": no interface of this host has that address; use 0.0.0.0 or one of `ip addr`".into()
        }
        (SocketStep::Socket, Some(libc::EAFNOSUPPORT)) => {
            ": this host has no support for that address family".into()
        }
        _ => String::new(),
    };
    let what = match step {
        SocketStep::Socket => "creating a socket for",
        SocketStep::Options => "setting socket options (SO_REUSEPORT, TCP_NODELAY, …) on",
        SocketStep::Bind => "binding",
        SocketStep::Listen => "listening on",
    };
    format!("{what} {addr}: {err}{hint}")
}

const MIGRATE_REQ: &str = "/proc/sys/net/ipv4/tcp_migrate_req";

/// Applies `--migrate`: when a listening socket of a reuseport group closes, Linux resets the
/// connections in its accept queue unless net.ipv4.tcp_migrate_req=1 (Linux 5.14+) moves
/// them to another socket of the group. Returns the line to log, if any.
pub fn apply_migrate(mode: Migrate) -> anyhow::Result<Option<(Level, String)>> {
    if mode == Migrate::Off {
        return Ok(None);
    }
    let fix = "run: sysctl -w net.ipv4.tcp_migrate_req=1";
    let lost = "restarts lose nothing (the next worker inherits the slot's socket), but a \
                scale-down or a crash-looping slot resets the connections queued on the socket it closes";
    match migrate_req() {
        Some(v) if v == "1" => Ok(None),
        Some(_) => match std::fs::write(MIGRATE_REQ, "1") {
            Ok(()) => Ok(Some((
                Level::Info,
                "set net.ipv4.tcp_migrate_req=1: connections queued on a socket that closes (scale-down, \
                 a crash-looping slot) move to the other workers"
                    .into(),
            ))),
            Err(e) if mode == Migrate::On => anyhow::bail!(
                "--migrate on: net.ipv4.tcp_migrate_req is 0 and setting it failed ({e}); {fix}"
            ),
            Err(e) => Ok(Some((
                Level::Warn,
                format!("net.ipv4.tcp_migrate_req is 0 and setting it failed ({e}): {lost}; {fix}"),
            ))),
        },
        None if mode == Migrate::On => anyhow::bail!(
            "--migrate on: this kernel has no net.ipv4.tcp_migrate_req (Linux 5.14+)"
        ),
        None => Ok(Some((
            Level::Warn,
            format!("this kernel has no net.ipv4.tcp_migrate_req (Linux 5.14+): {lost}"),
        ))),
    }
}

/// net.ipv4.tcp_migrate_req as the kernel shows it (`0`, `1`); None before Linux 5.14.
pub fn migrate_req() -> Option<String> {
    std::fs::read_to_string(MIGRATE_REQ)
        .ok()
        .map(|v| v.trim().to_string())
}

/// net.core.somaxconn, the kernel's cap on any listen() backlog.
pub fn somaxconn() -> Option<u32> {
    std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()?
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn two_reuseport_sockets_share_a_port_and_a_plain_one_blocks_it() {
        let a = open(&ListenSpec::new("127.0.0.1:0".parse().unwrap()), Some(8)).unwrap();
        let addr = a.local_addr().unwrap().as_socket().unwrap();
        let b = open(&ListenSpec::new(addr), Some(8));
        assert!(b.is_ok(), "second reuseport socket: {:?}", b.err());

        let plain = TcpListener::bind("127.0.0.1:0").unwrap();
        let taken = plain.local_addr().unwrap();
        let (step, err) = open(&ListenSpec::new(taken), Some(8)).unwrap_err();
        assert_eq!(step, SocketStep::Bind);
        assert!(explain(step, taken, &err).contains("without SO_REUSEPORT"));
    }

    #[test]
    fn reserve_fills_in_port_zero() {
        let mut binds = vec![Bind {
            name: "x".into(),
            addr: "127.0.0.1:0".parse().unwrap(),
        }];
        let kept = reserve(&mut binds).unwrap();
        assert_ne!(binds[0].addr.port(), 0);
        assert_eq!(kept.len(), 1);
        // A worker can still join the reserved port.
        assert!(open(&ListenSpec::new(binds[0].addr), Some(8)).is_ok());
    }
}
