//! `--log-prefix`: workers' stdout and stderr reach the master through pipes, and the master
//! writes them to its own stdout and stderr line by line as `[w<slot> <pid>] line`. The
//! master's own log lines go out through the same stderr buffer, with or without
//! `--log-prefix`.
//!
//! The master's loop must never block on a slow terminal: it writes only when poll says its
//! stdout/stderr can take more, at most 4 KiB at a time (what a pipe or tty accepts without
//! blocking once it polls writable) and cut at a line end, so lines from different workers
//! never interleave mid-line. When more than 256 KiB wait for a stream, the master stops
//! reading the pipes that feed it: the pipes fill and the workers block in write(2), which
//! is the back-pressure. A pipe is read until EOF even after its worker was reaped, so the
//! last line a worker writes before it exits is not lost (a last line without a newline
//! gets one).

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

/// Bytes that may wait for one of the master's streams before the pipes feeding it pause.
const HIGH_WATER: usize = 256 * 1024;
/// Bytes written per write(2): what a writable pipe or tty takes without blocking.
const CHUNK: usize = 4096;
/// A line longer than this goes out in pieces (so output without newlines cannot pile up).
const MAX_LINE: usize = 4096;
/// Bytes read from one pipe per wake, so one chatty worker cannot hold the loop.
const READ_PER_WAKE: usize = 256 * 1024;
/// How long the master waits at exit for its streams to take what is left.
const EXIT_FLUSH: std::time::Duration = std::time::Duration::from_secs(1);

struct Pipe {
    fd: OwnedFd,
    /// 0: the master's stdout, 1: its stderr.
    stream: usize,
    prefix: Label,
    partial: Vec<u8>,
}

/// What marks a worker's line: `[w<slot> <pid>] ` as text, or (`--log-format json`) the
/// fields of the JSON object each line becomes.
#[derive(Debug, Clone)]
enum Label {
    Text(String),
    Json {
        slot: usize,
        pid: i32,
        generation: u64,
        stream: &'static str,
    },
}

/// The output pipes of every worker, and what waits to be written.
pub struct WorkerOutput {
    pipes: Vec<Pipe>,
    /// Bytes waiting for the master's stdout and stderr.
    pending: [Vec<u8>; 2],
    stdout: std::io::Stdout,
    stderr: std::io::Stderr,
}

impl Default for WorkerOutput {
    fn default() -> Self {
        WorkerOutput {
            pipes: Vec::new(),
            pending: [Vec::new(), Vec::new()],
            stdout: std::io::stdout(),
            stderr: std::io::stderr(),
        }
    }
}

impl WorkerOutput {
    /// Starts reading a new worker's stdout and stderr.
    pub fn add(&mut self, slot: usize, pid: i32, generation: u64, [out, err]: [OwnedFd; 2]) {
        let json = crate::log::is_json();
        for (stream, fd) in [out, err].into_iter().enumerate() {
            let prefix = match json {
                true => Label::Json {
                    slot,
                    pid,
                    generation,
                    stream: ["stdout", "stderr"][stream],
                },
                false => Label::Text(format!("[w{slot} {pid}] ")),
            };
            self.pipes.push(Pipe {
                fd,
                stream,
                prefix,
                partial: Vec::new(),
            });
        }
    }

    /// The fds to poll: pipes whose stream has room, and streams with bytes waiting
    /// (the master's own queued lines included: polling without them could sleep for ever
    /// with a line waiting).
    pub fn poll_fds(&mut self) -> Vec<(BorrowedFd<'_>, PollFlags)> {
        self.take_master_lines();
        let mut fds: Vec<_> = self
            .pipes
            .iter()
            .filter(|p| self.pending[p.stream].len() < HIGH_WATER)
            .map(|p| (p.fd.as_fd(), PollFlags::POLLIN))
            .collect();
        for (stream, pending) in self.pending.iter().enumerate() {
            if !pending.is_empty() {
                fds.push((self.stream(stream), PollFlags::POLLOUT));
            }
        }
        fds
    }

    /// Reads what the pipes have, and writes what the master's streams can take now.
    pub fn service(&mut self) {
        self.take_master_lines();
        self.read_pipes();
        for stream in 0..2 {
            while !self.pending[stream].is_empty() && writable(self.stream(stream)) {
                if !self.write_chunk(stream) {
                    break;
                }
            }
        }
    }

