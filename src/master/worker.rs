//! A worker's identity and lifecycle: [`Slot`], [`Worker`], [`WorkerState`], [`ExitReason`].
//!
//! A slot is a permanent position in the cluster (index, CPU, restart history); a worker is
//! one process that fills it for a while. Every state change of a worker goes through
//! [`Worker::transition`], which is also where its log line is written.

use std::fmt;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::unistd::Pid;

/// The restart delay of a worker that served, whatever ended it, and the first delay of
/// a crash loop: the base delay.
pub const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Restart delays of a crash loop double up to this.
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// A rolling-restart generation; the first workers are generation 1.
pub type Generation = u64;

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitReason {
    /// exit(code).
    Code(i32),
    /// Killed by this signal number (real-time signals included).
    Signal(i32),
}

impl ExitReason {
    /// Killed by `signal`.
    #[cfg(test)]
    pub fn signal(signal: Signal) -> ExitReason {
        ExitReason::Signal(signal as i32)
    }
}

impl fmt::Display for ExitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            ExitReason::Code(c) => write!(f, "exit status {c}"),
            ExitReason::Signal(n) => match Signal::try_from(n) {
                Ok(s) => write!(f, "signal {}", s.as_str()),
                Err(_) if n >= nix::libc::SIGRTMIN() => {
                    write!(f, "signal SIGRTMIN+{}", n - nix::libc::SIGRTMIN())
                }
                Err(_) => write!(f, "signal {n}"),
            },
        }
    }
}

/// Where a worker is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerState {
    /// exec'd; not ready yet (see `master/readiness.rs`).
    Starting,
    /// Up and serving.
    Ready,
    /// Sent the stop signal at `since`; SIGKILLed once `killed`.
    Stopping {
        /// When the stop signal was sent.
        since: Instant,
        /// Whether SIGKILL has been sent too.
        killed: bool,
    },
    /// Reaped.
    Exited(ExitReason),
}

impl WorkerState {
    /// The name `status` shows.
    pub fn name(&self) -> &'static str {
        match self {
            WorkerState::Starting => "starting",
            WorkerState::Ready => "ready",
            WorkerState::Stopping { .. } => "stopping",
            WorkerState::Exited(_) => "exited",
        }
    }
}

/// One process filling a slot.
#[derive(Debug, Clone)]
pub struct Worker {
    /// Its pid, which is also its process group id.
    pub pid: Pid,
    /// The slot it fills.
    pub slot: usize,
    /// The CPU it is pinned to.
    pub cpu: Option<usize>,
    /// The generation it belongs to.
    pub generation: Generation,
    /// When it was exec'd.
    pub started: Instant,
    /// Where it is in its life.
    pub state: WorkerState,
    /// Inodes of its listening sockets, for `--ready listening`.
    pub sockets: Vec<u64>,
    /// The app's last sd_notify STATUS=.
    pub status: Option<String>,
    /// Time it gets after the stop signal, when not `--grace` (a hung worker's is short).
    pub stop_grace: Option<Duration>,
    /// Where it listens other than on the sockets it was given, if seen while starting.
    pub listens_elsewhere: Option<String>,
    /// When it became ready.
    pub ready_at: Option<Instant>,
}

impl Worker {
    /// A freshly exec'd worker, in [`WorkerState::Starting`].
    pub fn new(
        pid: Pid,
        slot: usize,
        cpu: Option<usize>,
        generation: Generation,
        now: Instant,
    ) -> Worker {
        Worker {
            pid,
            slot,
            cpu,
            generation,
            started: now,
            state: WorkerState::Starting,
            sockets: Vec::new(),
            status: None,
            stop_grace: None,
            listens_elsewhere: None,
            ready_at: None,
        }
    }

