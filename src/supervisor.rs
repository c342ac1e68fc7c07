//! The supervision state machine: `step(event, now) -> actions`, with no syscalls.
//!
//! The master's loop (`master.rs`) turns signals, child exits and timers into [`Event`]s
//! and carries out the [`Action`]s returned here (fork, signal a process group, log, exit).
//! Keeping the decisions free of I/O is what lets the unit tests below drive a whole
//! cluster's life (start-up failure, crash loops, grace expiry) in microseconds.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::unistd::Pid;

use crate::worker::{ms, ExitReason, Generation, Slot, SlotState, Worker, WorkerState, SETTLE};

/// Something that happened to the cluster.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The master is up: start every slot.
    Start,
    /// A worker for `slot` was forked and exec'd.
    Spawned {
        /// The slot it fills.
        slot: usize,
        /// Its pid (and process group).
        pid: Pid,
    },
    /// Starting a worker for `slot` failed before or at exec.
    SpawnFailed {
        /// The slot that stays empty.
        slot: usize,
        /// What failed, as one line.
        error: String,
    },
    /// A child was reaped (a worker, or an orphan we adopted as subreaper).
    Exited {
        /// The reaped pid.
        pid: Pid,
        /// How it ended.
        reason: ExitReason,
    },
    /// SIGTERM / SIGINT: stop gracefully; a second one escalates.
    StopGracefully,
    /// SIGQUIT: SIGKILL every worker now.
    StopNow,
    /// Time passed; timers may be due.
    Tick,
}

/// Something the master must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Fork and exec a worker for `slot`.
    Spawn {
        /// The slot to fill.
        slot: usize,
        /// The CPU to pin it to.
        cpu: Option<usize>,
        /// Its generation.
        generation: Generation,
    },
    /// Send `signal` to the process group `pgid`.
    Signal {
        /// A worker's process group (its pid).
        pgid: Pid,
        /// The signal.
        signal: Signal,
    },
    /// Write a line to the master's log.
    Log(String),
    /// Everything has stopped: exit.
    Exit(Outcome),
}

/// How the cluster ended; `main` maps it to the exit code.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Every worker stopped within the grace period (exit 0).
    Stopped,
    /// Some worker had to be SIGKILLed (exit 3).
    Killed,
    /// Start-up failed (exit 1).
    Failed(String),
}

/// Where the cluster as a whole is.
#[derive(Debug, Clone, PartialEq)]
enum Phase {
    /// No worker has stayed up yet: any failure ends the master.
    Starting,
    /// Supervising: crashed workers are restarted with backoff.
    Running,
    /// Shutting down.
    Stopping {
        /// When the grace period ends.
        deadline: Instant,
        /// Whether SIGKILL was sent.
        forced: bool,
        /// The start-up failure that caused the stop, if any.
        failure: Option<String>,
    },
    /// Exit was returned.
    Done,
}

/// Supervisor settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Number of slots.
    pub workers: usize,
    /// CPU of each slot.
    pub cpus: Vec<Option<usize>>,
    /// Time a stopping worker gets before SIGKILL.
    pub grace: Duration,
    /// Signal that asks a worker to stop.
    pub stop_signal: Signal,
}

/// The cluster's state and the rules that change it.
#[derive(Debug)]
pub struct Supervisor {
    settings: Settings,
    slots: Vec<Slot>,
    phase: Phase,
    generation: Generation,
    started: Instant,
    /// The next slot of the initial start-up to fork; they are forked one after the other
    /// so that a failing first worker does not cost N forks.
    next_initial: usize,
    all_up_logged: bool,
}

impl Supervisor {
    /// A supervisor with empty slots; send [`Event::Start`] to begin.
    pub fn new(settings: Settings, now: Instant) -> Supervisor {
        let slots = (0..settings.workers)
            .map(|i| Slot::new(i, settings.cpus.get(i).copied().flatten()))
            .collect();
        Supervisor {
            settings,
            slots,
            phase: Phase::Starting,
            generation: 1,
            started: now,
            next_initial: 0,
            all_up_logged: false,
        }
    }

    /// The slots, for tests.
    #[cfg(test)]
    pub fn slots(&self) -> &[Slot] {
        &self.slots
    }

    /// Whether `pid` is a current worker (as opposed to an adopted orphan).
    pub fn is_worker(&self, pid: Pid) -> bool {
        self.slots
            .iter()
            .any(|s| s.worker().is_some_and(|w| w.pid == pid))
    }

