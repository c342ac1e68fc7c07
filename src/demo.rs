//! The built-in demo app: a small HTTP/1.1 keep-alive server on the inherited sockets.
//!
//! Every request gets `hello from worker <slot> (pid <pid>, cpu <cpu>)` and an
//! `X-Worker: <slot>` header, so a client can see which worker the kernel chose. It uses
//! only std: a thread per accepted connection (64 KiB stacks), which serves hundreds of
//! concurrent keep-alive connections per worker without an event loop.
//!
//! On SIGTERM/SIGINT it stops the way a production server should: it stops accepting and
//! closes its fds of the listening sockets, never shutting them down (shutdown(2) would end
//! the socket for the slot's next worker too, which shares it: see sockets/slots.rs), answers every further request with `Connection: close`, closes keep-alive
//! connections that stay idle for a second (closing them at once would race a client that
//! is sending its next request; a connection not answered yet waits for its request), and
//! exits 0 once every connection is closed.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use anyhow::Context;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use signal_hook::consts::{SIGINT, SIGTERM};

use crate::master::spawn;

/// Longest request head accepted (request line and headers).
const MAX_HEAD: usize = 16 * 1024;
/// How long a stopping worker lets idle keep-alive connections send one more request.
const IDLE_LINGER: Duration = Duration::from_secs(1);
/// How long a stopping worker waits for requests in flight (the master's --grace decides
/// in the end).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);

/// A prepared answer; `head_len` bytes of it are the head (all a HEAD request gets).
struct Response {
    bytes: Vec<u8>,
    head_len: usize,
}

/// An open connection, as the stop sees it.
struct Conn {
    stream: TcpStream,
    /// Whether it has been answered once: only then may a stop close it while it is idle
    /// (a client retries a request on a reused connection that closes; a fresh connection
    /// closed before its first request just fails).
    answered: Arc<AtomicBool>,
}

struct Shared {
    keep_alive: Response,
    close: Response,
    stopping: AtomicBool,
    next_id: AtomicU64,
    /// Open connections, so that a stop can wake the idle ones.
    conns: Mutex<HashMap<u64, Conn>>,
    drained: Condvar,
}

/// Runs the demo app on the sockets of LISTEN_FDS until SIGTERM/SIGINT.
pub fn run() -> anyhow::Result<()> {
    let listeners = spawn::listeners_from_env()?;
    anyhow::ensure!(!listeners.is_empty(), "LISTEN_FDS=0: no socket to serve");
    let slot = std::env::var("REUSEPORT_CLUSTER_WORKER").unwrap_or_else(|_| "?".into());
    let cpu = std::env::var("REUSEPORT_CLUSTER_CPU").unwrap_or_else(|_| "any".into());
    let body = format!(
        "hello from worker {slot} (pid {}, cpu {cpu})\n",
        std::process::id()
    );
    let response = |connection: &str| {
        let head = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
             X-Worker: {slot}\r\nConnection: {connection}\r\n\r\n",
            body.len()
        );
        Response {
            head_len: head.len(),
            bytes: [head.as_bytes(), body.as_bytes()].concat(),
        }
    };
    let shared = Arc::new(Shared {
        keep_alive: response("keep-alive"),
        close: response("close"),
        stopping: AtomicBool::new(false),
        next_id: AtomicU64::new(0),
        conns: Mutex::new(HashMap::new()),
        drained: Condvar::new(),
    });

    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT])
        .context("installing signal handlers")?;
    // The accept threads wait in poll(2) on their socket and on this pipe, which the stop
    // makes readable for all of them at once.
    let (woken, wake) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).context("creating the stop pipe")?;
    let mut acceptors = Vec::new();
    for listener in listeners {
        // The socket is shared with the slot's other holders, which is also why accept()
        // must never block: another process may take the connection poll(2) announced.
        listener
            .set_nonblocking(true)
            .context("making a listening socket non-blocking")?;
        let shared = Arc::clone(&shared);
        let woken = woken.try_clone().context("duplicating the stop pipe")?;
        acceptors.push(
            std::thread::Builder::new()
                .name("accept".into())
                .spawn(move || accept_loop(listener, shared, woken))
                .context("starting an accept thread")?,
        );
    }

    signals.forever().next();
    shared.stopping.store(true, Ordering::SeqCst);
    let _ = nix::unistd::write(&wake, b"x");
    // Once the accept threads are gone, every accepted connection is registered below.
    for acceptor in acceptors {
        let _ = acceptor.join();
    }
    let conns = shared.conns.lock().unwrap_or_else(|e| e.into_inner());
    let (conns, _) = shared
        .drained
        .wait_timeout_while(conns, IDLE_LINGER, |c| !c.is_empty())
        .unwrap_or_else(|e| e.into_inner());
    for conn in conns.values().filter(|c| c.answered.load(Ordering::SeqCst)) {
        // Idle keep-alive readers see EOF; a request already received still gets its answer.
        let _ = conn.stream.shutdown(Shutdown::Read);
    }
    let _ = shared
        .drained
        .wait_timeout_while(conns, DRAIN_TIMEOUT, |c| !c.is_empty());
    Ok(())
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>, woken: std::os::fd::OwnedFd) {
    use std::os::fd::AsFd;
    loop {
        let mut fds = [
            PollFd::new(listener.as_fd(), PollFlags::POLLIN),
            PollFd::new(woken.as_fd(), PollFlags::POLLIN),
        ];
        let _ = poll(&mut fds, PollTimeout::NONE);
        if shared.stopping.load(Ordering::SeqCst) {
            return; // dropping `listener` closes this worker's fd, nothing more
        }
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                ) =>
            {
                continue; // another holder of the socket took it
            }
            Err(e) => {
                eprintln!("demo: accept: {e}");
                // Out of fds or memory: back off instead of spinning on the error.
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if stream.set_nonblocking(false).is_err() {
            continue;
        }
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        // Even when accepted just as the stop began, the connection is served (its answer
        // says Connection: close): dropping it would fail a request the kernel handed us.
        let answered = Arc::new(AtomicBool::new(false));
        match stream.try_clone() {
            Ok(clone) => shared
                .conns
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(
                    id,
                    Conn {
                        stream: clone,
                        answered: Arc::clone(&answered),
                    },
                ),
            Err(_) => continue,
        };
        let conn_shared = Arc::clone(&shared);
        let spawned = std::thread::Builder::new()
            .stack_size(64 * 1024)
            .spawn(move || {
                serve(stream, &conn_shared, &answered);
                let mut conns = conn_shared.conns.lock().unwrap_or_else(|e| e.into_inner());
                conns.remove(&id);
                if conns.is_empty() {
                    conn_shared.drained.notify_all();
                }
            });
        if spawned.is_err() {
            shared
                .conns
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id);
        }
    }
}

