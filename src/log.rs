//! The master's log: one line per event, to stderr, as text or (`--log-format json`) one
//! JSON object per line with ts, level, msg and, for a line about a worker, its slot, pid
//! and generation.
//!
//! Writes never panic (a closed stderr must not take the master down with it), never block
//! the master's loop (a reader that stops reading, such as a stuck journald, a full Docker
//! log pipe or a paused `| tee`, must not freeze supervision), and debug lines appear only
//! with `REUSEPORT_CLUSTER_LOG=debug`.

use std::os::fd::AsFd;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use crate::cli::LogFormat;

static FORMAT: OnceLock<LogFormat> = OnceLock::new();

/// Once the master's loop runs, its own lines queue here and the loop writes them when
/// stderr polls writable (master/worker_output.rs, which also carries `--log-prefix` output), so
/// that a full pipe never blocks the loop.
static QUEUED: Mutex<Option<Queue>> = Mutex::new(None);
/// Bytes queued at most; beyond that lines are dropped, and counted once the reader catches up.
const QUEUE_LIMIT: usize = 256 * 1024;
/// How long a line written directly (before and after the loop) may wait for stderr.
const DIRECT_WAIT: Duration = Duration::from_secs(1);

#[derive(Default)]
struct Queue {
    bytes: Vec<u8>,
    /// Lines dropped since the queue was last emptied.
    dropped: u64,
}

/// Queues the master's own lines from now on (see `QUEUED`).
pub fn queue_own_lines() {
    *QUEUED.lock().unwrap_or_else(|e| e.into_inner()) = Some(Queue::default());
}

/// Writes lines directly again (at exit), bounded in time; returns what was still queued.
pub fn stop_queueing() -> Vec<u8> {
    let queue = QUEUED.lock().unwrap_or_else(|e| e.into_inner()).take();
    queue
        .map(|mut q| {
            add_drop_note(&mut q);
            q.bytes
        })
        .unwrap_or_default()
}

/// The queued lines, whole; once the queue is empty again, a line saying how many were
/// dropped while it was full follows them.
pub fn take_queued() -> Vec<u8> {
    match QUEUED.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
        Some(queue) => {
            add_drop_note(queue);
            std::mem::take(&mut queue.bytes)
        }
        None => Vec::new(),
    }
}

fn add_drop_note(queue: &mut Queue) {
    if queue.dropped > 0 {
        let note = format(
            Level::Warn,
            &format!(
                "{} log lines dropped: stderr was not being read (a stuck log reader?)",
                std::mem::take(&mut queue.dropped)
            ),
        );
        queue.bytes.extend_from_slice(note.as_bytes());
        queue.bytes.push(b'\n');
    }
}

/// Sets the format of every later line (once, at start-up).
pub fn set_format(format: LogFormat) {
    let _ = FORMAT.set(format);
}

/// Whether lines are JSON objects (`--log-format json`).
pub fn is_json() -> bool {
    FORMAT.get() == Some(&LogFormat::Json)
}

/// How important a line is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// Only with REUSEPORT_CLUSTER_LOG=debug.
    Debug,
    /// Normal operation.
    Info,
    /// Something the operator should fix.
    Warn,
    /// Why the master exits non-zero.
    Error,
}

fn debug_enabled() -> bool {
    static DEBUG: OnceLock<bool> = OnceLock::new();
    *DEBUG.get_or_init(|| std::env::var("REUSEPORT_CLUSTER_LOG").is_ok_and(|v| v == "debug"))
}

/// Writes one line at `level`.
pub fn line(level: Level, msg: &str) {
    if level == Level::Debug && !debug_enabled() {
        return;
    }
    let text = format(level, msg);
    if let Some(queue) = QUEUED.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
        if queue.bytes.len() < QUEUE_LIMIT {
            queue.bytes.extend_from_slice(text.as_bytes());
            queue.bytes.push(b'\n');
        } else {
            queue.dropped += 1;
        }
        return;
    }
    write_direct(format!("{text}\n").as_bytes());
}

/// Writes `bytes` to stderr, waiting at most [`DIRECT_WAIT`] for it to take them: at exit a
/// reader that never reads must not keep the master (and its stop) hanging.
pub fn write_direct(bytes: &[u8]) {
    let stderr = std::io::stderr();
    let deadline = Instant::now() + DIRECT_WAIT;
    let mut rest = bytes;
    while !rest.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut fds = [PollFd::new(stderr.as_fd(), PollFlags::POLLOUT)];
        let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(0) => return, // not writable in time: dropped
            Ok(_) => {}
            Err(Errno::EINTR) => continue,
            Err(_) => return,
        }
        // At most a pipe's atomic size per write: what a pipe that polls writable takes.
        let chunk = &rest[..rest.len().min(4096)];
        match nix::unistd::write(&stderr, chunk) {
            Ok(n) => rest = &rest[n..],
            Err(Errno::EINTR | Errno::EAGAIN) => {}
            Err(_) => return,
        }
        if Instant::now() >= deadline {
            return;
        }
    }
}

/// One line as it is written, without its newline.
fn format(level: Level, msg: &str) -> String {
    let (prefix, name) = match level {
        Level::Debug => ("debug: ", "debug"),
        Level::Info => ("", "info"),
        Level::Warn => ("warning: ", "warn"),
        Level::Error => ("error: ", "error"),
    };
    match FORMAT.get() {
        Some(LogFormat::Json) => json(name, msg),
        _ => format!("{prefix}{msg}"),
    }
}

fn json(level: &str, msg: &str) -> String {
    let mut object = serde_json::json!({
        "ts": humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
        "level": level,
        "msg": msg,
    });
    if let Some((slot, pid, generation)) = crate::master::worker::parse_worker_prefix(msg) {
        object["slot"] = slot.into();
        object["pid"] = pid.into();
        object["generation"] = generation.into();
    }
    object.to_string()
}

/// Logs a formatted info line.
#[macro_export]
macro_rules! info {
    ($($arg:tt)*) => { $crate::log::line($crate::log::Level::Info, &format!($($arg)*)) };
}

/// Logs a formatted warning.
#[macro_export]
macro_rules! warn {
    ($($arg:tt)*) => { $crate::log::line($crate::log::Level::Warn, &format!($($arg)*)) };
}

/// Logs a formatted debug line.
#[macro_export]
macro_rules! debug {
    ($($arg:tt)*) => { $crate::log::line($crate::log::Level::Debug, &format!($($arg)*)) };
}
