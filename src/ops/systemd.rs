//! The master as a systemd service: it speaks sd_notify to its own supervisor when its
//! environment has NOTIFY_SOCKET (Type=notify or Type=notify-reload units).
//!
//! READY=1 (with MAINPID and STATUS) once all initial workers are ready; RELOADING=1 with
//! MONOTONIC_USEC when a rolling restart starts and READY=1 when it ends, as
//! Type=notify-reload expects (its ExecReload sends SIGHUP); STOPPING=1 on shutdown;
//! STATUS= "N/N workers ready, generation G" as it changes; WATCHDOG=1 every half
//! WATCHDOG_USEC, from the event loop, so a stuck loop is noticed by systemd.
//! The master never hands this socket to its workers (see master/spawn.rs).

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::{Duration, Instant};

use nix::time::{clock_gettime, ClockId};

use crate::debug;

/// What the supervisor's state means for systemd, read after every turn of the loop.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct View {
    /// Every slot's worker is ready.
    pub all_ready: bool,
    /// A rolling restart is under way.
    pub reloading: bool,
    /// Rolling restarts begun so far (one may begin and fail between two views).
    pub rolling_started: u64,
    /// The master is shutting down.
    pub stopping: bool,
    /// The STATUS= text.
    pub status: String,
}

/// The connection to systemd's notify socket.
pub struct SystemdNotify {
    socket: UnixDatagram,
    addr: SocketAddr,
    watchdog: Option<Duration>,
    next_watchdog: Instant,
    ready_sent: bool,
    last: View,
}

impl SystemdNotify {
    /// Connects to $NOTIFY_SOCKET, if the master runs under a supervisor that set it.
    pub fn from_env(now: Instant) -> Option<SystemdNotify> {
        let path = std::env::var("NOTIFY_SOCKET")
            .ok()
            .filter(|p| !p.is_empty())?;
        let addr = match path.strip_prefix('@') {
            Some(abstract_name) => SocketAddr::from_abstract_name(abstract_name.as_bytes()),
            None => SocketAddr::from_pathname(&path),
        }
        .ok()?;
        let socket = UnixDatagram::unbound().ok()?;
        // Never block the loop on a supervisor that does not read: a message that does not
        // fit is dropped (the next WATCHDOG=1 comes at the next tick).
        socket.set_nonblocking(true).ok()?;
        // WATCHDOG_PID, when set, names the process the watchdog is for.
        let ours = std::env::var("WATCHDOG_PID")
            .map_or(true, |p| p.trim() == std::process::id().to_string());
        let watchdog = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|u| u.trim().parse::<u64>().ok())
            .filter(|u| *u > 0 && ours)
            .map(|u| Duration::from_micros(u) / 2);
        Some(SystemdNotify {
            socket,
            addr,
            watchdog,
            next_watchdog: now,
            ready_sent: false,
            last: View::default(),
        })
    }

    /// When the next WATCHDOG=1 is due.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.watchdog.map(|_| self.next_watchdog)
    }

    /// Sends WATCHDOG=1 if it is due.
    pub fn tick(&mut self, now: Instant) {
        if let Some(interval) = self.watchdog.filter(|_| now >= self.next_watchdog) {
            self.send("WATCHDOG=1");
            self.next_watchdog = now + interval;
        }
    }

    /// Tells systemd what changed since the last view.
    pub fn update(&mut self, view: View) {
        let mut messages: Vec<String> = Vec::new();
        if view.stopping && !self.last.stopping {
            messages.push("STOPPING=1".into());
        } else if !view.stopping {
            let new_pass = view.rolling_started > self.last.rolling_started;
            if new_pass {
                let usec = clock_gettime(ClockId::CLOCK_MONOTONIC)
                    .map(|t| t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1000)
                    .unwrap_or(0);
                messages.push(format!("RELOADING=1\nMONOTONIC_USEC={usec}"));
            }
            // The pass ended (done or failed), perhaps in the very turn it began.
            if (new_pass || self.last.reloading) && !view.reloading && self.ready_sent {
                messages.push("READY=1".into());
            } else if view.all_ready && !self.ready_sent {
                messages.push(format!("READY=1\nMAINPID={}", std::process::id()));
                self.ready_sent = true;
            }
        }
        if view.status != self.last.status {
            messages.push(format!("STATUS={}", view.status));
        }
        for message in &messages {
            self.send(message);
        }
        self.last = view;
    }

    fn send(&self, message: &str) {
        if let Err(e) = self.socket.send_to_addr(message.as_bytes(), &self.addr) {
            debug!("sd_notify {message:?}: {e}");
        }
    }
}