    /// Moves the worker to `to` and returns the log line for the change; the one place a
    /// worker's state changes. Illegal moves (out of `Exited`, back to `Starting`) are bugs.
    pub fn transition(&mut self, to: WorkerState, now: Instant) -> String {
        use WorkerState::*;
        let legal = matches!(
            (self.state, to),
            (Starting, Ready)
                | (Starting | Ready, Stopping { killed: false, .. })
                | (
                    Stopping { killed: false, .. },
                    Stopping { killed: true, .. }
                )
                | (Starting | Ready | Stopping { .. }, Exited(_))
        );
        debug_assert!(legal, "{self}: illegal move {:?} -> {to:?}", self.state);
        let up = ms(now.saturating_duration_since(self.started));
        let line = match to {
            Starting => format!("{self}: started"),
            Ready => format!("{self}: ready after {up}"),
            Stopping { killed: false, .. } => format!("{self}: stopping"),
            Stopping {
                killed: true,
                since,
            } => format!(
                "{self}: still running {} after the stop signal; sending SIGKILL",
                ms(now.saturating_duration_since(since))
            ),
            Exited(reason) => format!("{self}: exited ({reason}) after {up}"),
        };
        if to == Ready {
            self.ready_at = Some(now);
        }
        self.state = to;
        line
    }

    /// Whether it served: ready for at least `min_uptime` by `now`. A worker that dies
    /// sooner (or before it was ready) counts toward its slot's crash loop.
    pub fn served(&self, now: Instant, min_uptime: Duration) -> bool {
        self.ready_at
            .is_some_and(|r| now.saturating_duration_since(r) >= min_uptime)
    }

    /// How long it has been running.
    pub fn uptime(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.started)
    }
}

impl fmt::Display for Worker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "worker {} (pid {}", self.slot, self.pid)?;
        if let Some(cpu) = self.cpu {
            write!(f, ", cpu {cpu}")?;
        }
        write!(f, ", gen {})", self.generation)
    }
}

/// Reads back (slot, pid, generation) from a line that starts with a worker as its
/// `Display` writes it: `worker 2 (pid 4312, cpu 2, gen 3): …`.
pub fn parse_worker_prefix(line: &str) -> Option<(usize, i32, Generation)> {
    let rest = line.strip_prefix("worker ")?;
    let (slot, rest) = rest.split_once(" (pid ")?;
    let (inside, _) = rest.split_once(')')?;
    let mut parts = inside.split(", ");
    let pid = parts.next()?.parse().ok()?;
    let generation = parts.find_map(|p| p.strip_prefix("gen "))?.parse().ok()?;
    Some((slot.parse().ok()?, pid, generation))
}

/// What a slot holds between workers.
#[derive(Debug, Clone)]
pub enum SlotState {
    /// No worker and none planned (before start, or during shutdown).
    Empty,
    /// A worker crashed; the next one starts at `at`.
    Waiting {
        /// When to start the next worker.
        at: Instant,
    },
    /// The worker with this pid serves the slot.
    Filled(Pid),
}

/// A permanent position in the cluster: its CPU and its restart history.
#[derive(Debug, Clone)]
pub struct Slot {
    /// 0-based index, REUSEPORT_CLUSTER_WORKER.
    pub index: usize,
    /// The CPU its workers are pinned to.
    pub cpu: Option<usize>,
    /// What fills the slot now.
    pub state: SlotState,
    /// Generation of the slot's newest worker; a crashed worker is replaced by the same one.
    pub generation: Generation,
    /// Workers started to replace a crashed one.
    pub restarts: u32,
    /// How the last worker ended.
    pub last_exit: Option<ExitReason>,
    /// The next restart delay.
    pub backoff: Backoff,
    /// Why its last worker was recycled (master/recycle.rs), if one was.
    pub last_recycle: Option<String>,
    /// What killed its last worker, when the master can tell (master/deaths.rs).
    pub last_cause: Option<String>,
    /// Whether its last worker became ready: the app can start in it.
    pub can_start: bool,
    /// Restarting at the base delay although it crash-loops: every other slot is in
    /// backoff, and the port must not go dark by the launcher's own hand.
    pub kept_up: bool,
}

impl Slot {
    /// An empty slot.
    pub fn new(index: usize, cpu: Option<usize>) -> Slot {
        Slot {
            index,
            cpu,
            state: SlotState::Empty,
            generation: 1,
            restarts: 0,
            last_exit: None,
            backoff: Backoff::default(),
            last_recycle: None,
            last_cause: None,
            can_start: false,
            kept_up: false,
        }
    }

    /// The pid of the worker serving the slot, if any.
    pub fn pid(&self) -> Option<Pid> {
        match self.state {
            SlotState::Filled(pid) => Some(pid),
            _ => None,
        }
    }

    /// Names the slot in a log line when there is no worker to name.
    pub fn label(&self) -> String {
        match self.cpu {
            Some(cpu) => format!("worker {} (cpu {cpu})", self.index),
            None => format!("worker {}", self.index),
        }
    }
}

