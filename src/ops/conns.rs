//! Request/answer connections served inside the master's single-threaded loop: the control
//! socket's and the metrics endpoint's.
//!
//! Nothing here may block the loop: streams are non-blocking, a request is bounded in size
//! and in time (a deadline from accept), only a few connections are served at once, and an
//! answer is written as far as the socket takes it, the rest when it polls writable.
//!
//! A connection can also be *held* once its request is read: it stays open past the
//! deadline and gets lines as things happen (a waiting `reload` follows its rolling
//! restart), then a last line, and is closed. A held client that stops reading is dropped
//! once a bounded amount of output is queued for it; one that hangs up is noticed by poll.

use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::time::{Duration, Instant};

use nix::poll::PollFlags;

/// Time a client has to send its request and read the answer.
const DEADLINE: Duration = Duration::from_secs(5);
/// Connections served at once by default; more are refused and closed at once (see
/// [`Conns::with_limit`] for an endpoint any peer can reach).
pub const MAX_CONNS: usize = 8;
/// How long accepting pauses when the process is out of fds (EMFILE/ENFILE): the listener
/// stays readable, and polling it meanwhile would spin.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);
/// Held connections at once (they do not count against [`MAX_CONNS`]).
pub const MAX_HELD: usize = 64;
/// Output queued for a held connection beyond which its client is deemed gone.
const MAX_HELD_OUTPUT: usize = 64 * 1024;
/// A held connection has no deadline; this stands for "never".
const FOREVER: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

struct Conn<S> {
    id: u64,
    stream: S,
    input: Vec<u8>,
    output: Vec<u8>,
    sent: usize,
    answered: bool,
    /// Kept open after its request for more output (see the module doc).
    held: bool,
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
    max_conns: usize,
    /// Past the limit, the oldest connection that has not sent a whole request makes room.
    evict_idle: bool,
    accept_paused_until: Option<Instant>,
}

impl<S: Read + Write + AsFd> Conns<S> {
    /// No connections yet; requests longer than `max_request` bytes are refused.
    pub fn new(max_request: usize) -> Conns<S> {
        Conns {
            conns: Vec::new(),
            next_id: 0,
            max_request,
            max_conns: MAX_CONNS,
            evict_idle: false,
            accept_paused_until: None,
        }
    }

    /// For an endpoint any network peer can reach: up to `max_conns` connections at once,
    /// and past that the oldest one that has not sent a whole request yet makes room for
    /// the new one, so that idle or slow peers cannot lock everyone else out.
    pub fn with_limit(max_request: usize, max_conns: usize) -> Conns<S> {
        Conns {
            max_conns,
            evict_idle: true,
            ..Conns::new(max_request)
        }
    }

    /// Whether the listener should be polled and accepted from now.
    pub fn accepting(&self, now: Instant) -> bool {
        self.accept_paused_until.is_none_or(|until| now >= until)
    }

    /// Accepts every waiting connection with `accept`: each gets `check` (a refusal, or
    /// None); past the limit a connection is told so and closed at once; when the process
    /// is out of fds, accepting pauses for a moment.
    pub fn accept_all(
        &mut self,
        now: Instant,
        mut accept: impl FnMut() -> std::io::Result<S>,
        check: impl Fn(&S) -> Option<Vec<u8>>,
        busy: &[u8],
    ) {
        if !self.accepting(now) {
            return;
        }
        self.accept_paused_until = None;
        loop {
            let accepted = accept();
            let open = self.conns.iter().filter(|c| !c.held).count();
            if self.evict_idle && accepted.is_ok() && open >= self.max_conns {
                // The oldest that is still only connected (or trickling) makes room.
                if let Some(i) = self.conns.iter().position(|c| !c.answered && !c.held) {
                    self.conns.remove(i);
                }
            }
            match accepted {
                Ok(mut stream)
                    if self.conns.iter().filter(|c| !c.held).count() >= self.max_conns =>
                {
                    let _ = stream.write(busy); // best effort: non-blocking, then closed
                }
                Ok(stream) => {
                    let refusal = check(&stream);
                    self.add(stream, refusal, now);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(nix::libc::EMFILE | nix::libc::ENFILE)
                    ) =>
                {
                    self.accept_paused_until = Some(now + ACCEPT_PAUSE);
                    return;
                }
                Err(_) => return, // WouldBlock: all taken
            }
        }
    }

    /// Takes a freshly accepted connection; `refusal` answers whatever it asks.
    fn add(&mut self, stream: S, refusal: Option<Vec<u8>>, now: Instant) {
        self.next_id += 1;
        self.conns.push(Conn {
            id: self.next_id,
            stream,
            input: Vec::new(),
            output: Vec::new(),
            sent: 0,
            answered: false,
            held: false,
            refusal,
            deadline: now + DEADLINE,
        });
    }

    /// The fds to poll, with the events that matter for each.
    pub fn poll_fds(&self) -> Vec<(BorrowedFd<'_>, PollFlags)> {
        self.conns
            .iter()
            .map(|c| {
                let events = match (c.answered, c.held && c.sent == c.output.len()) {
                    // Nothing to write: poll only for a hang-up (reported whatever the
                    // events); POLLIN would spin on a client that half-closed.
                    (true, true) => PollFlags::empty(),
                    (true, false) => PollFlags::POLLOUT,
                    (false, _) => PollFlags::POLLIN,
                };
                (c.stream.as_fd(), events)
            })
            .collect()
    }

