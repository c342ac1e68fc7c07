//! When a new worker counts as ready to take connections: `--ready notify|listening|delay:D|auto`.
//!
//! `listening` needs no change to the app: a worker is ready once processes of its process
//! group wait for connections on every one of its listening sockets, which the kernel shows
//! in /proc in two ways:
//! - a thread is blocked in epoll_wait on an epoll instance that has the socket's inode as
//!   a target (`tfd: … ino:` in fdinfo), which is how node, Go, tokio, nginx and Python's
//!   asyncio wait. Registration alone is not enough: Go and tokio register a listener as
//!   soon as it is created, before the app has finished starting;
//! - one of its threads is blocked in accept/accept4 on it, or in poll/ppoll/select/pselect6
//!   with it among the fds to read (/proc/PID/task/TID/syscall gives the call and its
//!   arguments; the fd list is read from /proc/PID/mem): Python's socketserver, gunicorn's
//!   sync workers and blocking accept loops.
//!
//! There is no event for either, so the master looks every few milliseconds, and only while
//! some worker is starting. A worker busy serving from the start (it shares a held socket with
//! traffic on it) is seldom caught waiting; so a worker whose processes hold a connection
//! accepted on each of its sockets' ports also counts as listening (sock_diag, looked at less
//! often: [`serves_connections`]).

use std::collections::{BTreeSet, HashSet};
use std::fmt;
use std::time::Duration;

use nix::libc;

use crate::config::parse_duration;
use crate::sockets::diag;

/// How the master decides that a new worker is ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadyMode {
    /// The app sends READY=1 to NOTIFY_SOCKET (sd_notify).
    Notify,
    /// A process of the worker's group waits for connections on its socket.
    Listening,
    /// A fixed time after exec.
    Delay(Duration),
    /// The first of `notify` and `listening`.
    Auto,
}

impl ReadyMode {
    /// Parses `notify`, `listening`, `delay:5s` or `auto`.
    pub fn parse(s: &str) -> Result<ReadyMode, String> {
        match s {
            "notify" => Ok(ReadyMode::Notify),
            "listening" => Ok(ReadyMode::Listening),
            "auto" => Ok(ReadyMode::Auto),
            _ => match s.strip_prefix("delay:") {
                Some(d) => parse_duration(d).map(ReadyMode::Delay),
                None => Err("expected notify, listening, delay:DURATION or auto".into()),
            },
        }
    }

    /// Whether workers get a NOTIFY_SOCKET.
    pub fn uses_notify(self) -> bool {
        matches!(self, ReadyMode::Notify | ReadyMode::Auto)
    }

    /// Whether the master scans /proc for waiting listeners.
    pub fn uses_listening(self) -> bool {
        matches!(self, ReadyMode::Listening | ReadyMode::Auto)
    }

    /// What to tell the operator when a worker never showed readiness this way.
    pub fn not_ready_hint(self) -> &'static str {
        match self {
            ReadyMode::Notify => "it sent no READY=1 to NOTIFY_SOCKET; check the app's sd_notify call, or use --ready listening or --ready delay:DURATION",
            ReadyMode::Listening => "no process of its group waited for connections on its socket; use --ready notify or --ready delay:DURATION",
            ReadyMode::Auto => "it neither sent READY=1 nor waited for connections on its socket; use --ready delay:DURATION or --ready notify",
            ReadyMode::Delay(_) => "",
        }
    }
}

impl fmt::Display for ReadyMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReadyMode::Notify => f.write_str("notify"),
            ReadyMode::Listening => f.write_str("listening"),
            ReadyMode::Auto => f.write_str("auto"),
            ReadyMode::Delay(d) => write!(f, "delay:{}", humantime::format_duration(*d)),
        }
    }
}

/// Whether processes of the group led by `leader` wait for connections on every socket
/// whose inode is in `sockets`.
pub fn is_listening(leader: u32, sockets: &[u64]) -> bool {
    if sockets.is_empty() {
        return false;
    }
    let wanted: HashSet<u64> = sockets.iter().copied().collect();
    let mut waited = HashSet::new();
    for pid in group_processes(leader) {
        waited.extend(waited_sockets(pid, &wanted));
        if waited.len() == wanted.len() {
            return true;
        }
    }
    false
}

