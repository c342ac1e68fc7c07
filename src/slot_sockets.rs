//! The life of each slot's listening sockets: who opens them, who holds them, when they are
//! handed to a successor, when they close. The one owner of that logic.
//!
//! **Opening.** A slot's first worker opens the slot's SO_REUSEPORT sockets itself, in the
//! forked child before exec (spawn.rs), as it always did. Just before exec the child also
//! sends each socket it opened to the master over the close-on-exec socketpair that carries
//! its start-up report (SCM_RIGHTS; received with MSG_CMSG_CLOEXEC). That channel already
//! exists and sendmsg(2) is async-signal-safe; pidfd_getfd(2) would need Linux 5.6 and
//! ptrace rights over the worker, which a `--user` drop or Yama can take away.
//!
//! **Holding.** The master keeps that reference, close-on-exec, for as long as the slot
//! lives. It never accepts on it: it only keeps the socket (and the connections queued on
//! it) alive between workers.
//!
//! **Handing over.** Every later worker of the slot, a rolling restart's new worker, a
//! crashed worker's replacement, gets that very socket at its fd 3.. (the same LISTEN_FDS
//! contract). During a surge the old and the new worker accept from one queue, so the old
//! one closing its fd loses nothing, whatever net.ipv4.tcp_migrate_req says; after a crash
//! the queued connections wait for the replacement instead of being reset.
//!
//! **Closing.** The master lets go of a slot's sockets when
//! - the slot crash-loops (its restart delay reached [`RELEASE_AFTER_BACKOFF`]): held, the
//!   socket would keep taking 1/N of the new connections with nobody to serve them;
//! - the slot is scaled away, or the master stops: its worker's own fd then decides, as
//!   without takeover (queued connections migrate only with tcp_migrate_req=1);
//! - the socket no longer listens (the app called shutdown(2) on it, which ends it for every
//!   holder). The next worker of the slot opens a fresh socket; a worker still serving the
//!   dead one is replaced ([`SlotSockets::lost`]).
//!
//! The supervisor decides *when* (as [`crate::supervisor::Action::ReleaseSockets`]); this
//! module holds the fds and answers what a spawn gets.

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant, SystemTime};

use nix::sys::socket::{getsockopt, sockopt};

/// A slot whose next restart is at least this far away lets go of its sockets: 100 ms,
/// 200, 400 and 800 ms of backoff keep them (1.5 s of queued connections waiting for a
/// replacement); the fifth crash in a row, with its 1.6 s delay, releases them.
pub const RELEASE_AFTER_BACKOFF: Duration = Duration::from_secs(1);

/// Environment variable that turns socket takeover off (`0`): each worker then opens its
/// own sockets, as before takeover. For comparisons and the tests' control cases.
pub const TAKEOVER_ENV: &str = "REUSEPORT_CLUSTER_TAKEOVER";

/// The sockets the master holds for one slot.
#[derive(Debug)]
struct Held {
    /// One per bind, in fd order.
    fds: Vec<OwnedFd>,
    /// Their inodes, in the same order.
    inodes: Vec<u64>,
    /// When the master took hold of them.
    since: Instant,
    /// The same moment on the wall clock, for `status`.
    since_wall: SystemTime,
    /// Workers started with them.
    workers: u32,
}

/// What `status` shows of a slot's held sockets.
#[derive(Debug, Clone, PartialEq)]
pub struct HeldView {
    /// Inodes, in fd order.
    pub inodes: Vec<u64>,
    /// How long they have been held.
    pub held_for: Duration,
    /// Seconds since the epoch when the master took hold of them.
    pub since_unix_s: u64,
    /// Workers of the slot started with them so far.
    pub workers: u32,
}

/// The master's references to every slot's listening sockets.
#[derive(Debug)]
pub struct SlotSockets {
    enabled: bool,
    binds: usize,
    held: BTreeMap<usize, Held>,
}

/// What a spawn of a slot's worker gets.
#[derive(Debug, Default)]
pub struct Grant {
    /// The held sockets to put at fds 3.., or `None`: the child opens fresh ones.
    pub inherit: Option<Vec<RawFd>>,
    /// A line for the log, when a held socket turned out dead.
    pub note: Option<String>,
}

impl SlotSockets {
    /// Holds nothing yet; `enabled: false` never holds anything (takeover off).
    pub fn new(enabled: bool, binds: usize) -> SlotSockets {
        SlotSockets {
            enabled,
            binds,
            held: BTreeMap::new(),
        }
    }

    /// Whether takeover is on for this process: on unless [`TAKEOVER_ENV`] is `0`.
    pub fn enabled_by_env() -> bool {
        std::env::var(TAKEOVER_ENV).map_or(true, |v| v != "0")
    }

