//! The sd_notify socket the master offers its workers as NOTIFY_SOCKET.
//!
//! An abstract unix datagram socket (no file to clean up after a crash), with SO_PASSCRED so
//! that the kernel tells which pid sent each message: a worker is identified by its own pid
//! or by a pid of its process group, never by what the message claims. The master's own
//! NOTIFY_SOCKET (from systemd) is a different socket and is never given to workers.
//!
//! Beside it, when asked, a unix *stream* socket for processes that cannot send a datagram
//! to a unix socket (Node has no API for it): connecting to it means READY=1, and the
//! kernel says who connected (SO_PEERCRED). The Node preload (node/preload.cjs) uses it.
//! It is a file, mode 0666 in the preload's directory, not an abstract name: Node before
//! 22 cuts a socket path at its first NUL byte. The master removes it when it exits.

use std::io::IoSliceMut;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram, UnixListener};

use anyhow::Context;
use nix::sys::socket::{recvmsg, setsockopt, sockopt, ControlMessageOwned, MsgFlags};

/// One datagram from a worker.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// The sender's pid, from the kernel.
    pub pid: u32,
    /// `KEY=VALUE` lines, in order; empty when `truncated`.
    pub fields: Vec<(String, String)>,
    /// Longer than [`MAX_DATAGRAM`]: dropped whole (a cut one may have lost its READY=1,
    /// as systemd reasons too). The master decides whether that is worth a line: any local
    /// user can send to the socket, so only a worker's oversized message is.
    pub truncated: bool,
}

/// Longest datagram read.
pub const MAX_DATAGRAM: usize = 4096;
/// Datagrams read per wake of the master: a flood waits for later wakes instead of holding
/// the loop (the socket stays readable, so the next poll returns at once).
const PER_WAKE: usize = 64;

/// The master's NOTIFY_SOCKET for its workers.
pub struct NotifySocket {
    socket: UnixDatagram,
    name: String,
    /// Connecting means READY=1.
    ready: Option<ReadySocket>,
}

struct ReadySocket {
    listener: UnixListener,
    path: std::path::PathBuf,
}

impl Drop for ReadySocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl NotifySocket {
    /// Binds a fresh abstract socket named after the master's pid and start time (two
    /// masters of one pod share a network namespace and may both be pid 1).
    /// With `ready_in`, also a ready socket in that directory.
    pub fn bind(ready_in: Option<&std::path::Path>) -> anyhow::Result<NotifySocket> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let name = format!("reuseport-cluster/{}/{nanos:x}/notify", std::process::id());
        let addr =
            SocketAddr::from_abstract_name(name.as_bytes()).context("naming the notify socket")?;
        let socket = UnixDatagram::bind_addr(&addr)
            .with_context(|| format!("binding the workers' notify socket @{name}"))?;
        socket.set_nonblocking(true)?;
        setsockopt(&socket, sockopt::PassCred, &true).context("setting SO_PASSCRED")?;
        let ready = match ready_in {
            None => None,
            Some(dir) => {
                let path = dir.join(format!("ready-{}-{nanos:x}.sock", std::process::id()));
                let listener = UnixListener::bind(&path).with_context(|| {
                    format!("binding the workers' ready socket {}", path.display())
                })?;
                let ready = ReadySocket { listener, path };
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&ready.path, std::fs::Permissions::from_mode(0o666))
                    .context("letting workers of any user connect to the ready socket")?;
                ready.listener.set_nonblocking(true)?;
                Some(ready)
            }
        };
        Ok(NotifySocket {
            socket,
            name,
            ready,
        })
    }

    /// The path of the stream socket whose connections mean READY=1, if there is one.
    pub fn ready_path(&self) -> Option<&std::path::Path> {
        self.ready.as_ref().map(|r| r.path.as_path())
    }

    /// The fds to wait on: the datagram socket, and the ready socket.
    pub fn poll_fds(&self) -> Vec<BorrowedFd<'_>> {
        std::iter::once(self.socket.as_fd())
            .chain(self.ready.as_ref().map(|r| r.listener.as_fd()))
            .collect()
    }

    /// The NOTIFY_SOCKET value workers get (`@` marks the abstract namespace).
    pub fn env_value(&self) -> String {
        format!("@{}", self.name)
    }

    /// The messages waiting, at most [`PER_WAKE`], without blocking.
    pub fn receive(&self) -> Vec<Message> {
        let mut messages = Vec::new();
        for _ in 0..PER_WAKE {
            let mut buf = [0u8; MAX_DATAGRAM];
            let mut cmsg = nix::cmsg_space!(nix::sys::socket::UnixCredentials);
            let mut iov = [IoSliceMut::new(&mut buf)];
            let received = recvmsg::<()>(
                self.socket.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC,
            );
            let Ok(msg) = received else {
                break; // EAGAIN: drained
            };
            let pid = msg.cmsgs().ok().and_then(|mut c| {
                c.find_map(|c| match c {
                    ControlMessageOwned::ScmCredentials(cred) => Some(cred.pid() as u32),
                    _ => None,
                })
            });
            let len = msg.bytes;
            let truncated = msg.flags.contains(MsgFlags::MSG_TRUNC);
            if let Some(pid) = pid {
                messages.push(Message {
                    pid,
                    fields: match truncated {
                        true => Vec::new(),
                        false => parse(&buf[..len]),
                    },
                    truncated,
                });
            }
        }
        for _ in 0..PER_WAKE * usize::from(self.ready.is_some()) {
            let Some(Ok((stream, _))) = self.ready.as_ref().map(|r| r.listener.accept()) else {
                break; // EAGAIN: drained
            };
            // Read from the connection, not sent in it: the connecting pid, from the kernel.
            if let Ok(cred) = nix::sys::socket::getsockopt(&stream, sockopt::PeerCredentials) {
                messages.push(Message {
                    pid: cred.pid() as u32,
                    fields: vec![("READY".into(), "1".into())],
                    truncated: false,
                });
            }
        }
        messages
    }
}