/// Whether processes of the group led by `leader` hold a TCP connection accepted on the
/// port of every one of `sockets`, in `tcp`: a worker that serves is ready, waiting or not.
pub fn serves_connections(leader: u32, sockets: &[u64], tcp: &diag::Snapshot) -> bool {
    let ports: BTreeSet<u16> = tcp
        .listeners
        .iter()
        .filter(|l| sockets.contains(&l.inode))
        .map(|l| l.port)
        .collect();
    if ports.is_empty() {
        return false;
    }
    let held = diag::socket_inodes(&group_processes(leader));
    let served: BTreeSet<u16> = tcp
        .connections
        .iter()
        .filter(|c| diag::held_on(c, &held, &ports))
        .map(|c| c.port)
        .collect();
    served == ports
}

/// The TCP addresses processes of the group led by `leader` listen on with sockets that
/// are not `sockets` (the ones it was given): an app that binds a port itself, or listens
/// on another one, while the socket at its fd 3 takes connections nobody accepts.
pub fn listens_elsewhere(leader: u32, sockets: &[u64]) -> Vec<std::net::SocketAddr> {
    let listeners = crate::ops::status::proc_listeners();
    let held = diag::socket_inodes(&group_processes(leader));
    let mut found = Vec::new();
    for l in listeners
        .iter()
        .filter(|l| held.contains(&l.inode) && !sockets.contains(&l.inode))
    {
        let addr = std::net::SocketAddr::new(l.ip, l.port);
        if !found.contains(&addr) {
            found.push(addr);
        }
    }
    found
}

/// `leader` and its descendants that are still in its process group.
fn group_processes(leader: u32) -> Vec<u32> {
    let mut found = vec![leader];
    let mut i = 0;
    while i < found.len() {
        let pid = found[i];
        i += 1;
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            let children =
                std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
            for child in children
                .split_whitespace()
                .filter_map(|c| c.parse::<u32>().ok())
            {
                if process_group(child) == Some(leader) && !found.contains(&child) {
                    found.push(child);
                }
            }
        }
    }
    found
}

/// Field 5 of /proc/PID/stat.
pub fn process_group(pid: u32) -> Option<u32> {
    let stat = crate::master::procs::read_stat(pid)?;
    crate::master::procs::stat_fields(&stat)?
        .get(2)?
        .parse()
        .ok()
}

/// The inode of `pid`'s fd `fd`, if it is a socket.
fn socket_inode(pid: u32, fd: u64) -> Option<u64> {
    let link = std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).ok()?;
    crate::sockets::diag::socket_inode(link.to_str()?)
}

/// Which of `sockets` a thread of `pid` is blocked waiting to accept on.
fn waited_sockets(pid: u32, sockets: &HashSet<u64>) -> HashSet<u64> {
    let mut waited = HashSet::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return waited;
    };
    let inode = |fd: u64| socket_inode(pid, fd).filter(|ino| sockets.contains(ino));
    let mut epolls = None; // read on first need: (epoll fd, our socket it watches)
    for task in tasks.flatten() {
        let syscall = std::fs::read_to_string(task.path().join("syscall")).unwrap_or_default();
        // "nr arg0 arg1 … sp pc" while blocked in a syscall; "running" or "-1 …" otherwise.
        let mut fields = syscall.split_whitespace();
        let Some(nr) = fields.next().and_then(|n| n.parse::<i64>().ok()) else {
            continue;
        };
        let args: Vec<u64> = fields
            .take(2)
            .filter_map(|a| u64::from_str_radix(a.trim_start_matches("0x"), 16).ok())
            .collect();
        let [arg0, arg1] = args[..] else {
            continue;
        };
        if nr == libc::SYS_accept || nr == libc::SYS_accept4 {
            waited.extend(inode(arg0));
        } else if is_poll(nr) {
            waited.extend(polled_fds(pid, arg0, arg1).into_iter().filter_map(inode));
        } else if is_select(nr) {
            waited.extend(selected_fds(pid, arg0, arg1).into_iter().filter_map(inode));
        } else if is_epoll_wait(nr) {
            let epolls = epolls.get_or_insert_with(|| epoll_targets(pid, sockets));
            waited.extend(
                epolls
                    .iter()
                    .filter(|(fd, _)| *fd == arg0)
                    .map(|(_, ino)| *ino),
            );
        }
    }
    waited
}

