//! The kernel's view of TCP sockets (sock_diag, what `ss` shows): listening sockets' accept
//! queues for `status`, and the connections a draining worker has accepted but not read yet.
//!
//! Why the second: a server that accepts eagerly (uvicorn, hypercorn, daphne, Node) may hold
//! many accepted connections whose request it has not read when it is told to stop, and it
//! closes those unanswered. A drain is over only once the old worker holds none: no accepted
//! connection with request bytes waiting unread, and none so new that its request has not
//! arrived yet.

use std::collections::{BTreeSet, HashSet};
use std::os::fd::AsRawFd;
use std::time::Duration;

use nix::errno::Errno;
use nix::libc;

/// One TCP socket as sock_diag reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiagSocket {
    /// Its inode (what /proc/PID/fd links name as `socket:[N]`).
    pub inode: u64,
    /// Its local port.
    pub port: u16,
    /// Listening: the accept queue; connected: bytes received and not read yet.
    pub rqueue: u32,
    /// Listening: the backlog; connected: bytes not acknowledged yet.
    pub wqueue: u32,
    /// From tcp_info (when asked for): bytes received so far, and how long ago data last came.
    pub received: Option<(u64, Duration)>,
}

/// TCP states, as sock_diag's state mask counts them.
const TCP_ESTABLISHED: u32 = 1;
const TCP_CLOSE_WAIT: u32 = 8;
const TCP_LISTEN: u32 = 10;

/// Every listening TCP socket of this network namespace.
pub fn listeners() -> nix::Result<Vec<DiagSocket>> {
    dump_all(1 << TCP_LISTEN, false)
}

/// Every connected TCP socket (established, or half-closed by its peer) of this network
/// namespace, with what tcp_info says of the bytes it received.
pub fn connections() -> nix::Result<Vec<DiagSocket>> {
    dump_all((1 << TCP_ESTABLISHED) | (1 << TCP_CLOSE_WAIT), true)
}

/// The listening and connected TCP sockets at one moment: one dump of each, for checks that
/// look at several workers.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// [`listeners`].
    pub listeners: Vec<DiagSocket>,
    /// [`connections`].
    pub connections: Vec<DiagSocket>,
}

impl Snapshot {
    /// Dumps both; an empty snapshot when the kernel cannot be asked.
    pub fn take() -> Snapshot {
        Snapshot {
            listeners: listeners().unwrap_or_default(),
            connections: connections().unwrap_or_default(),
        }
    }
}

fn dump_all(states: u32, info: bool) -> nix::Result<Vec<DiagSocket>> {
    let mut found = Vec::new();
    for family in [libc::AF_INET, libc::AF_INET6] {
        dump(family as u8, states, info, &mut found)?;
    }
    Ok(found)
}

/// A connection its holder has not started on: it has read nothing from it yet, and either
/// request bytes wait or it is so new (under `young`) that they may still be on their way. A
/// keep-alive connection between requests is not one: its first request was read. Without
/// tcp_info (Linux before 4.1), waiting bytes are all there is to go by.
pub fn unread(s: &DiagSocket, young: Duration) -> bool {
    match s.received {
        Some((bytes, since)) => bytes <= s.rqueue as u64 && (s.rqueue > 0 || since < young),
        None => s.rqueue > 0,
    }
}

/// The connections on `ports` that `pids` hold (no sock_diag dump when they hold no socket).
pub fn held_connections(pids: &[u32], ports: &BTreeSet<u16>) -> nix::Result<Vec<DiagSocket>> {
    let held = socket_inodes(pids);
    if held.is_empty() {
        return Ok(Vec::new());
    }
    let mut conns = connections()?;
    conns.retain(|s| held_on(s, &held, ports));
    Ok(conns)
}

/// Whether connection `s` is one of the `held` sockets, on one of `ports`.
pub fn held_on(s: &DiagSocket, held: &HashSet<u64>, ports: &BTreeSet<u16>) -> bool {
    ports.contains(&s.port) && held.contains(&s.inode)
}

/// How many connections on `ports` that `pids` hold are unread (see [`unread`]); `None`
/// when the kernel cannot be asked (no sock_diag).
pub fn unread_held_by(pids: &[u32], ports: &BTreeSet<u16>, young: Duration) -> Option<usize> {
    let conns = held_connections(pids, ports).ok()?;
    Some(conns.iter().filter(|s| unread(s, young)).count())
}

/// The inodes of the sockets `pids` have open.
pub fn socket_inodes(pids: &[u32]) -> HashSet<u64> {
    let mut inodes = HashSet::new();
    for pid in pids {
        let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for entry in dir.flatten() {
            if let Some(inode) = std::fs::read_link(entry.path())
                .ok()
                .and_then(|l| socket_inode(l.to_str()?))
            {
                inodes.insert(inode);
            }
        }
    }
    inodes
}