/// A slot's restart delay: [`BACKOFF_MIN`] after a worker that served, whatever ended it;
/// for quick deaths in a row (before ready, or within `--min-uptime` of it: a crash loop)
/// 100 ms doubling to 30 s.
#[derive(Debug, Clone, PartialEq)]
pub struct Backoff {
    next: Duration,
    /// Quick deaths in a row.
    quick: u32,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            next: BACKOFF_MIN,
            quick: 0,
        }
    }
}

impl Backoff {
    /// The delay after a worker that served: the base delay, and the loop is over.
    pub fn after_service(&mut self) -> Duration {
        *self = Backoff::default();
        BACKOFF_MIN
    }

    /// The delay after a quick death, and doubles the next one.
    pub fn after_quick_death(&mut self) -> Duration {
        self.quick += 1;
        let delay = self.next;
        self.next = (self.next * 2).min(BACKOFF_MAX);
        delay
    }

    /// Quick deaths in a row.
    pub fn quick_deaths(&self) -> u32 {
        self.quick
    }

    /// Whether the slot crash-loops: its delay grew past the base one (two quick deaths in
    /// a row, or more).
    pub fn crash_looping(&self) -> bool {
        self.quick >= 2
    }
}

/// Formats a duration for logs: `41 ms`, `3.2 s`.
pub fn ms(d: Duration) -> String {
    if d < Duration::from_secs(10) && d.as_millis() < 1000 {
        format!("{} ms", d.as_millis())
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_for_quick_deaths_caps_and_resets_after_service() {
        let mut b = Backoff::default();
        let delays: Vec<_> = (0..11).map(|_| b.after_quick_death().as_millis()).collect();
        assert_eq!(
            delays,
            [100, 200, 400, 800, 1600, 3200, 6400, 12800, 25600, 30000, 30000]
        );
        assert!(b.crash_looping());
        assert_eq!(b.after_service(), BACKOFF_MIN);
        assert!(!b.crash_looping());
        assert_eq!(b.after_quick_death(), BACKOFF_MIN);
        assert!(!b.crash_looping(), "one quick death is no loop");
        assert_eq!(b.after_quick_death(), Duration::from_millis(200));
    }

    #[test]
    fn a_worker_served_once_ready_for_min_uptime() {
        let t0 = Instant::now();
        let mut w = Worker::new(Pid::from_raw(42), 0, None, 1, t0);
        let second = Duration::from_secs(1);
        assert!(!w.served(t0 + 10 * second, second), "never ready");
        w.transition(WorkerState::Ready, t0 + 5 * second);
        assert!(!w.served(t0 + 5 * second + second / 2, second));
        assert!(w.served(t0 + 6 * second, second));
    }

    #[test]
    fn transitions_log_one_line_each() {
        let t0 = Instant::now();
        let mut w = Worker::new(Pid::from_raw(42), 2, Some(1), 1, t0);
        assert_eq!(w.to_string(), "worker 2 (pid 42, cpu 1, gen 1)");
        let line = w.transition(WorkerState::Ready, t0 + Duration::from_millis(41));
        assert_eq!(line, "worker 2 (pid 42, cpu 1, gen 1): ready after 41 ms");
        assert_eq!(parse_worker_prefix(&line), Some((2, 42, 1)));
        assert_eq!(
            parse_worker_prefix("worker 0 (cpu 1) (gen 2): exec failed"),
            None
        );
        assert_eq!(parse_worker_prefix("all 2 workers ready"), None);
        w.transition(
            WorkerState::Stopping {
                since: t0,
                killed: false,
            },
            t0,
        );
        let line = w.transition(WorkerState::Exited(ExitReason::signal(Signal::SIGTERM)), t0);
        assert!(
            line.ends_with("exited (signal SIGTERM) after 0 ms"),
            "{line}"
        );
        let rt = ExitReason::Signal(nix::libc::SIGRTMIN() + 2);
        assert_eq!(rt.to_string(), "signal SIGRTMIN+2");
    }

    #[test]
    #[should_panic(expected = "illegal move")]
    fn exited_is_final() {
        let t0 = Instant::now();
        let mut w = Worker::new(Pid::from_raw(1), 0, None, 1, t0);
        w.transition(WorkerState::Exited(ExitReason::Code(0)), t0);
        w.transition(WorkerState::Ready, t0);
    }
}