    /// The earliest moment a [`Event::Tick`] has something to do.
    pub fn next_deadline(&self) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        let mut consider = |t: Instant| next = Some(next.map_or(t, |n| n.min(t)));
        for slot in &self.slots {
            match &slot.state {
                SlotState::Filled(w) if w.state == WorkerState::Starting => {
                    consider(w.started + SETTLE)
                }
                SlotState::Waiting { at } => consider(*at),
                _ => {}
            }
        }
        if let Phase::Stopping {
            deadline,
            forced: false,
            ..
        } = self.phase
        {
            consider(deadline);
        }
        next
    }

    /// Applies one event and returns what the master must do, in order.
    pub fn step(&mut self, event: Event, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        match event {
            Event::Start => self.spawn_next_initial(&mut out),
            Event::Spawned { slot, pid } => self.on_spawned(slot, pid, now, &mut out),
            Event::SpawnFailed { slot, error } => self.on_spawn_failed(slot, error, now, &mut out),
            Event::Exited { pid, reason } => self.on_exited(pid, reason, now, &mut out),
            Event::StopGracefully => {
                if matches!(self.phase, Phase::Stopping { .. }) {
                    out.push(Action::Log(
                        "second stop request: killing every worker now".into(),
                    ));
                    self.kill_all(now, &mut out);
                } else {
                    self.begin_stop(None, now, &mut out);
                }
            }
            Event::StopNow => {
                if !matches!(self.phase, Phase::Stopping { .. }) {
                    self.begin_stop(None, now, &mut out);
                }
                self.kill_all(now, &mut out);
            }
            Event::Tick => self.on_tick(now, &mut out),
        }
        self.finish_if_stopped(&mut out);
        out
    }

    fn on_spawned(&mut self, index: usize, pid: Pid, now: Instant, out: &mut Vec<Action>) {
        let slot = &mut self.slots[index];
        let mut worker = Worker::new(pid, index, slot.cpu, self.generation, now);
        out.push(Action::Log(format!("{worker}: started")));
        if let Phase::Stopping { forced, .. } = self.phase {
            // Forked just before the stop was decided (the rest of a start-up batch).
            out.push(Action::Log(worker.transition(stopping(now), now)));
            out.push(self.signal(pid, self.settings.stop_signal));
            if forced {
                out.push(Action::Log(worker.transition(killed(now), now)));
                out.push(self.signal(pid, Signal::SIGKILL));
            }
        }
        self.slots[index].state = SlotState::Filled(worker);
        self.spawn_next_initial(out);
    }

    fn spawn_next_initial(&mut self, out: &mut Vec<Action>) {
        if let (Phase::Starting | Phase::Running, Some(slot)) =
            (&self.phase, self.slots.get(self.next_initial))
        {
            out.push(Action::Spawn {
                slot: slot.index,
                cpu: slot.cpu,
                generation: self.generation,
            });
            self.next_initial += 1;
        }
    }

    fn on_spawn_failed(
        &mut self,
        index: usize,
        error: String,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        let slot = &mut self.slots[index];
        let line = format!("{}: {error}", slot.label());
        match self.phase {
            Phase::Starting => self.begin_stop(Some(line), now, out),
            Phase::Running => {
                let delay = slot.backoff.delay(Duration::ZERO);
                slot.state = SlotState::Waiting { at: now + delay };
                out.push(Action::Log(format!("{line}; retrying in {}", ms(delay))));
            }
            Phase::Stopping { .. } | Phase::Done => out.push(Action::Log(line)),
        }
    }

    fn on_exited(&mut self, pid: Pid, reason: ExitReason, now: Instant, out: &mut Vec<Action>) {
        let Some(slot) = self
            .slots
            .iter_mut()
            .find(|s| s.worker().is_some_and(|w| w.pid == pid))
        else {
            return; // an orphan adopted as subreaper: reaping it was all that was owed
        };
        let SlotState::Filled(mut worker) = std::mem::replace(&mut slot.state, SlotState::Empty)
        else {
            unreachable!("found by its worker")
        };
        let uptime = worker.uptime(now);
        let line = worker.transition(WorkerState::Exited(reason), now);
        slot.last_exit = Some(reason);
        match self.phase {
            Phase::Starting => {
                self.begin_stop(Some(format!("{line}, before any worker was up")), now, out)
            }
            Phase::Running => {
                let delay = slot.backoff.delay(uptime);
                slot.state = SlotState::Waiting { at: now + delay };
                out.push(Action::Log(format!("{line}; restarting in {}", ms(delay))));
            }
            Phase::Stopping { .. } | Phase::Done => out.push(Action::Log(line)),
        }
    }

    fn on_tick(&mut self, now: Instant, out: &mut Vec<Action>) {
        let stopping = matches!(self.phase, Phase::Stopping { .. } | Phase::Done);
        for slot in &mut self.slots {
            match &mut slot.state {
                SlotState::Filled(w)
                    if w.state == WorkerState::Starting && now >= w.started + SETTLE =>
                {
                    out.push(Action::Log(w.transition(WorkerState::Ready, now)));
                    if self.phase == Phase::Starting {
                        self.phase = Phase::Running;
                    }
                }
                SlotState::Waiting { at } if *at <= now && !stopping => {
                    slot.state = SlotState::Empty;
                    slot.restarts += 1;
                    out.push(Action::Spawn {
                        slot: slot.index,
                        cpu: slot.cpu,
                        generation: self.generation,
                    });
                }
                _ => {}
            }
        }
        let all_up = self
            .slots
            .iter()
            .all(|s| s.worker().is_some_and(|w| w.state == WorkerState::Ready));
        if all_up && !self.all_up_logged {
            self.all_up_logged = true;
            out.push(Action::Log(format!(
                "all {} workers up, {} after start",
                self.slots.len(),
                ms(now.saturating_duration_since(self.started))
            )));
        }
        if let Phase::Stopping {
            deadline,
            forced: false,
            ..
        } = self.phase
        {
            if now >= deadline {
                out.push(Action::Log(format!(
                    "grace period of {} is over",
                    ms(self.settings.grace)
                )));
                self.kill_all(now, out);
            }
        }
    }

    /// Sends the stop signal to every worker and cancels pending restarts.
    fn begin_stop(&mut self, failure: Option<String>, now: Instant, out: &mut Vec<Action>) {
        if let Some(f) = &failure {
            out.push(Action::Log(format!("start-up failed: {f}")));
        }
        out.push(Action::Log(format!(
            "stopping {} workers (grace {})",
            self.slots.iter().filter(|s| s.worker().is_some()).count(),
            ms(self.settings.grace)
        )));
        self.phase = Phase::Stopping {
            deadline: now + self.settings.grace,
            forced: false,
            failure,
        };
        let stop_signal = self.settings.stop_signal;
        for slot in &mut self.slots {
            match &mut slot.state {
                SlotState::Waiting { .. } => slot.state = SlotState::Empty,
                SlotState::Filled(w) if !matches!(w.state, WorkerState::Stopping { .. }) => {
                    out.push(Action::Log(w.transition(stopping(now), now)));
                    out.push(Action::Signal {
                        pgid: w.pid,
                        signal: stop_signal,
                    });
                }
                _ => {}
            }
        }
    }

    /// SIGKILLs every worker's process group.
    fn kill_all(&mut self, now: Instant, out: &mut Vec<Action>) {
        if let Phase::Stopping { forced, .. } = &mut self.phase {
            *forced = true;
        }
        for slot in &mut self.slots {
            if let SlotState::Filled(w) = &mut slot.state {
                if let WorkerState::Stopping {
                    since,
                    killed: false,
                } = w.state
                {
                    out.push(Action::Log(w.transition(killed(since), now)));
                }
                out.push(Action::Signal {
                    pgid: w.pid,
                    signal: Signal::SIGKILL,
                });
            }
        }
    }

    fn finish_if_stopped(&mut self, out: &mut Vec<Action>) {
        let Phase::Stopping {
            forced, failure, ..
        } = &self.phase
        else {
            return;
        };
        if self.slots.iter().any(|s| s.worker().is_some()) {
            return;
        }
        let outcome = match (failure, forced) {
            (Some(f), _) => Outcome::Failed(f.clone()),
            (None, true) => Outcome::Killed,
            (None, false) => Outcome::Stopped,
        };
        out.push(Action::Log("all workers stopped".into()));
        out.push(Action::Exit(outcome));
        self.phase = Phase::Done;
    }

    fn signal(&self, pgid: Pid, signal: Signal) -> Action {
        Action::Signal { pgid, signal }
    }
}

