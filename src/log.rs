//! The master's log: one line per event, to stderr.
//!
//! Writes never panic (a closed stderr must not take the master down with it), and debug
//! lines appear only with `REUSEPORT_CLUSTER_LOG=debug`.

use std::io::Write;
use std::sync::OnceLock;

/// How important a line is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// Only with REUSEPORT_CLUSTER_LOG=debug.
    Debug,
    /// Normal operation.
    Info,
    /// Something the operator should fix.
    Warn,
}

fn debug_enabled() -> bool {
    static DEBUG: OnceLock<bool> = OnceLock::new();
    *DEBUG.get_or_init(|| std::env::var("REUSEPORT_CLUSTER_LOG").is_ok_and(|v| v == "debug"))
}

/// Writes one line at `level`.
pub fn line(level: Level, msg: &str) {
    let prefix = match level {
        Level::Debug if !debug_enabled() => return,
        Level::Debug => "debug: ",
        Level::Info => "",
        Level::Warn => "warning: ",
    };
    let _ = writeln!(std::io::stderr().lock(), "{prefix}{msg}");
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