    /// Whether workers' freshly opened sockets are sent to the master.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The sockets the next worker of `slot` starts with. A held socket that no longer
    /// listens is dropped here, so the worker opens a fresh one.
    pub fn grant(&mut self, slot: usize, label: &str) -> Grant {
        let Some(held) = self.held.get(&slot) else {
            return Grant::default();
        };
        if let Some(inode) = dead_inode(held) {
            self.held.remove(&slot);
            return Grant {
                inherit: None,
                note: Some(format!(
                    "{label}: its socket (inode {inode}) no longer listens (the app shut it \
                     down); the next worker opens a fresh one"
                )),
            };
        }
        Grant {
            inherit: Some(held.fds.iter().map(|f| f.as_raw_fd()).collect()),
            note: None,
        }
    }

    /// A worker of `slot` exec'd. `inherited`: it got the held sockets; otherwise `fresh`
    /// are the sockets it opened (sent by the child; empty with takeover off), with their
    /// `inodes`.
    pub fn started(&mut self, slot: usize, inherited: bool, fresh: Vec<OwnedFd>, inodes: &[u64]) {
        if inherited {
            if let Some(h) = self.held.get_mut(&slot) {
                h.workers += 1;
            }
            return;
        }
        if !self.enabled || fresh.len() != self.binds || inodes.len() != self.binds {
            return; // dropping `fresh` closes the master's copies
        }
        let now = Instant::now();
        // A previous hold of the slot (a surge's crash-loop release raced a fresh spawn)
        // is replaced: the new worker serves the fresh sockets.
        self.held.insert(
            slot,
            Held {
                fds: fresh,
                inodes: inodes.to_vec(),
                since: now,
                since_wall: SystemTime::now(),
                workers: 1,
            },
        );
    }

    /// Lets go of `slot`'s sockets; the line to log, if it held any.
    pub fn release(&mut self, slot: usize, why: &str, label: &str) -> Option<String> {
        let held = self.held.remove(&slot)?;
        Some(format!(
            "{label}: let go of its socket{} (inode {}): {why}; the next worker opens a fresh one",
            if held.inodes.len() == 1 { "" } else { "s" },
            join(&held.inodes)
        ))
    }

    /// Lets go of every slot's sockets (the master is stopping).
    pub fn release_all(&mut self) {
        self.held.clear();
    }

    /// Slots whose held sockets no longer listen; they are dropped, and the caller replaces
    /// the workers serving them. Each with the dead socket's inode.
    pub fn lost(&mut self) -> Vec<(usize, u64)> {
        let dead: Vec<(usize, u64)> = self
            .held
            .iter()
            .filter_map(|(slot, h)| dead_inode(h).map(|inode| (*slot, inode)))
            .collect();
        for (slot, _) in &dead {
            self.held.remove(slot);
        }
        dead
    }

    /// The held sockets, for the master's poll(2) with no events requested: a listener
    /// never wakes it for connections, but one shut down reports POLLHUP at once.
    pub fn poll_fds(&self) -> impl Iterator<Item = std::os::fd::BorrowedFd<'_>> {
        use std::os::fd::AsFd;
        self.held
            .values()
            .flat_map(|h| h.fds.iter().map(|f| f.as_fd()))
    }

    /// What `status` shows of `slot`'s sockets.
    pub fn view(&self, slot: usize, now: Instant) -> Option<HeldView> {
        self.held.get(&slot).map(|h| HeldView {
            inodes: h.inodes.clone(),
            held_for: now.saturating_duration_since(h.since),
            since_unix_s: h
                .since_wall
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            workers: h.workers,
        })
    }

    /// Slots holding sockets.
    pub fn slots(&self) -> BTreeSet<usize> {
        self.held.keys().copied().collect()
    }

    /// File descriptors held.
    #[cfg(test)]
    pub fn fd_count(&self) -> usize {
        self.held.values().map(|h| h.fds.len()).sum()
    }
}

/// The inode of the first of `held`'s sockets that no longer listens.
fn dead_inode(held: &Held) -> Option<u64> {
    held.fds
        .iter()
        .zip(&held.inodes)
        .find(|(fd, _)| !getsockopt(*fd, sockopt::AcceptConn).unwrap_or(false))
        .map(|(_, inode)| *inode)
}