/// Splits a datagram into its `KEY=VALUE` lines.
fn parse(datagram: &[u8]) -> Vec<(String, String)> {
    String::from_utf8_lossy(datagram)
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_carry_the_kernel_checked_sender_pid() {
        let dir = std::env::temp_dir().join(format!("rc-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let notify = NotifySocket::bind(Some(&dir)).unwrap();
        assert!(notify.env_value().starts_with("@reuseport-cluster/"));
        let client = UnixDatagram::unbound().unwrap();
        let addr = SocketAddr::from_abstract_name(notify.name.as_bytes()).unwrap();
        client
            .send_to_addr(b"READY=1\nSTATUS=warming up\n", &addr)
            .unwrap();
        let got = notify.receive();
        assert_eq!(
            got,
            vec![Message {
                pid: std::process::id(),
                fields: vec![
                    ("READY".into(), "1".into()),
                    ("STATUS".into(), "warming up".into())
                ],
                truncated: false,
            }]
        );
        assert!(notify.receive().is_empty());
        // A connection to the ready socket is READY=1 from whoever connected.
        let ready = notify.ready_path().unwrap().to_path_buf();
        let _stream = std::os::unix::net::UnixStream::connect(&ready).unwrap();
        assert_eq!(
            notify.receive(),
            vec![Message {
                pid: std::process::id(),
                fields: vec![("READY".into(), "1".into())],
                truncated: false,
            }]
        );
        assert!(notify.receive().is_empty());
        // Oversized ones are marked, not logged here; the queue (net.unix.max_dgram_qlen,
        // 10 by default) holds fewer than a wake reads.
        client.set_nonblocking(true).unwrap();
        let mut sent = 0;
        while sent < PER_WAKE
            && client
                .send_to_addr(&[b'x'; MAX_DATAGRAM + 1], &addr)
                .is_ok()
        {
            sent += 1;
        }
        let got = notify.receive();
        assert_eq!(got.len(), sent);
        assert!(got.iter().all(|m| m.truncated && m.fields.is_empty()));
        drop(notify);
        assert!(!ready.exists(), "the ready socket's file is removed");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