fn stopping(now: Instant) -> WorkerState {
    WorkerState::Stopping {
        since: now,
        killed: false,
    }
}

/// The SIGKILLed state of a worker asked to stop at `since`.
fn killed(since: Instant) -> WorkerState {
    WorkerState::Stopping {
        since,
        killed: true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TERM: Signal = Signal::SIGTERM;

    fn sup(workers: usize) -> (Supervisor, Instant) {
        let t0 = Instant::now();
        let s = Supervisor::new(
            Settings {
                workers,
                cpus: (0..workers).map(|i| Some(i % 2)).collect(),
                grace: Duration::from_secs(5),
                stop_signal: TERM,
            },
            t0,
        );
        (s, t0)
    }

    fn pid(n: i32) -> Pid {
        Pid::from_raw(n)
    }

    fn spawns(actions: &[Action]) -> Vec<usize> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Spawn { slot, .. } => Some(*slot),
                _ => None,
            })
            .collect()
    }

    fn signals(actions: &[Action]) -> Vec<(i32, Signal)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Signal { pgid, signal } => Some((pgid.as_raw(), *signal)),
                _ => None,
            })
            .collect()
    }

    fn exit(actions: &[Action]) -> Option<Outcome> {
        actions.iter().find_map(|a| match a {
            Action::Exit(o) => Some(o.clone()),
            _ => None,
        })
    }

    /// Starts `n` workers with pids 100.. and lets them settle.
    fn running(n: usize) -> (Supervisor, Instant) {
        let (mut s, t0) = sup(n);
        assert_eq!(spawns(&s.step(Event::Start, t0)), vec![0]);
        for i in 0..n {
            let next = spawns(&s.step(
                Event::Spawned {
                    slot: i,
                    pid: pid(100 + i as i32),
                },
                t0,
            ));
            let expected: Vec<usize> = if i + 1 < n { vec![i + 1] } else { vec![] };
            assert_eq!(next, expected, "start-up forks one slot after the other");
        }
        assert_eq!(s.next_deadline(), Some(t0 + SETTLE));
        let out = s.step(Event::Tick, t0 + SETTLE);
        assert!(out.contains(&Action::Log(format!(
            "all {n} workers up, 1.0 s after start"
        ))));
        assert_eq!(s.phase, Phase::Running);
        assert_eq!(s.next_deadline(), None, "idle means no timer");
        (s, t0 + SETTLE)
    }

    #[test]
    fn crashed_worker_is_restarted_in_its_slot_after_backoff() {
        let (mut s, t) = running(2);
        let out = s.step(
            Event::Exited {
                pid: pid(101),
                reason: ExitReason::Code(1),
            },
            t,
        );
        assert!(matches!(&out[..], [Action::Log(l)] if l.contains("restarting in 100 ms")));
        assert_eq!(s.next_deadline(), Some(t + Duration::from_millis(100)));
        assert!(spawns(&s.step(Event::Tick, t + Duration::from_millis(99))).is_empty());
        let out = s.step(Event::Tick, t + Duration::from_millis(100));
        assert_eq!(
            out,
            vec![Action::Spawn {
                slot: 1,
                cpu: Some(1),
                generation: 1
            }]
        );
        assert_eq!(s.slots()[1].restarts, 1);

        // The replacement crashes at once: the delay doubles.
        let t2 = t + Duration::from_millis(100);
        s.step(
            Event::Spawned {
                slot: 1,
                pid: pid(200),
            },
            t2,
        );
        let out = s.step(
            Event::Exited {
                pid: pid(200),
                reason: ExitReason::Signal(Signal::SIGKILL),
            },
            t2,
        );
        assert!(
            matches!(&out[..], [Action::Log(l)] if l.contains("signal SIGKILL") && l.contains("restarting in 200 ms")),
            "{out:?}"
        );
    }

    #[test]
    fn failure_before_any_worker_is_up_stops_everything_and_fails() {
        let (mut s, t0) = sup(3);
        s.step(Event::Start, t0);
        s.step(
            Event::Spawned {
                slot: 0,
                pid: pid(100),
            },
            t0,
        );
        let out = s.step(
            Event::SpawnFailed {
                slot: 1,
                error: "binding 127.0.0.1:1: denied".into(),
            },
            t0,
        );
        assert_eq!(signals(&out), vec![(100, TERM)]);
        assert!(spawns(&out).is_empty(), "slot 2 is never forked");
        let out = s.step(
            Event::Exited {
                pid: pid(100),
                reason: ExitReason::Signal(TERM),
            },
            t0,
        );
        assert_eq!(
            exit(&out),
            Some(Outcome::Failed(
                "worker 1 (cpu 1): binding 127.0.0.1:1: denied".into()
            ))
        );
    }

    #[test]
    fn app_exiting_at_once_is_a_start_up_failure_not_a_restart_loop() {
        let (mut s, t0) = sup(1);
        s.step(Event::Start, t0);
        s.step(
            Event::Spawned {
                slot: 0,
                pid: pid(100),
            },
            t0,
        );
        let out = s.step(
            Event::Exited {
                pid: pid(100),
                reason: ExitReason::Code(2),
            },
            t0,
        );
        match exit(&out) {
            Some(Outcome::Failed(msg)) => {
                assert!(
                    msg.contains("worker 0 (pid 100, cpu 0, gen 1): exited (exit status 2)"),
                    "{msg}"
                )
            }
            other => panic!("expected failure, got {other:?}"),
        }
    }

    #[test]
    fn graceful_stop_exits_zero_when_workers_leave_within_grace() {
        let (mut s, t) = running(2);
        let out = s.step(Event::StopGracefully, t);
        assert_eq!(signals(&out), vec![(100, TERM), (101, TERM)]);
        assert_eq!(s.next_deadline(), Some(t + Duration::from_secs(5)));
        s.step(
            Event::Exited {
                pid: pid(100),
                reason: ExitReason::Signal(TERM),
            },
            t,
        );
        let out = s.step(
            Event::Exited {
                pid: pid(101),
                reason: ExitReason::Code(0),
            },
            t,
        );
        assert_eq!(exit(&out), Some(Outcome::Stopped));
    }

    #[test]
    fn grace_expiry_sigkills_and_reports_it() {
        let (mut s, t) = running(2);
        s.step(Event::StopGracefully, t);
        s.step(
            Event::Exited {
                pid: pid(100),
                reason: ExitReason::Code(0),
            },
            t,
        );
        let out = s.step(Event::Tick, t + Duration::from_secs(5));
        assert_eq!(signals(&out), vec![(101, Signal::SIGKILL)]);
        assert_eq!(s.next_deadline(), None);
        let out = s.step(
            Event::Exited {
                pid: pid(101),
                reason: ExitReason::Signal(Signal::SIGKILL),
            },
            t,
        );
        assert_eq!(exit(&out), Some(Outcome::Killed));
    }

    #[test]
    fn second_stop_request_or_sigquit_kills_at_once() {
        let (mut s, t) = running(1);
        s.step(Event::StopGracefully, t);
        assert_eq!(
            signals(&s.step(Event::StopGracefully, t)),
            vec![(100, Signal::SIGKILL)]
        );
        let (mut s, t) = running(1);
        assert_eq!(
            signals(&s.step(Event::StopNow, t)),
            vec![(100, TERM), (100, Signal::SIGKILL)]
        );
    }

    #[test]
    fn stop_cancels_pending_restarts_and_orphans_are_ignored() {
        let (mut s, t) = running(2);
        s.step(
            Event::Exited {
                pid: pid(101),
                reason: ExitReason::Code(1),
            },
            t,
        );
        assert!(s
            .step(
                Event::Exited {
                    pid: pid(999),
                    reason: ExitReason::Code(0)
                },
                t
            )
            .is_empty());
        s.step(Event::StopGracefully, t);
        assert!(spawns(&s.step(Event::Tick, t + Duration::from_secs(1))).is_empty());
        let out = s.step(
            Event::Exited {
                pid: pid(100),
                reason: ExitReason::Code(0),
            },
            t,
        );
        assert_eq!(exit(&out), Some(Outcome::Stopped));
    }

    #[test]
    fn failed_restart_after_start_up_is_retried_with_backoff() {
        let (mut s, t) = running(1);
        s.step(
            Event::Exited {
                pid: pid(100),
                reason: ExitReason::Code(1),
            },
            t,
        );
        let t = t + Duration::from_millis(100);
        s.step(Event::Tick, t);
        let out = s.step(
            Event::SpawnFailed {
                slot: 0,
                error: "exec ./app: ENOENT".into(),
            },
            t,
        );
        assert!(
            matches!(&out[..], [Action::Log(l)] if l.ends_with("retrying in 200 ms")),
            "{out:?}"
        );
        assert!(exit(&out).is_none());
    }
}