fn join(inodes: &[u64]) -> String {
    inodes
        .iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};
    use std::os::unix::fs::MetadataExt;

    fn listener() -> (OwnedFd, u64, std::net::SocketAddr) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let inode = std::fs::metadata(format!("/proc/self/fd/{}", l.as_raw_fd()))
            .unwrap()
            .ino();
        (OwnedFd::from(l), inode, addr)
    }

    #[test]
    fn the_first_worker_opens_and_every_later_one_inherits_the_same_socket() {
        let mut s = SlotSockets::new(true, 1);
        let first = s.grant(0, "worker 0");
        assert!(
            first.inherit.is_none(),
            "nothing held yet: the child opens it"
        );
        let (fd, inode, _) = listener();
        let raw = fd.as_raw_fd();
        s.started(0, false, vec![fd], &[inode]);
        for _ in 0..3 {
            let g = s.grant(0, "worker 0");
            assert_eq!(g.inherit, Some(vec![raw]));
            s.started(0, true, Vec::new(), &[inode]);
        }
        let view = s.view(0, Instant::now()).unwrap();
        assert_eq!((view.inodes, view.workers), (vec![inode], 4));
        assert_eq!(s.fd_count(), 1, "one reference per bind, not per worker");
    }

    #[test]
    fn a_connection_queued_while_no_worker_runs_waits_for_the_successor() {
        let mut s = SlotSockets::new(true, 1);
        let (fd, inode, addr) = listener();
        s.started(0, false, vec![fd], &[inode]);
        // The worker is gone; the client connects to the held socket in between.
        let mut client = TcpStream::connect(addr).unwrap();
        assert!(s.grant(0, "worker 0").inherit.is_some());
        // A dup of the held socket stands for the successor's fd 3.
        let held = &s.held[&0].fds[0];
        let successor = TcpListener::from(nix::unistd::dup(held).unwrap());
        let (mut conn, _) = successor.accept().unwrap();
        use std::io::{Read, Write};
        conn.write_all(b"x").unwrap();
        let mut b = [0u8; 1];
        client.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"x");
    }

    #[test]
    fn release_closes_the_masters_reference_and_the_next_worker_opens_fresh() {
        let mut s = SlotSockets::new(true, 1);
        let (fd, inode, addr) = listener();
        s.started(0, false, vec![fd], &[inode]);
        let line = s.release(0, "crash loop", "worker 0").unwrap();
        assert!(line.contains(&format!("inode {inode}")), "{line}");
        assert!(s.grant(0, "worker 0").inherit.is_none());
        assert!(
            s.release(0, "again", "worker 0").is_none(),
            "nothing left to log"
        );
        assert!(
            TcpStream::connect(addr).is_err(),
            "the socket is closed: the kernel stops sending it connections"
        );
    }

    #[test]
    fn a_socket_shut_down_by_the_app_is_dropped_and_reported() {
        let mut s = SlotSockets::new(true, 1);
        let (fd, inode, _) = listener();
        // The app's fd 3 is the same socket: shutdown(2) through it ends it for the master.
        let app = TcpListener::from(nix::unistd::dup(&fd).unwrap());
        s.started(0, false, vec![fd], &[inode]);
        assert!(
            s.lost().is_empty(),
            "control: a listening socket is not lost"
        );
        nix::sys::socket::shutdown(app.as_raw_fd(), nix::sys::socket::Shutdown::Both).unwrap();
        assert_eq!(s.lost(), vec![(0, inode)]);
        assert!(s.grant(0, "worker 0").inherit.is_none());
    }

    #[test]
    fn grant_notices_a_dead_socket_and_says_so() {
        let mut s = SlotSockets::new(true, 1);
        let (fd, inode, _) = listener();
        let dup = nix::unistd::dup(&fd).unwrap();
        s.started(0, false, vec![fd], &[inode]);
        nix::sys::socket::shutdown(dup.as_raw_fd(), nix::sys::socket::Shutdown::Both).unwrap();
        let g = s.grant(0, "worker 0 (cpu 0)");
        assert!(g.inherit.is_none());
        assert!(g.note.unwrap().contains("no longer listens"));
    }

    #[test]
    fn with_takeover_off_nothing_is_held() {
        let mut s = SlotSockets::new(false, 1);
        let (fd, inode, _) = listener();
        s.started(0, false, vec![fd], &[inode]);
        assert!(s.grant(0, "worker 0").inherit.is_none());
        assert_eq!(s.fd_count(), 0);
    }

    #[test]
    fn a_partial_set_of_sockets_is_not_held() {
        let mut s = SlotSockets::new(true, 2);
        let (fd, inode, _) = listener();
        s.started(0, false, vec![fd], &[inode]);
        assert!(
            s.grant(0, "worker 0").inherit.is_none(),
            "2 binds need 2 sockets"
        );
        let (a, ia, _) = listener();
        let (b, ib, _) = listener();
        let raws = vec![a.as_raw_fd(), b.as_raw_fd()];
        s.started(1, false, vec![a, b], &[ia, ib]);
        assert_eq!(s.grant(1, "worker 1").inherit, Some(raws));
        s.release_all();
        assert_eq!(s.fd_count(), 0);
    }
}
