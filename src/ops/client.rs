//! The client side of a waiting `reload`, `scale` or `stop`: it sends the request with
//! `--wait`, shows the progress lines as they come and exits with the code the last line
//! stands for (see `ops/waiting.rs`).
//!
//! On a terminal the slot being started is one live line with a running clock, finished
//! when its worker is ready; otherwise every line is printed as it comes, for logs and CI.

use std::io::{BufRead, BufReader, ErrorKind, IsTerminal, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::master::worker::ms;
use crate::ops::waiting::Line;

/// Exit code when `--timeout` passes before the outcome.
pub const TIMED_OUT: u8 = 5;

/// How often the live line's clock is redrawn.
const TICK: Duration = Duration::from_millis(100);

/// Sends `request --wait` to the master at `path` and follows it to its outcome; returns
/// the exit code.
pub fn follow(path: &Path, request: &str, timeout: Option<Duration>) -> anyhow::Result<u8> {
    let mut stream = crate::ops::control::connect(path)?;
    stream.write_all(format!("{request} --wait\n").as_bytes())?;
    let deadline = timeout.map(|t| Instant::now() + t);
    let live = std::io::stdout().is_terminal();
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut screen = Screen {
        live,
        pending: None,
    };
    let mut line = String::new();
    loop {
        let now = Instant::now();
        if deadline.is_some_and(|d| now >= d) {
            screen.clear();
            let waited = timeout.unwrap_or_default();
            crate::log::line(
                crate::log::Level::Error,
                &format!(
                    "no outcome after {}: the {request} goes on in the master; \
                     `reuseport-cluster status` shows where it is",
                    ms(waited)
                ),
            );
            return Ok(TIMED_OUT);
        }
        let mut wait = deadline.map(|d| d - now);
        if live {
            wait = Some(wait.map_or(TICK, |w| w.min(TICK)));
        }
        stream.set_read_timeout(wait.map(|w| w.max(Duration::from_millis(1))))?;
        match reader.read_line(&mut line) {
            Ok(0) => {
                screen.clear();
                anyhow::bail!(
                    "the master closed the connection before the outcome of the {request} \
                     (did it die? see its log)"
                );
            }
            Ok(_) if !line.ends_with('\n') => continue, // the rest comes next
            Ok(_) => {
                let text = line.trim_end().to_string();
                line.clear();
                match text.strip_prefix("progress: ") {
                    Some(progress) => screen.progress(progress),
                    None => {
                        screen.clear();
                        let code = Line::exit_code(&text);
                        match code {
                            0 => println!("{text}"),
                            _ => {
                                let rest = text.split_once(": ").map_or(&text[..], |(_, r)| r);
                                crate::log::line(crate::log::Level::Error, rest);
                            }
                        }
                        return Ok(code);
                    }
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                screen.tick();
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e).context("reading the master's answer"),
        }
    }
}

/// What the terminal shows.
struct Screen {
    live: bool,
    /// The line being redrawn with its clock: its text and when it came.
    pending: Option<(String, Instant)>,
}

impl Screen {
    fn progress(&mut self, text: &str) {
        if !self.live {
            println!("{text}");
            return;
        }
        self.clear();
        if text.contains(" starting") {
            self.pending = Some((text.to_string(), Instant::now()));
            self.tick();
        } else {
            println!("{text}");
        }
    }

    fn tick(&mut self) {
        if let Some((text, since)) = &self.pending {
            print!("\r\x1b[K{text} … {}", ms(since.elapsed()));
            let _ = std::io::stdout().flush();
        }
    }

    fn clear(&mut self) {
        if self.live && self.pending.take().is_some() {
            print!("\r\x1b[K");
            let _ = std::io::stdout().flush();
        }
    }
}