    /// When the oldest connection times out, or accepting resumes.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.conns
            .iter()
            .map(|c| c.deadline)
            .chain(self.accept_paused_until)
            .min()
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
                    // A half-close ends the request (`printf status | socat`): answer what came.
                    Ok(0) if !c.input.is_empty() => break Some(c.input.len()),
                    Ok(0) => {
                        c.deadline = now; // closed before sending anything
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

    /// Keeps connection `id` open after its request, for [`Conns::send`] and
    /// [`Conns::finish`]; false (and the connection is left as it was) when too many are
    /// held already.
    pub fn hold(&mut self, id: u64, now: Instant) -> bool {
        if self.conns.iter().filter(|c| c.held).count() >= MAX_HELD {
            return false;
        }
        match self.conns.iter_mut().find(|c| c.id == id) {
            Some(c) => {
                c.answered = true;
                c.held = true;
                c.deadline = now + FOREVER;
                true
            }
            None => false,
        }
    }

    /// Queues `bytes` for held connection `id`.
    pub fn send(&mut self, id: u64, bytes: &[u8]) {
        let now = Instant::now();
        if let Some(c) = self.conns.iter_mut().find(|c| c.id == id && c.held) {
            c.output.extend_from_slice(bytes);
            if c.output.len() - c.sent > MAX_HELD_OUTPUT {
                c.deadline = now; // it stopped reading
            }
        }
        self.flush(now);
    }

    /// Queues the last `bytes` for held connection `id`, which is closed once they are sent.
    pub fn finish(&mut self, id: u64, bytes: &[u8]) {
        if let Some(c) = self.conns.iter_mut().find(|c| c.id == id && c.held) {
            c.output.extend_from_slice(bytes);
            c.held = false;
            c.deadline = Instant::now() + DEADLINE;
        }
        self.flush(Instant::now());
    }

    /// Whether connection `id` is still open.
    pub fn is_open(&self, id: u64) -> bool {
        self.conns.iter().any(|c| c.id == id)
    }

    /// Writes what the sockets take; drops connections that are done or late.
    pub fn flush(&mut self, now: Instant) {
        for c in &mut self.conns {
            if c.held && c.sent == c.output.len() && hung_up(c.stream.as_fd()) {
                c.deadline = now;
            }
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
            .retain(|c| !(c.answered && !c.held && c.sent == c.output.len()) && c.deadline > now);
    }
}

/// Whether the peer of `fd` has closed its end (poll reports POLLHUP or POLLERR).
fn hung_up(fd: BorrowedFd<'_>) -> bool {
    let mut fds = [nix::poll::PollFd::new(fd, PollFlags::empty())];
    match nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO) {
        Ok(n) if n > 0 => fds[0]
            .revents()
            .is_some_and(|r| r.intersects(PollFlags::POLLHUP | PollFlags::POLLERR)),
        _ => false,
    }
}

fn answer<S>(c: &mut Conn<S>, bytes: Vec<u8>) {
    c.output = bytes;
    c.sent = 0;
    c.answered = true;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    /// Conns with one accepted connection whose request `line` has been read; returns its
    /// id and the client's end.
    fn one_request(line: &[u8]) -> (Conns<UnixStream>, u64, UnixStream) {
        let (server, mut client) = UnixStream::pair().unwrap();
        server.set_nonblocking(true).unwrap();
        let mut conns = Conns::new(1024);
        let mut pending = Some(server);
        let now = Instant::now();
        conns.accept_all(
            now,
            || {
                pending
                    .take()
                    .ok_or_else(|| std::io::Error::from(ErrorKind::WouldBlock))
            },
            |_| None,
            b"busy\n",
        );
        client.write_all(line).unwrap();
        let end = |input: &[u8]| input.iter().position(|b| *b == b'\n').map(|p| p + 1);
        let got = conns.read(now, end, |_| b"too long\n".to_vec());
        assert_eq!(got.len(), 1);
        (conns, got[0].0, client)
    }

    #[test]
    fn a_held_connection_outlives_the_deadline_gets_lines_and_closes_after_the_last() {
        let (mut conns, id, mut client) = one_request(b"reload --wait\n");
        assert!(conns.hold(id, Instant::now()));
        conns.send(id, b"progress: one\n");
        conns.flush(Instant::now() + DEADLINE * 10);
        assert!(conns.is_open(id), "no deadline while held");
        conns.finish(id, b"ok: done\n");
        assert!(!conns.is_open(id), "closed once the last line is out");
        let mut got = String::new();
        client.read_to_string(&mut got).unwrap();
        assert_eq!(got, "progress: one\nok: done\n");
    }

    #[test]
    fn a_held_client_that_hangs_up_or_stops_reading_is_dropped() {
        let (mut conns, id, client) = one_request(b"reload --wait\n");
        assert!(conns.hold(id, Instant::now()));
        drop(client);
        conns.flush(Instant::now());
        assert!(!conns.is_open(id), "a hang-up is seen");

        let (mut conns, id, _client) = one_request(b"reload --wait\n");
        assert!(conns.hold(id, Instant::now()));
        let line = [b'x'; 1024];
        for _ in 0..(MAX_HELD_OUTPUT / line.len() + 512) {
            conns.send(id, &line);
        }
        assert!(!conns.is_open(id), "output is bounded");
    }
}