/// Serves requests on one connection until the client or a stop closes it.
fn serve(mut stream: TcpStream, shared: &Shared, answered: &AtomicBool) {
    let _ = stream.set_nodelay(true);
    let mut buf = vec![0u8; 4096];
    let mut filled = 0;
    loop {
        let head_end = loop {
            if let Some(end) = find_head_end(&buf[..filled]) {
                break end;
            }
            if filled == MAX_HEAD {
                let _ = stream.write_all(b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
                return;
            }
            if filled == buf.len() {
                buf.resize((buf.len() * 2).min(MAX_HEAD), 0);
            }
            match stream.read(&mut buf[filled..]) {
                Ok(0) | Err(_) => return,
                Ok(n) => filled += n,
            }
        };
        let request = Request::parse(&buf[..head_end]);
        // Skip a body, if any: the demo answers the same whatever was sent.
        let mut body_left = request.content_length;
        let in_buf = (filled - head_end).min(body_left);
        body_left -= in_buf;
        buf.copy_within(head_end + in_buf..filled, 0);
        filled -= head_end + in_buf;
        if body_left > 0
            && std::io::copy(&mut (&stream).take(body_left as u64), &mut std::io::sink()).ok()
                != Some(body_left as u64)
        {
            return;
        }

        let keep_alive = request.keep_alive && !shared.stopping.load(Ordering::SeqCst);
        let response = if keep_alive {
            &shared.keep_alive
        } else {
            &shared.close
        };
        let bytes = if request.head {
            &response.bytes[..response.head_len]
        } else {
            &response.bytes[..]
        };
        if stream.write_all(bytes).is_err() || !keep_alive {
            return;
        }
        answered.store(true, Ordering::SeqCst);
    }
}

/// What the demo needs to know of a request.
struct Request {
    keep_alive: bool,
    head: bool,
    content_length: usize,
}

impl Request {
    fn parse(head: &[u8]) -> Request {
        let text = String::from_utf8_lossy(head);
        let mut lines = text.split("\r\n");
        let request_line = lines.next().unwrap_or("");
        let http10 = request_line.ends_with("HTTP/1.0");
        let mut keep_alive = !http10;
        let mut content_length = 0;
        for line in lines {
            let Some((name, value)) = line.split_once(':') else {
                continue;
            };
            let value = value.trim();
            if name.eq_ignore_ascii_case("connection") {
                if value.eq_ignore_ascii_case("close") {
                    keep_alive = false;
                } else if value.eq_ignore_ascii_case("keep-alive") {
                    keep_alive = true;
                }
            } else if name.eq_ignore_ascii_case("content-length") {
                content_length = value.parse().unwrap_or(0);
            }
        }
        Request {
            keep_alive,
            head: request_line.starts_with("HEAD "),
            content_length,
        }
    }
}

fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_keep_alive_and_length() {
        let r = Request::parse(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(r.keep_alive && !r.head && r.content_length == 0);
        let r = Request::parse(b"GET / HTTP/1.1\r\nConnection: Close\r\n\r\n");
        assert!(!r.keep_alive);
        let r = Request::parse(b"GET / HTTP/1.0\r\n\r\n");
        assert!(!r.keep_alive);
        let r = Request::parse(
            b"POST / HTTP/1.0\r\nConnection: keep-alive\r\ncontent-length: 12\r\n\r\n",
        );
        assert!(r.keep_alive && r.content_length == 12);
        assert!(Request::parse(b"HEAD / HTTP/1.1\r\n\r\n").head);
        assert_eq!(find_head_end(b"GET / HTTP/1.1\r\n\r\nGET"), Some(18));
    }
}
