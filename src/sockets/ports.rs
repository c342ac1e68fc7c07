//! Who else listens on the cluster's ports. The kernel lets any SO_REUSEPORT socket of the
//! same uid join a port, so a second cluster (another `--name`) or a stray app would
//! silently take a share of the connections. At start-up no worker of ours listens yet, so
//! every listener found on an address we bind belongs to someone else: the master refuses
//! to start, naming it, unless `--share-port` says the sharing is meant.

use std::net::{IpAddr, SocketAddr};

use crate::config::Bind;
use crate::ops::status::proc_listeners;

/// Another process's listener on one of our addresses.
#[derive(Debug, Clone, PartialEq)]
pub struct Holder {
    /// Our bind it overlaps.
    pub ours: SocketAddr,
    /// Its address.
    pub addr: SocketAddr,
    /// Its owner, and the owner's command line, when /proc shows them.
    pub owner: Option<(u32, String)>,
}

impl Holder {
    /// The one line that refuses the start.
    pub fn refusal(&self) -> String {
        let who = match &self.owner {
            Some((pid, command)) => format!("pid {pid} ({command})"),
            None => "a process this user cannot see".into(),
        };
        format!(
            "port {} is already served by {who}, listening on {} with SO_REUSEPORT: this \
             cluster's workers would silently share its connections; stop it, pick another \
             port, or pass --share-port to share it on purpose",
            self.ours.port(),
            self.addr
        )
    }
}

/// The first listener of another process on an address of `binds`.
pub fn foreign_listener(binds: &[Bind]) -> Option<Holder> {
    let listeners = proc_listeners();
    let own = own_socket_inodes();
    for bind in binds {
        let ours = bind.addr;
        let hit = listeners.iter().find(|l| {
            l.port == ours.port() && overlaps(l.ip, ours.ip()) && !own.contains(&l.inode)
        });
        if let Some(l) = hit {
            return Some(Holder {
                ours,
                addr: SocketAddr::new(l.ip, l.port),
                owner: owner_of(l.inode),
            });
        }
    }
    None
}

/// Whether connections to one of two addresses of a port could reach the other's socket.
fn overlaps(a: IpAddr, b: IpAddr) -> bool {
    a.is_ipv4() == b.is_ipv4() && (a == b || a.is_unspecified() || b.is_unspecified())
}

/// Inodes of the sockets this process holds (ones it inherited are ours to use).
fn own_socket_inodes() -> Vec<u64> {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| socket_inode(&std::fs::read_link(e.path()).ok()?))
        .collect()
}

fn socket_inode(link: &std::path::Path) -> Option<u64> {
    crate::sockets::diag::socket_inode(link.to_str()?)
}

/// The process holding socket `inode`, and its command line.
fn owner_of(inode: u64) -> Option<(u32, String)> {
    let me = std::process::id();
    let procs = std::fs::read_dir("/proc").ok()?;
    for entry in procs.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        let holds = fds.flatten().any(|fd| {
            std::fs::read_link(fd.path())
                .ok()
                .and_then(|l| socket_inode(&l))
                == Some(inode)
        });
        if holds {
            return Some((pid, command_line(pid)));
        }
    }
    None
}

/// `pid`'s command line, shortened for one log line.
fn command_line(pid: u32) -> String {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let words: Vec<String> = raw
        .split(|b| *b == 0)
        .filter(|w| !w.is_empty())
        .map(|w| String::from_utf8_lossy(w).into_owned())
        .collect();
    let mut line = match words.is_empty() {
        true => std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .unwrap_or_default()
            .trim()
            .to_string(),
        false => words.join(" "),
    };
    // One line, whatever the arguments hold.
    line = line
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if line.chars().count() > 80 {
        line = line.chars().take(77).collect::<String>() + "...";
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    fn inode_of(fd: &impl AsRawFd) -> u64 {
        let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap();
        socket_inode(&link).unwrap()
    }

    #[test]
    fn addresses_overlap_on_the_same_ip_or_a_wildcard_of_the_same_family() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(overlaps(ip("127.0.0.1"), ip("127.0.0.1")));
        assert!(overlaps(ip("0.0.0.0"), ip("127.0.0.1")));
        assert!(overlaps(ip("127.0.0.1"), ip("0.0.0.0")));
        assert!(!overlaps(ip("127.0.0.2"), ip("127.0.0.1")));
        assert!(!overlaps(ip("::"), ip("127.0.0.1")));
    }

    #[test]
    fn a_listener_of_this_process_is_ours_and_the_proc_parser_reads_its_address() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let found = proc_listeners();
        let me = found.iter().find(|p| p.inode == inode_of(&l)).unwrap();
        assert_eq!(SocketAddr::new(me.ip, me.port), addr);
        let binds = [Bind {
            name: "x".into(),
            addr,
        }];
        assert_eq!(
            foreign_listener(&binds),
            None,
            "our own socket is not foreign"
        );
    }
}