fn is_epoll_wait(nr: i64) -> bool {
    #[cfg(target_arch = "x86_64")]
    if nr == libc::SYS_epoll_wait {
        return true;
    }
    nr == libc::SYS_epoll_pwait || nr == libc::SYS_epoll_pwait2
}

fn is_poll(nr: i64) -> bool {
    #[cfg(target_arch = "x86_64")]
    if nr == libc::SYS_poll {
        return true;
    }
    nr == libc::SYS_ppoll
}

fn is_select(nr: i64) -> bool {
    #[cfg(target_arch = "x86_64")]
    if nr == libc::SYS_select {
        return true;
    }
    nr == libc::SYS_pselect6
}

/// Reads `len` bytes of `pid`'s memory at `addr`.
fn read_memory(pid: u32, addr: u64, len: usize) -> Option<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let mem = std::fs::File::open(format!("/proc/{pid}/mem")).ok()?;
    let mut buf = vec![0u8; len];
    mem.read_exact_at(&mut buf, addr).ok()?;
    Some(buf)
}

/// The fds a poll/ppoll call waits to read: `struct pollfd { int fd; short events; short revents; }`.
fn polled_fds(pid: u32, pollfds: u64, nfds: u64) -> Vec<u64> {
    let nfds = nfds.min(4096) as usize;
    let Some(raw) = read_memory(pid, pollfds, nfds * 8) else {
        return Vec::new();
    };
    raw.chunks_exact(8)
        .filter(|p| i16::from_ne_bytes([p[4], p[5]]) & libc::POLLIN != 0)
        .filter_map(|p| u64::try_from(i32::from_ne_bytes([p[0], p[1], p[2], p[3]])).ok())
        .collect()
}

/// The fds a select/pselect6 call waits to read: the bits of its `readfds` set.
fn selected_fds(pid: u32, nfds: u64, readfds: u64) -> Vec<u64> {
    if readfds == 0 {
        return Vec::new();
    }
    let nfds = nfds.min(libc::FD_SETSIZE as u64);
    let Some(raw) = read_memory(pid, readfds, nfds.div_ceil(8) as usize) else {
        return Vec::new();
    };
    (0..nfds)
        .filter(|fd| raw[(*fd / 8) as usize] & (1 << (fd % 8)) != 0)
        .collect()
}

