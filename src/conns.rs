//! Request/answer connections served inside the master's single-threaded loop: the control
//! socket's and the metrics endpoint's.
//!
//! Nothing here may block the loop: streams are non-blocking, a request is bounded in size
//! and in time (a deadline from accept), only a few connections are served at once, and an
//! answer is written as far as the socket takes it, the rest when it polls writable.

use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::time::{Duration, Instant};

use nix::poll::PollFlags;

/// Time a client has to send its request and read the answer.
const DEADLINE: Duration = Duration::from_secs(5);
/// Connections served at once; more are refused.
pub const MAX_CONNS: usize = 8;

struct Conn<S> {
    id: u64,
    stream: S,
    input: Vec<u8>,
    output: Vec<u8>,
    sent: usize,
    answered: bool,
    /// The answer to give whatever the request (a refusal). It is given once the request
    /// has been read: closing with unread input would reset the connection, and the client
    /// would never see why.
    refusal: Option<Vec<u8>>,
    deadline: Instant,
}

/// The open connections of one endpoint.
pub struct Conns<S> {
    conns: Vec<Conn<S>>,
    next_id: u64,
    max_request: usize,
}

impl<S: Read + Write + AsFd> Conns<S> {
    /// No connections yet; requests longer than `max_request` bytes are refused.
    pub fn new(max_request: usize) -> Conns<S> {
        Conns {
            conns: Vec::new(),
            next_id: 0,
            max_request,
        }
    }

    /// Whether another connection may be served.
    pub fn has_room(&self) -> bool {
        self.conns.len() < MAX_CONNS
    }

    /// Takes a freshly accepted connection; `refusal` answers whatever it asks.
    pub fn add(&mut self, stream: S, refusal: Option<Vec<u8>>, now: Instant) {
        self.next_id += 1;
        self.conns.push(Conn {
            id: self.next_id,
            stream,
            input: Vec::new(),
            output: Vec::new(),
            sent: 0,
            answered: false,
            refusal,
            deadline: now + DEADLINE,
        });
    }

    /// The fds to poll, with the events that matter for each.
    pub fn poll_fds(&self) -> Vec<(BorrowedFd<'_>, PollFlags)> {
        self.conns
            .iter()
            .map(|c| {
                let events = match c.answered {
                    true => PollFlags::POLLOUT,
                    false => PollFlags::POLLIN,
                };
                (c.stream.as_fd(), events)
            })
            .collect()
    }

    /// When the oldest connection times out.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.conns.iter().map(|c| c.deadline).min()
    }

    /// Reads what came in; returns each complete request as (id, bytes). `complete` gives
    /// the length of a complete request at the start of the input, if there is one.
    /// Refusals and requests that are too long are answered here.
    pub fn read(
        &mut self,
        now: Instant,
        complete: impl Fn(&[u8]) -> Option<usize>,
        too_long: impl Fn(usize) -> Vec<u8>,
    ) -> Vec<(u64, Vec<u8>)> {
        let mut requests = Vec::new();
        for c in self.conns.iter_mut().filter(|c| !c.answered) {
            let mut buf = [0u8; 512];
            let end = loop {
                if let Some(end) = complete(&c.input) {
                    break Some(end);
                }
                if c.input.len() > self.max_request {
                    break None;
                }
                match c.stream.read(&mut buf) {
                    Ok(0) => {
                        c.deadline = now; // closed before a whole request
                        break None;
                    }
                    Ok(n) => c.input.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(_) => break None, // WouldBlock, or an error: the deadline ends it
                }
            };
            match (end, c.refusal.take()) {
                (Some(_), Some(refusal)) => answer(c, refusal),
                (Some(end), None) => requests.push((c.id, c.input[..end].to_vec())),
                (None, refusal) if c.input.len() > self.max_request => {
                    answer(c, refusal.unwrap_or_else(|| too_long(self.max_request)))
                }
                (None, refusal) => c.refusal = refusal,
            }
        }
        self.flush(now);
        requests
    }

    /// Answers request `id` with `bytes` and starts sending them.
    pub fn respond(&mut self, id: u64, bytes: Vec<u8>) {
        if let Some(c) = self.conns.iter_mut().find(|c| c.id == id) {
            answer(c, bytes);
        }
        self.flush(Instant::now());
    }

    /// Writes what the sockets take; drops connections that are done or late.
    pub fn flush(&mut self, now: Instant) {
        for c in &mut self.conns {
            while c.answered && c.sent < c.output.len() {
                match c.stream.write(&c.output[c.sent..]) {
                    Ok(0) => break,
                    Ok(n) => c.sent += n,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(_) => {
                        c.deadline = now;
                        break;
                    }
                }
            }
        }
        self.conns
            .retain(|c| !(c.answered && c.sent == c.output.len()) && c.deadline > now);
    }
}

fn answer<S>(c: &mut Conn<S>, bytes: Vec<u8>) {
    c.output = bytes;
    c.sent = 0;
    c.answered = true;
}