    /// At exit: takes what is left in the pipes and writes everything, waiting up to
    /// [`EXIT_FLUSH`] in all for streams to take it (a reader that never reads must not keep
    /// the master from exiting); what is left then is dropped.
    pub fn flush(&mut self) {
        self.pending[1].extend(crate::log::stop_queueing());
        self.read_pipes();
        let deadline = std::time::Instant::now() + EXIT_FLUSH;
        for stream in 0..2 {
            while !self.pending[stream].is_empty() {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
                let mut fds = [PollFd::new(self.stream(stream), PollFlags::POLLOUT)];
                if !matches!(
                    poll(&mut fds, PollTimeout::from(ms)),
                    Ok(1) | Err(Errno::EINTR)
                ) || !self.write_chunk(stream)
                {
                    break;
                }
            }
        }
    }

    /// The master's own log lines, queued by log.rs: they go into the same buffer as worker
    /// output, between whole lines, and never block the loop. While that buffer is full they
    /// stay queued (and log.rs drops and counts what does not fit there either).
    fn take_master_lines(&mut self) {
        if self.pending[1].len() < HIGH_WATER {
            self.pending[1].extend(crate::log::take_queued());
        }
    }

    fn read_pipes(&mut self) {
        let mut buf = vec![0u8; 64 * 1024];
        let pending = &mut self.pending;
        self.pipes.retain_mut(|pipe| {
            let mut read = 0;
            loop {
                if pending[pipe.stream].len() >= HIGH_WATER || read >= READ_PER_WAKE {
                    return true; // the rest waits for room, or for the next wake
                }
                match nix::unistd::read(&pipe.fd, &mut buf) {
                    Ok(0) => {
                        // EOF: every writer is gone. A last line without a newline still counts.
                        if !pipe.partial.is_empty() {
                            pipe.partial.push(b'\n');
                            emit(&mut pending[pipe.stream], &pipe.prefix, &pipe.partial);
                        }
                        return false;
                    }
                    Ok(n) => {
                        read += n;
                        let searched = pipe.partial.len();
                        pipe.partial.extend_from_slice(&buf[..n]);
                        // Only the bytes just read can hold a new line end.
                        let end = pipe.partial[searched..]
                            .iter()
                            .rposition(|b| *b == b'\n')
                            .map(|i| searched + i + 1)
                            .or((pipe.partial.len() >= MAX_LINE).then_some(pipe.partial.len()));
                        if let Some(end) = end {
                            let rest = pipe.partial.split_off(end);
                            if pipe.partial.last() != Some(&b'\n') {
                                pipe.partial.push(b'\n'); // a piece of an over-long line
                            }
                            emit(&mut pending[pipe.stream], &pipe.prefix, &pipe.partial);
                            pipe.partial = rest;
                        }
                    }
                    Err(Errno::EINTR) => continue,
                    Err(_) => return true, // EAGAIN: drained for now
                }
            }
        });
    }

    /// The master's stdout (0) or stderr (1).
    fn stream(&self, stream: usize) -> BorrowedFd<'_> {
        match stream {
            0 => self.stdout.as_fd(),
            _ => self.stderr.as_fd(),
        }
    }

    /// Writes up to one chunk, ending at a line end when one is in it; false on an error.
    fn write_chunk(&mut self, stream: usize) -> bool {
        let fd = match stream {
            0 => self.stdout.as_fd(),
            _ => self.stderr.as_fd(),
        };
        let pending = &mut self.pending[stream];
        let window = &pending[..pending.len().min(CHUNK)];
        let len = match window.iter().rposition(|b| *b == b'\n') {
            Some(end) => end + 1,
            None => window.len(), // a line longer than a chunk goes out in pieces
        };
        match nix::unistd::write(fd, &pending[..len]) {
            Ok(n) => {
                pending.drain(..n);
                true
            }
            Err(Errno::EINTR) => true,
            // A worker that shares the stream may have made it non-blocking (node does, for
            // its stdio pipes): full for now, the bytes wait for POLLOUT.
            Err(Errno::EAGAIN) => false,
            Err(_) => {
                // The master's own stream is gone (closed terminal): drop rather than spin.
                pending.clear();
                false
            }
        }
    }
}

