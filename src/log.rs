//! The master's log: one line per event, to stderr, as text or (`--log-format json`) one
//! JSON object per line with ts, level, msg and, for a line about a worker, its slot, pid
//! and generation.
//!
//! Writes never panic (a closed stderr must not take the master down with it), and debug
//! lines appear only with `REUSEPORT_CLUSTER_LOG=debug`.

use std::io::Write;
use std::sync::{Mutex, OnceLock};

use crate::cli::LogFormat;

static FORMAT: OnceLock<LogFormat> = OnceLock::new();

/// With `--log-prefix`, stderr carries worker output that the master writes only when
/// stderr can take it; the master's own lines then queue here and join that stream
/// (worker_output.rs), instead of blocking the loop on a full pipe.
static QUEUED: Mutex<Option<Vec<u8>>> = Mutex::new(None);
/// Bytes queued at most; beyond that lines are dropped (and counted in the next line).
const QUEUE_LIMIT: usize = 1024 * 1024;

/// Queues the master's own lines from now on (see `QUEUED`).
pub fn queue_own_lines() {
    *QUEUED.lock().unwrap_or_else(|e| e.into_inner()) = Some(Vec::new());
}

/// The queued lines, whole.
pub fn take_queued() -> Vec<u8> {
    match QUEUED.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
        Some(queue) => std::mem::take(queue),
        None => Vec::new(),
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
    let (prefix, name) = match level {
        Level::Debug if !debug_enabled() => return,
        Level::Debug => ("debug: ", "debug"),
        Level::Info => ("", "info"),
        Level::Warn => ("warning: ", "warn"),
        Level::Error => ("error: ", "error"),
    };
    let text = match FORMAT.get() {
        Some(LogFormat::Json) => json(name, msg),
        _ => format!("{prefix}{msg}"),
    };
    if let Some(queue) = QUEUED.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
        if queue.len() < QUEUE_LIMIT {
            queue.extend_from_slice(text.as_bytes());
            queue.push(b'\n');
        }
        return;
    }
    let _ = writeln!(std::io::stderr().lock(), "{text}");
}

fn json(level: &str, msg: &str) -> String {
    let mut object = serde_json::json!({
        "ts": humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
        "level": level,
        "msg": msg,
    });
    if let Some((slot, pid, generation)) = crate::worker::parse_worker_prefix(msg) {
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