/// `socket:[1234]` → 1234.
pub fn socket_inode(link: &str) -> Option<u64> {
    link.strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// One INET_DIAG dump of the TCP sockets of `family` in `states` (a mask of 1 << state).
fn dump(family: u8, states: u32, info: bool, found: &mut Vec<DiagSocket>) -> nix::Result<()> {
    use nix::sys::socket::{
        recv, sendto, socket, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol,
        SockType,
    };
    const SOCK_DIAG_BY_FAMILY: u16 = 20;
    const NLMSG_ERROR: u16 = 2;
    const NLMSG_DONE: u16 = 3;
    const INET_DIAG_INFO: u16 = 2;

    let fd = socket(
        AddressFamily::Netlink,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkSockDiag,
    )?;
    // struct nlmsghdr (16 bytes) + struct inet_diag_req_v2 (56 bytes)
    let mut req = Vec::with_capacity(72);
    req.extend_from_slice(&72u32.to_ne_bytes());
    req.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    req.extend_from_slice(&((libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16).to_ne_bytes());
    req.extend_from_slice(&[0u8; 8]); // seq, pid
    let ext = if info { 1u8 << (INET_DIAG_INFO - 1) } else { 0 };
    req.extend_from_slice(&[family, libc::IPPROTO_TCP as u8, ext, 0]);
    req.extend_from_slice(&states.to_ne_bytes());
    req.extend_from_slice(&[0u8; 48]); // inet_diag_sockid: any
    sendto(
        fd.as_raw_fd(),
        &req,
        &NetlinkAddr::new(0, 0),
        MsgFlags::empty(),
    )?;

    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty())?;
        let mut msg = &buf[..n];
        while msg.len() >= 16 {
            let len = u32::from_ne_bytes(msg[0..4].try_into().unwrap_or_default()) as usize;
            let kind = u16::from_ne_bytes([msg[4], msg[5]]);
            if len < 16 || len > msg.len() {
                return Err(Errno::EINVAL);
            }
            match kind {
                NLMSG_DONE => return Ok(()),
                NLMSG_ERROR => return Err(Errno::EPROTO),
                _ if len >= 16 + 72 => found.push(parse(&msg[16..len])),
                _ => {}
            }
            msg = &msg[len.next_multiple_of(4).min(msg.len())..];
        }
    }
}

/// struct inet_diag_msg (72 bytes: 4, sockid (48: sport, dport, src, dst, if, cookie),
/// expires, rqueue, wqueue, uid, inode), then attributes.
fn parse(body: &[u8]) -> DiagSocket {
    let word = |at: usize| u32::from_ne_bytes(body[at..at + 4].try_into().unwrap_or_default());
    let mut s = DiagSocket {
        inode: word(68) as u64,
        port: u16::from_be_bytes([body[4], body[5]]),
        rqueue: word(56),
        wqueue: word(60),
        received: None,
    };
    let mut attrs = &body[72..];
    while attrs.len() >= 4 {
        let len = u16::from_ne_bytes([attrs[0], attrs[1]]) as usize;
        let kind = u16::from_ne_bytes([attrs[2], attrs[3]]);
        if len < 4 || len > attrs.len() {
            break;
        }
        // struct tcp_info: tcpi_last_data_recv (u32, ms) at 52, tcpi_bytes_received (u64) at
        // 128 (Linux 4.1+; an older kernel's shorter struct says nothing).
        let value = &attrs[4..len];
        if kind == 2 && value.len() >= 136 {
            let ms = u32::from_ne_bytes(value[52..56].try_into().unwrap_or_default());
            let bytes = u64::from_ne_bytes(value[128..136].try_into().unwrap_or_default());
            s.received = Some((bytes, Duration::from_millis(ms as u64)));
        }
        attrs = &attrs[len.next_multiple_of(4).min(attrs.len())..];
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsRawFd;

    fn inode_of(fd: &impl AsRawFd) -> u64 {
        let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap();
        socket_inode(link.to_str().unwrap()).unwrap()
    }

    #[test]
    fn an_accepted_connection_is_unread_until_its_request_is_read() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let ports = BTreeSet::from([port]);
        let me = [std::process::id()];
        let young = Duration::from_secs(5);
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut accepted, _) = listener.accept().unwrap();
        let inode = inode_of(&accepted);
        let find = || {
            connections()
                .unwrap()
                .into_iter()
                .find(|s| s.inode == inode)
                .unwrap()
        };
        // Nothing arrived yet, and it is young: its request may be on its way.
        assert_eq!(find().received.map(|r| r.0), Some(0));
        assert_eq!(unread_held_by(&me, &ports, young), Some(1));
        assert_eq!(
            unread_held_by(&me, &ports, Duration::ZERO),
            Some(0),
            "an idle connection older than `young` does not count"
        );
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while find().rqueue == 0 && std::time::Instant::now() < deadline {
            std::thread::yield_now();
        }
        assert_eq!(find().rqueue, 18);
        assert_eq!(unread_held_by(&me, &ports, Duration::ZERO), Some(1));
        let mut buf = [0u8; 18];
        accepted.read_exact(&mut buf).unwrap();
        assert_eq!(find().received.map(|r| r.0), Some(18));
        assert_eq!(
            unread_held_by(&me, &ports, young),
            Some(0),
            "read: nothing left to lose"
        );
        client.write_all(b"GET /again HTTP/1.1\r\n\r\n").unwrap();
        while find().rqueue == 0 && std::time::Instant::now() < deadline {
            std::thread::yield_now();
        }
        assert!(find().rqueue > 0);
        assert_eq!(
            unread_held_by(&me, &ports, young),
            Some(0),
            "a keep-alive connection's next request is no new connection left unread"
        );
        assert_eq!(
            unread_held_by(&me, &BTreeSet::from([port.wrapping_add(1)]), young),
            Some(0),
            "only the given ports count"
        );
    }

    #[test]
    fn listeners_show_their_accept_queue_and_backlog() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let _c = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let s = listeners()
            .unwrap()
            .into_iter()
            .find(|s| s.inode == inode_of(&listener))
            .unwrap();
        assert_eq!(s.port, listener.local_addr().unwrap().port());
        assert_eq!(s.rqueue, 1);
        assert!(s.wqueue > 0, "the backlog: {s:?}");
    }
}