/// Prefixes every line of `lines` (which ends with a newline) into `out`.
fn emit(out: &mut Vec<u8>, label: &Label, lines: &[u8]) {
    for line in lines.split_inclusive(|b| *b == b'\n') {
        match label {
            Label::Text(prefix) => {
                out.extend_from_slice(prefix.as_bytes());
                out.extend_from_slice(line);
            }
            Label::Json {
                slot,
                pid,
                generation,
                stream,
            } => {
                let text = line.strip_suffix(b"\n").unwrap_or(line);
                let object = serde_json::json!({
                    "ts": humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
                    "level": "info",
                    "slot": slot,
                    "pid": pid,
                    "generation": generation,
                    "stream": stream,
                    "line": String::from_utf8_lossy(text),
                });
                out.extend_from_slice(object.to_string().as_bytes());
                out.push(b'\n');
            }
        }
    }
}

/// Whether the master's stream takes a write now without blocking. An error or hang-up
/// counts too: the write then fails at once (EPIPE) and the bytes are dropped, instead of
/// the loop polling a dead stream for ever.
fn writable(fd: BorrowedFd<'_>) -> bool {
    let mut fds = [PollFd::new(fd, PollFlags::POLLOUT)];
    let ready = PollFlags::POLLOUT | PollFlags::POLLERR | PollFlags::POLLHUP | PollFlags::POLLNVAL;
    matches!(poll(&mut fds, PollTimeout::ZERO), Ok(1))
        && fds[0].revents().is_some_and(|r| r.intersects(ready))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    /// A WorkerOutput reading one worker's two pipes; returns their write ends.
    fn watched(slot: usize, pid: i32) -> (WorkerOutput, OwnedFd, OwnedFd) {
        let mut out = WorkerOutput::default();
        let (r1, w1) = nix::unistd::pipe().unwrap();
        let (r2, w2) = nix::unistd::pipe().unwrap();
        for r in [&r1, &r2] {
            let nonblocking = nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK);
            nix::fcntl::fcntl(r, nonblocking).unwrap();
        }
        out.add(slot, pid, 1, [r1, r2]);
        (out, w1, w2)
    }

    #[test]
    fn lines_are_prefixed_and_a_last_line_without_newline_is_kept() {
        let (mut out, w1, w2) = watched(3, 42);
        nix::unistd::write(&w1, b"one\ntw").unwrap();
        out.read_pipes();
        assert_eq!(out.pending[0], b"[w3 42] one\n");
        nix::unistd::write(&w1, b"o\nlast").unwrap();
        drop(w1);
        drop(w2);
        out.read_pipes();
        assert_eq!(out.pending[0], b"[w3 42] one\n[w3 42] two\n[w3 42] last\n");
        assert!(out.pipes.is_empty(), "both pipes reached EOF");
    }

    #[test]
    fn output_without_newlines_goes_out_in_pieces_instead_of_piling_up() {
        let (mut out, w1, _w2) = watched(1, 7);
        nix::unistd::write(&w1, &[b'x'; 10_000]).unwrap();
        out.read_pipes();
        assert!(
            out.pipes[0].partial.len() < MAX_LINE,
            "{}",
            out.pipes[0].partial.len()
        );
        assert!(out.pending[0].starts_with(b"[w1 7] xxx"));
        assert_eq!(
            out.pending[0].len(),
            "[w1 7] ".len() + 10_000 + 1,
            "all of it, now"
        );
    }

    #[test]
    fn a_full_buffer_stops_reading_the_pipe() {
        let (mut out, w1, _w2) = watched(0, 1);
        out.pending[0] = vec![b'x'; HIGH_WATER];
        nix::unistd::write(&w1, b"waits\n").unwrap();
        let stdout_pipe = out.pipes[0].fd.as_raw_fd();
        assert!(out
            .poll_fds()
            .iter()
            .all(|(fd, ev)| *ev != PollFlags::POLLIN || fd.as_raw_fd() != stdout_pipe));
        out.read_pipes();
        assert_eq!(
            out.pending[0].len(),
            HIGH_WATER,
            "nothing read while the stream is full"
        );
    }
}