/// (epoll fd, socket inode) for each of `sockets` that an epoll instance of `pid` watches.
fn epoll_targets(pid: u32, sockets: &HashSet<u64>) -> Vec<(u64, u64)> {
    let mut targets = Vec::new();
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return targets;
    };
    for fd in fds.flatten() {
        let Some(num) = fd.file_name().to_str().and_then(|n| n.parse::<u64>().ok()) else {
            continue;
        };
        let is_epoll =
            std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == "anon_inode:[eventpoll]");
        if !is_epoll {
            continue;
        }
        let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{num}")).unwrap_or_default();
        // tfd:        3 events:       19 data:                3  pos:0 ino:1b7a sdev:8
        for line in info.lines().filter(|l| l.starts_with("tfd:")) {
            let ino = line
                .split_whitespace()
                .find_map(|f| f.strip_prefix("ino:"))
                .and_then(|ino| u64::from_str_radix(ino, 16).ok());
            if let Some(ino) = ino.filter(|i| sockets.contains(i)) {
                targets.push((num, ino));
            }
        }
    }
    targets
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::os::fd::AsRawFd;

    fn inode_of(listener: &TcpListener) -> u64 {
        socket_inode(std::process::id(), listener.as_raw_fd() as u64).unwrap()
    }

    #[test]
    fn modes_parse() {
        assert_eq!(ReadyMode::parse("notify"), Ok(ReadyMode::Notify));
        assert_eq!(
            ReadyMode::parse("delay:2s"),
            Ok(ReadyMode::Delay(Duration::from_secs(2)))
        );
        assert!(ReadyMode::parse("delay:x").is_err());
        assert!(ReadyMode::parse("ready").is_err());
        assert_eq!(
            ReadyMode::Delay(Duration::from_millis(1500)).to_string(),
            "delay:1s 500ms"
        );
    }

    #[test]
    fn a_thread_blocked_in_accept_is_seen_and_an_idle_socket_is_not() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let ino = inode_of(&listener);
        let me = std::process::id();
        // Control: nobody waits on it yet.
        assert!(waited_sockets(me, &HashSet::from([ino])).is_empty());
        let addr = listener.local_addr().unwrap();
        let waiter = std::thread::spawn(move || listener.accept().map(|_| ()));
        let seen = (0..500).any(|_| {
            std::thread::sleep(Duration::from_millis(5));
            waited_sockets(me, &HashSet::from([ino])).contains(&ino)
        });
        std::net::TcpStream::connect(addr).unwrap();
        waiter.join().unwrap().unwrap();
        assert!(seen, "accept() on the socket was not seen in /proc");
    }

    #[test]
    fn a_thread_blocked_in_poll_on_the_socket_is_seen() {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        use std::os::fd::AsFd;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let ino = inode_of(&listener);
        let me = std::process::id();
        let addr = listener.local_addr().unwrap();
        let waiter = std::thread::spawn(move || {
            let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
            poll(&mut fds, PollTimeout::from(10_000u16)).unwrap();
        });
        let seen = (0..500).any(|_| {
            std::thread::sleep(Duration::from_millis(5));
            waited_sockets(me, &HashSet::from([ino])).contains(&ino)
        });
        std::net::TcpStream::connect(addr).unwrap();
        waiter.join().unwrap();
        assert!(seen, "poll() on the socket was not seen in /proc");
    }

    #[test]
    fn an_epoll_registration_counts_only_while_a_thread_waits_in_it() {
        use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let ino = inode_of(&listener);
        let me = std::process::id();
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).unwrap();
        epoll
            .add(&listener, EpollEvent::new(EpollFlags::EPOLLIN, 1))
            .unwrap();
        assert_eq!(epoll_targets(me, &HashSet::from([ino])).len(), 1);
        // Registered, but nobody waits (Go and tokio before the app is up): not ready.
        assert!(!is_listening(me, &[ino]));
        let waiter = std::thread::spawn(move || {
            let mut events = [EpollEvent::empty()];
            epoll
                .wait(&mut events, EpollTimeout::from(10_000u16))
                .unwrap();
        });
        let seen = (0..500).any(|_| {
            std::thread::sleep(Duration::from_millis(5));
            is_listening(me, &[ino])
        });
        std::net::TcpStream::connect(addr).unwrap();
        waiter.join().unwrap();
        assert!(seen, "epoll_wait on the socket's epoll was not seen");
    }

    #[test]
    fn a_process_holding_a_connection_accepted_on_the_socket_serves() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let me = std::process::id();
        let inode = inode_of(&listener);
        let serves = || serves_connections(me, &[inode], &diag::Snapshot::take());
        assert!(!serves(), "nothing accepted yet");
        let _client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        assert!(
            !serves(),
            "queued, not accepted: the client's end is on another port"
        );
        let _accepted = listener.accept().unwrap();
        assert!(serves());
    }

    #[test]
    fn every_socket_must_be_waited_on() {
        let a = TcpListener::bind("127.0.0.1:0").unwrap();
        let b = TcpListener::bind("127.0.0.1:0").unwrap();
        let (ia, ib) = (inode_of(&a), inode_of(&b));
        let addr = a.local_addr().unwrap();
        let me = std::process::id();
        let waiter = std::thread::spawn(move || a.accept().map(|_| ()));
        let only_a = (0..500).any(|_| {
            std::thread::sleep(Duration::from_millis(5));
            waited_sockets(me, &HashSet::from([ia])).contains(&ia)
        });
        assert!(only_a);
        assert!(!is_listening(me, &[ia, ib]), "b is not waited on");
        std::net::TcpStream::connect(addr).unwrap();
        waiter.join().unwrap().unwrap();
        drop(b);
    }
}
