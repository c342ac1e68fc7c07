//! The supervision state machine: `step(event, now) -> actions`, with no syscalls.
//!
//! The master's loop (`master/mod.rs`) turns signals, child exits, readiness and timers into
//! [`Event`]s and carries out the [`Action`]s returned here (prepare a generation, fork,
//! signal a process group, log, exit). Keeping the decisions free of I/O is what lets the
//! unit tests below drive a whole cluster's life (start-up failure, crash loops, rolling
//! restarts and their rollback, grace expiry) in microseconds.
//!
//! Every live worker process is in `workers`, whatever its role: a slot's current worker,
//! the new worker of a rolling restart's surge, or an old worker being stopped. Stopping,
//! killing and reaping treat them all alike.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::unistd::Pid;

use crate::master::deaths::Cause;
use crate::master::readiness::ReadyMode;
use crate::master::recycle::Reason;
use crate::master::rolling::{Purpose, RollingRestart, SurgeStep};
use crate::master::worker::{
    ms, ExitReason, Generation, Slot, SlotState, Worker, WorkerState, BACKOFF_MIN,
};

/// Something that happened to the cluster.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The master is up: start every slot.
    Start,
    /// A worker for `slot` was forked and exec'd.
    Spawned {
        /// The slot it fills.
        slot: usize,
        /// Its generation.
        generation: Generation,
        /// Its pid (and process group).
        pid: Pid,
        /// The CPU it is pinned to: the slot's, unless that one is no longer allowed (the
        /// master's affinity mask or cpuset shrank), and then the slot moves with it.
        cpu: Option<usize>,
        /// Inodes of its listening sockets.
        sockets: Vec<u64>,
    },
    /// Starting a worker for `slot` failed before or at exec.
    SpawnFailed {
        /// The slot.
        slot: usize,
        /// The generation it was for.
        generation: Generation,
        /// What failed, as one line.
        error: String,
    },
    /// A child was reaped (a worker, or an orphan we adopted as subreaper).
    Exited {
        /// The reaped pid.
        pid: Pid,
        /// How it ended.
        reason: ExitReason,
        /// Who sent the SIGKILL that ended it, when the master did not (master/deaths.rs).
        killer: Option<Cause>,
    },
    /// The worker `pid` showed it is ready (READY=1, or waiting for connections).
    Ready {
        /// The worker.
        pid: Pid,
    },
    /// The worker `pid` sent sd_notify STATUS=.
    Status {
        /// The worker.
        pid: Pid,
        /// The text.
        text: String,
    },
    /// The starting worker `pid` listens on addresses other than its sockets, and not yet
    /// on them: it binds a port itself instead of using fd 3.
    ListensElsewhere {
        /// The worker.
        pid: Pid,
        /// Where it listens, as one line.
        addrs: String,
    },
    /// SIGHUP: roll every slot over to a new generation.
    Reload,
    /// The master prepared `generation` (its program was found again).
    GenerationPrepared {
        /// The generation.
        generation: Generation,
    },
    /// The master could not prepare `generation`.
    GenerationFailed {
        /// The generation.
        generation: Generation,
        /// Why, as one line.
        error: String,
    },
    /// SIGTERM, SIGINT, `stop`: stop gracefully; repeating it changes nothing.
    StopGracefully,
    /// SIGQUIT, or a second Ctrl-C (master/mod.rs): SIGKILL every worker now.
    StopNow,
    /// `scale N`, SIGTTIN, SIGTTOU: grow or shrink to this many slots (at least 1).
    Scale(usize),
    /// master/recycle.rs found that the serving worker `pid` should be replaced.
    Recycle {
        /// The worker.
        pid: Pid,
        /// Why.
        reason: Reason,
    },
    /// The socket the master held for `slot` no longer listens (the app shut it down):
    /// sockets/slots.rs dropped it; a worker still serving it must be replaced.
    SocketLost {
        /// The slot.
        slot: usize,
        /// The dead socket's inode.
        inode: u64,
    },
    /// The old socket of `slot` drained (sockets/slots.rs, after [`Action::Drain`]): its
    /// worker `pid` may stop now.
    Drained {
        /// The slot.
        slot: usize,
        /// The old worker.
        pid: Pid,
    },
    /// Time passed; timers may be due.
    Tick,
}

/// Something the master must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Find the program again for a new generation; answer with GenerationPrepared/Failed.
    PrepareGeneration {
        /// The new generation.
        generation: Generation,
    },
    /// Fork and exec a worker for `slot`; answer with Spawned/SpawnFailed.
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
    /// Let go of the master's reference to `slot`'s sockets (sockets/slots.rs).
    ReleaseSockets {
        /// The slot.
        slot: usize,
        /// Why, for the log line.
        why: String,
    },
    /// Let go of every slot's sockets: the master is stopping.
    ReleaseAllSockets,
    /// `slot`'s new worker is ready: take its old worker `pid`'s socket out of the
    /// selection and answer with Drained once its queue is empty.
    Drain {
        /// The slot.
        slot: usize,
        /// The old worker.
        pid: Pid,
        /// Wait for its queue to empty; `false`: answer at once (a hung worker).
        wait: bool,
    },
    /// Write a line to the master's log.
    Log(String),
    /// Tell clients waiting on a rolling restart how it goes.
    Report(Report),
    /// Everything has stopped: exit.
    Exit(Outcome),
}

/// How a rolling restart goes, slot by slot, and how it ends: what a waiting `reload`
/// client is told.
#[derive(Debug, Clone, PartialEq)]
pub enum Report {
    /// The new worker of one slot of the pass was forked.
    SlotStarting {
        /// The pass's generation.
        generation: Generation,
        /// The slot.
        slot: usize,
        /// Slots in the pass.
        total: usize,
        /// The new worker.
        pid: Pid,
    },
    /// The new worker of one slot is ready and has taken the slot over.
    SlotReady {
        /// The pass's generation.
        generation: Generation,
        /// The slot.
        slot: usize,
        /// Slots taken over so far in this pass, this one included.
        done: usize,
        /// Slots in the pass.
        total: usize,
        /// Time from fork to ready.
        after: Duration,
    },
    /// The pass is over: every slot serves `generation`.
    Done {
        /// The pass's generation.
        generation: Generation,
        /// Workers replaced.
        replaced: usize,
        /// How long the pass took.
        took: Duration,
    },
    /// The pass failed and was stopped there.
    Failed {
        /// The pass's generation.
        generation: Generation,
        /// What failed, as one line.
        why: String,
        /// The generations that serve now.
        serving: Vec<Generation>,
    },
    /// The cluster began stopping during the pass.
    Abandoned {
        /// The pass's generation.
        generation: Generation,
    },
}

/// The last rolling restart attempted, for `status`.
#[derive(Debug, Clone, PartialEq)]
pub struct Rollout {
    /// The generation it brings (or brought) in.
    pub generation: Generation,
    /// When it began.
    pub started: Instant,
    /// Where it is, or how it ended.
    pub result: RolloutResult,
}

/// Where a rolling restart is, or how it ended.
#[derive(Debug, Clone, PartialEq)]
pub enum RolloutResult {
    /// Still going.
    UnderWay,
    /// Every slot serves the new generation.
    Done {
        /// When it ended.
        at: Instant,
    },
    /// A new worker failed: the pass was stopped there.
    RolledBack {
        /// When it ended.
        at: Instant,
        /// Why, as one line.
        why: String,
    },
    /// The cluster began stopping during the pass.
    Abandoned {
        /// When it ended.
        at: Instant,
    },
}

impl RolloutResult {
    /// The name `status` shows.
    pub fn name(&self) -> &'static str {
        match self {
            RolloutResult::UnderWay => "under way",
            RolloutResult::Done { .. } => "done",
            RolloutResult::RolledBack { .. } => "rolled back",
            RolloutResult::Abandoned { .. } => "abandoned",
        }
    }

    /// When it ended, if it has.
    pub fn ended(&self) -> Option<Instant> {
        match self {
            RolloutResult::UnderWay => None,
            RolloutResult::Done { at }
            | RolloutResult::RolledBack { at, .. }
            | RolloutResult::Abandoned { at } => Some(*at),
        }
    }
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
    /// No worker has been ready yet: any failure ends the master.
    Starting,
    /// Supervising: crashed workers are restarted with backoff.
    Running,
    /// Shutting down.
    Stopping {
        /// Whether a worker had to be SIGKILLed.
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
    /// CPUs to pin slots to, slot i on the (i mod len)-th; `None`: not pinned.
    pub cpus: Option<Vec<usize>>,
    /// Time a stopping worker gets before SIGKILL.
    pub grace: Duration,
    /// Signal that asks a worker to stop.
    pub stop_signal: Signal,
    /// How readiness is decided.
    pub ready: ReadyMode,
    /// How long a new worker may take to become ready.
    pub ready_timeout: Duration,
    /// Slots replaced at once in a rolling restart.
    pub rolling_batch: usize,
    /// Drain an old worker's socket before stopping it in a rolling restart (`--steer
    /// bpf`): [`Action::Drain`] first, the stop signal on [`Event::Drained`].
    pub drain: bool,
    /// A worker that dies sooner after it became ready counts toward its slot's crash loop.
    pub min_uptime: Duration,
    /// Whether `--max-memory` recycles workers (else an OOM kill's line suggests it).
    pub max_memory: bool,
}

/// The cluster's state and the rules that change it.
#[derive(Debug)]
pub struct Supervisor {
    settings: Settings,
    slots: Vec<Slot>,
    /// Every live worker process, whatever its role.
    workers: BTreeMap<Pid, Worker>,
    phase: Phase,
    /// The newest generation started (rolling restarts count up from 1).
    generation: Generation,
    /// The newest generation a rolling restart completed; new slots start with it.
    serving_generation: Generation,
    started: Instant,
    /// The next slot of the initial start-up to fork; they are forked one after the other
    /// so that a failing first worker does not cost N forks.
    next_initial: usize,
    all_ready_logged: bool,
    rolling: Option<RollingRestart>,
    /// A reload that arrived during start-up, to run once a worker is ready.
    reload_queued: bool,
    /// Rolling restarts begun, and those that failed.
    rolling_started: u64,
    rolling_failed: u64,
    /// Recycles begun, by reason kind (memory, lifetime, hung).
    recycles: BTreeMap<&'static str, u64>,
    /// The last rolling restart attempted.
    last_rollout: Option<Rollout>,
    /// Deaths the master did not ask for, by cause (master/deaths.rs labels).
    deaths: BTreeMap<&'static str, u64>,
    /// Whether the log last said the cluster is degraded.
    degraded_logged: bool,
}

impl Supervisor {
    /// A supervisor with empty slots; send [`Event::Start`] to begin.
    pub fn new(settings: Settings, now: Instant) -> Supervisor {
        let slots = (0..settings.workers)
            .map(|i| Slot::new(i, cpu_of(&settings.cpus, i)))
            .collect();
        Supervisor {
            settings,
            slots,
            workers: BTreeMap::new(),
            phase: Phase::Starting,
            generation: 1,
            serving_generation: 1,
            started: now,
            next_initial: 0,
            all_ready_logged: false,
            rolling: None,
            reload_queued: false,
            rolling_started: 0,
            rolling_failed: 0,
            recycles: BTreeMap::new(),
            last_rollout: None,
            deaths: BTreeMap::new(),
            degraded_logged: false,
        }
    }

    /// The last rolling restart attempted (the one under way, if any).
    pub fn last_rollout(&self) -> Option<&Rollout> {
        self.last_rollout.as_ref()
    }

    /// The generations the slots' current workers run, oldest first (two after a pass
    /// that failed half-way).
    pub fn serving_generations(&self) -> Vec<Generation> {
        let mut serving: Vec<Generation> = self
            .slots
            .iter()
            .filter_map(|s| s.pid().and(Some(s.generation)))
            .collect();
        serving.sort_unstable();
        serving.dedup();
        serving
    }

    /// The slots.
    pub fn slots(&self) -> &[Slot] {
        &self.slots
    }

    /// Every live worker process, by pid.
    pub fn workers(&self) -> impl Iterator<Item = &Worker> {
        self.workers.values()
    }

    /// The newest generation started.
    pub fn generation(&self) -> Generation {
        self.generation
    }

    /// The newest generation a rolling restart completed (1 before any).
    pub fn serving_generation(&self) -> Generation {
        self.serving_generation
    }

    /// Slots whose current worker is ready.
    pub fn ready_count(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| {
                s.pid()
                    .and_then(|p| self.workers.get(&p))
                    .is_some_and(|w| w.state == WorkerState::Ready)
            })
            .count()
    }

    /// Slots whose current worker is ready, with that worker.
    pub fn ready_slots(&self) -> std::collections::BTreeMap<usize, Pid> {
        self.slots
            .iter()
            .filter_map(|s| {
                let pid = s.pid()?;
                let ready = self
                    .workers
                    .get(&pid)
                    .is_some_and(|w| w.state == WorkerState::Ready);
                ready.then_some((s.index, pid))
            })
            .collect()
    }

    /// Whether the master is shutting down.
    pub fn is_stopping(&self) -> bool {
        matches!(self.phase, Phase::Stopping { .. } | Phase::Done)
    }

    /// Rolling restarts begun, and those that failed.
    pub fn rolling_counts(&self) -> (u64, u64) {
        (self.rolling_started, self.rolling_failed)
    }

    /// Recycles begun, by reason kind.
    pub fn recycles(&self) -> &BTreeMap<&'static str, u64> {
        &self.recycles
    }

    /// Deaths the master did not ask for, by cause.
    pub fn deaths(&self) -> &BTreeMap<&'static str, u64> {
        &self.deaths
    }

    /// Why the cluster is degraded, if it is: its crash-looping slots, and which keeps
    /// restarting at the base delay so that the port stays served.
    pub fn degraded(&self) -> Option<String> {
        if !matches!(self.phase, Phase::Running) {
            return None;
        }
        let looping: Vec<String> = self
            .slots
            .iter()
            .filter(|s| s.backoff.crash_looping())
            .map(|s| {
                let last = s.last_exit.map_or(String::new(), |e| {
                    let when = if s.can_start {
                        "within --min-uptime of ready"
                    } else {
                        "before ready"
                    };
                    format!(", last {e} {when}")
                });
                format!(
                    "slot {} crash-loops ({} quick deaths in a row{last})",
                    s.index,
                    s.backoff.quick_deaths()
                )
            })
            .collect();
        if looping.is_empty() {
            return None;
        }
        let kept: Vec<String> = self
            .slots
            .iter()
            .filter(|s| s.kept_up)
            .map(|s| s.index.to_string())
            .collect();
        let kept = match kept.len() {
            0 => String::new(),
            _ => format!(
                "; slot {} keeps restarting at the base delay: every other slot is in backoff",
                kept.join(", ")
            ),
        };
        Some(format!("{}{kept}", looping.join(", ")))
    }

    /// The slot being recycled, if any.
    pub fn recycling(&self) -> Option<usize> {
        let r = self.rolling.as_ref().filter(|r| !r.is_deploy())?;
        r.surges().next()
    }

    /// The slot whose hung worker is being replaced, if any: its successor takes over the
    /// slot's socket and what is queued on it (no drain: the hung worker would never empty it).
    pub fn replacing_hung(&self) -> Option<usize> {
        let r = self
            .rolling
            .as_ref()
            .filter(|r| matches!(r.purpose, Purpose::Recycle { hung: true, .. }))?;
        r.surges().next()
    }

    /// The rolling restart under way: its generation, slots done, slots in all.
    pub fn rolling(&self) -> Option<(Generation, usize, usize)> {
        self.rolling.as_ref().filter(|r| r.is_deploy()).map(|r| {
            let (done, total) = r.progress();
            (r.generation, done, total)
        })
    }

    /// Slots of the rolling restart under way whose new worker has taken over.
    pub fn rolling_taken_over(&self) -> usize {
        self.rolling.as_ref().map_or(0, |r| r.taken_over())
    }

    /// Whether `pid` is a worker (as opposed to an adopted orphan).
    pub fn is_worker(&self, pid: Pid) -> bool {
        self.workers.contains_key(&pid)
    }

    /// Each slot's current worker, when it is ready.
    pub fn serving(&self) -> impl Iterator<Item = &Worker> {
        self.slots
            .iter()
            .filter_map(|s| self.workers.get(&s.pid()?))
            .filter(|w| w.state == WorkerState::Ready)
    }

    /// Workers that have not shown readiness yet, with their socket inodes.
    pub fn starting(&self) -> impl Iterator<Item = &Worker> {
        self.workers
            .values()
            .filter(|w| w.state == WorkerState::Starting)
    }

    /// The earliest moment a [`Event::Tick`] has something to do.
    pub fn next_deadline(&self) -> Option<Instant> {
        let mut deadlines = Vec::new();
        if self.initial_pending() {
            // The next initial fork is due now: the master reaps and reads signals first.
            deadlines.push(self.started);
        }
        for w in self.workers.values() {
            match w.state {
                WorkerState::Ready => {
                    // A crash-looping slot's worker that lives --min-uptime ends the loop.
                    let looping = self
                        .slots
                        .get(w.slot)
                        .is_some_and(|s| s.pid() == Some(w.pid) && s.backoff.crash_looping());
                    if let (true, Some(r)) = (looping, w.ready_at) {
                        deadlines.push(r + self.settings.min_uptime);
                    }
                }
                WorkerState::Starting => {
                    deadlines.push(w.started + self.settings.ready_timeout);
                    if let ReadyMode::Delay(d) = self.settings.ready {
                        deadlines.push(w.started + d);
                    }
                }
                WorkerState::Stopping {
                    since,
                    killed: false,
                } => deadlines.push(since + w.stop_grace.unwrap_or(self.settings.grace)),
                _ => {}
            }
        }
        for slot in &self.slots {
            if let SlotState::Waiting { at } = slot.state {
                deadlines.push(at);
            }
        }
        deadlines.into_iter().min()
    }

    /// Applies one event and returns what the master must do, in order.
    pub fn step(&mut self, event: Event, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        match event {
            Event::Start => self.spawn_next_initial(&mut out),
            Event::Spawned {
                slot,
                generation,
                pid,
                cpu,
                sockets,
            } => {
                if let Some(s) = self.slots.get_mut(slot) {
                    s.cpu = cpu;
                }
                self.on_spawned(slot, generation, pid, sockets, now, &mut out)
            }
            Event::SpawnFailed {
                slot,
                generation,
                error,
            } => self.on_spawn_failed(slot, generation, error, now, &mut out),
            Event::Exited {
                pid,
                reason,
                killer,
            } => self.on_exited(pid, reason, killer, now, &mut out),
            Event::Ready { pid } => self.on_ready(pid, now, &mut out),
            Event::Status { pid, text } => {
                if let Some(w) = self.workers.get_mut(&pid) {
                    w.status = Some(text);
                }
            }
            Event::ListensElsewhere { pid, addrs } => {
                if let Some(w) = self.workers.get_mut(&pid) {
                    if w.state == WorkerState::Starting && w.listens_elsewhere.is_none() {
                        out.push(Action::Log(format!(
                            "{w}: listens on {addrs} itself, and not on the socket it was given \
                             at fd 3; {FD3_HINT}"
                        )));
                        w.listens_elsewhere = Some(addrs);
                    }
                }
            }
            Event::Reload => self.on_reload(now, &mut out),
            Event::GenerationPrepared { generation } => {
                if let Some(r) = self.rolling.as_mut().filter(|r| r.generation == generation) {
                    r.prepared = true;
                    self.advance_rolling(now, &mut out);
                }
            }
            Event::GenerationFailed { generation, error } => {
                if self
                    .rolling
                    .as_ref()
                    .is_some_and(|r| r.generation == generation)
                {
                    self.abort_rolling(error, now, &mut out);
                }
            }
            Event::StopGracefully => {
                // A repeat of the same request (`stop` then the service manager's SIGTERM;
                // `timeout` signalling the pid and its group) must not turn a graceful stop
                // into SIGKILLs: escalating is StopNow's job (SIGQUIT, a second Ctrl-C).
                if !matches!(self.phase, Phase::Stopping { .. } | Phase::Done) {
                    self.begin_stop(None, now, &mut out);
                }
            }
            Event::StopNow => {
                if !matches!(self.phase, Phase::Stopping { .. }) {
                    self.begin_stop(None, now, &mut out);
                }
                self.kill_all(now, &mut out);
            }
            Event::Scale(n) => self.on_scale(n, now, &mut out),
            Event::Recycle { pid, reason } => self.on_recycle(pid, reason, now, &mut out),
            Event::SocketLost { slot, inode } => self.on_socket_lost(slot, inode, now, &mut out),
            Event::Drained { slot, pid } => self.on_drained(slot, pid, now, &mut out),
            Event::Tick => self.on_tick(now, &mut out),
        }
        self.finish_if_stopped(&mut out);
        out
    }

    /// Whether the initial start-up still has slots to fork.
    fn initial_pending(&self) -> bool {
        matches!(self.phase, Phase::Starting | Phase::Running)
            && self.next_initial < self.slots.len()
    }

    /// Forks the next slot of the initial start-up: one per wake of the master, so that a
    /// failure or a stop request is seen before the next fork.
    fn spawn_next_initial(&mut self, out: &mut Vec<Action>) {
        if let (true, Some(slot)) = (self.initial_pending(), self.slots.get(self.next_initial)) {
            out.push(Action::Spawn {
                slot: slot.index,
                cpu: slot.cpu,
                generation: slot.generation,
            });
            self.next_initial += 1;
        }
    }

    fn on_spawned(
        &mut self,
        index: usize,
        generation: Generation,
        pid: Pid,
        sockets: Vec<u64>,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        let cpu = self.slots.get(index).and_then(|s| s.cpu);
        let mut worker = Worker::new(pid, index, cpu, generation, now);
        worker.sockets = sockets;
        out.push(Action::Log(format!("{worker}: started")));
        self.workers.insert(pid, worker);
        let surging = self.rolling.as_ref().is_some_and(|r| {
            r.generation == generation
                && r.surge(index)
                    .is_some_and(|s| s.step == SurgeStep::Spawning)
        });
        if matches!(self.phase, Phase::Stopping { .. } | Phase::Done) {
            // Forked just before the stop was decided.
            self.stop_worker(pid, now, out);
        } else if surging {
            if let Some(r) = self.rolling.as_mut() {
                r.set_step(index, SurgeStep::Starting(pid));
                // Recycles go through the same machinery; only deploys are reported.
                if r.is_deploy() {
                    out.push(Action::Report(Report::SlotStarting {
                        generation,
                        slot: index,
                        total: r.progress().1,
                        pid,
                    }));
                }
            }
        } else if self.slots.get(index).is_none_or(|s| s.pid().is_some()) {
            // The surge it was forked for was abandoned, or the slot scaled away, meanwhile.
            if self.slots.get(index).is_none() {
                out.push(Action::ReleaseSockets {
                    slot: index,
                    why: "the slot was scaled away".into(),
                });
            }
            self.stop_worker(pid, now, out);
        } else {
            let slot = &mut self.slots[index];
            slot.state = SlotState::Filled(pid);
            slot.generation = generation;
        }
    }

    fn on_spawn_failed(
        &mut self,
        index: usize,
        generation: Generation,
        error: String,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        let Some(slot) = self.slots.get(index) else {
            return out.push(Action::Log(format!(
                "worker {index} (gen {generation}): {error}"
            )));
        };
        let line = format!("{} (gen {generation}): {error}", slot.label());
        let surging = self
            .rolling
            .as_ref()
            .is_some_and(|r| r.generation == generation && r.surge(index).is_some());
        if surging {
            return self.abort_rolling(line, now, out);
        }
        if self.slots[index].pid().is_some() {
            // The answer to a surge abandoned meanwhile: the slot is served as it was.
            return out.push(Action::Log(line));
        }
        match self.phase {
            Phase::Starting => self.begin_stop(Some(line), now, out),
            Phase::Running => {
                self.slots[index].can_start = false;
                self.restart_later(index, false, line, "retrying", now, out)
            }
            Phase::Stopping { .. } | Phase::Done => out.push(Action::Log(line)),
        }
    }

    fn on_exited(
        &mut self,
        pid: Pid,
        reason: ExitReason,
        killer: Option<Cause>,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        let Some(mut worker) = self.workers.remove(&pid) else {
            return; // an orphan adopted as subreaper: reaping it was all that was owed
        };
        let asked = matches!(worker.state, WorkerState::Stopping { .. });
        let served = worker.served(now, self.settings.min_uptime);
        let mut line = worker.transition(WorkerState::Exited(reason), now);
        let cause = (!asked).then(|| Cause::of(reason, killer));
        if let Some(cause) = &cause {
            *self.deaths.entry(cause.label()).or_default() += 1;
            if let Some(what) = cause.describe() {
                line = format!("{line}: {what}");
                if matches!(cause, Cause::OomKiller { .. }) && !self.settings.max_memory {
                    line.push_str(
                        " (--max-memory recycles a worker before the OOM killer strikes)",
                    );
                }
            }
        }
        let surge_step = self
            .rolling
            .as_mut()
            .and_then(|r| r.surge_of_pid(pid))
            .map(|s| s.step);
        match surge_step {
            Some(SurgeStep::Starting(_)) => {
                return self.abort_rolling(format!("{line}, before it was ready"), now, out);
            }
            Some(SurgeStep::Retiring(_) | SurgeStep::Draining(_)) => {
                out.push(Action::Log(line));
                if let Some(r) = self.rolling.as_mut() {
                    r.set_step(worker.slot, SurgeStep::Done);
                }
                return self.advance_rolling(now, out);
            }
            _ => {}
        }
        let Some(slot) = self
            .slots
            .get_mut(worker.slot)
            .filter(|s| s.pid() == Some(pid))
        else {
            // An old, abandoned or scaled-away worker we had asked to stop.
            return out.push(Action::Log(line));
        };
        slot.state = SlotState::Empty;
        slot.last_exit = Some(reason);
        slot.last_cause = cause.as_ref().and_then(|c| c.describe());
        slot.can_start = worker.ready_at.is_some();
        if self
            .rolling
            .as_ref()
            .is_some_and(|r| r.is_deploy() && r.generation == worker.generation)
        {
            // The new generation died after it was ready: the pass stops here, and the slot
            // goes back to the generation that serves everywhere else.
            slot.generation = self.serving_generation;
            let delay = match served {
                true => slot.backoff.after_service(),
                false => slot.backoff.after_quick_death(),
            };
            slot.state = SlotState::Waiting { at: now + delay };
            let why = format!(
                "{line} after it was ready; slot {} restarts on generation {} in {}",
                worker.slot,
                self.serving_generation,
                ms(delay)
            );
            return self.abort_rolling(why, now, out);
        }
        match self.phase {
            Phase::Starting => {
                let hint = match reason {
                    ExitReason::Code(_) => {
                        "; if it reported EADDRINUSE, it binds the port itself: make it use fd 3 \
                         (LISTEN_FDS=1)"
                    }
                    ExitReason::Signal(_) => "",
                };
                self.begin_stop(
                    Some(format!("{line}, before any worker was ready{hint}")),
                    now,
                    out,
                )
            }
            Phase::Running => self.restart_later(worker.slot, served, line, "restarting", now, out),
            Phase::Stopping { .. } | Phase::Done => out.push(Action::Log(line)),
        }
    }

    /// Puts slot `index`, whose worker died (`line`) or could not be started, in backoff:
    /// the base delay after a worker that served, else its crash loop's growing delay. But
    /// never every slot in backoff while one of them can start: the last one keeps
    /// restarting at the base delay, the port served between its crashes.
    fn restart_later(
        &mut self,
        index: usize,
        served: bool,
        line: String,
        verb: &str,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        let slot = &mut self.slots[index];
        let mut delay = match served {
            true => slot.backoff.after_service(),
            false => slot.backoff.after_quick_death(),
        };
        let was_kept = std::mem::take(&mut slot.kept_up);
        slot.state = SlotState::Waiting { at: now + delay };
        let dark =
            |s: &Slot| matches!(s.state, SlotState::Waiting { at } if at > now + BACKOFF_MIN);
        let mut note = None;
        if self.slots.iter().all(dark) {
            // Which slot stays up: this one if its worker became ready, else the one that
            // can start and was due soonest.
            let keep = match self.slots[index].can_start {
                true => Some(index),
                false => self
                    .slots
                    .iter()
                    .filter(|s| s.can_start)
                    .min_by_key(|s| match s.state {
                        SlotState::Waiting { at } => at,
                        _ => now,
                    })
                    .map(|s| s.index),
            };
            match keep {
                Some(k) => {
                    let s = &mut self.slots[k];
                    // Said once, when it begins: its restarts say the rest.
                    if !(s.kept_up || k == index && was_kept) {
                        note = Some(format!(
                            "worker {k}: every other slot is in backoff: it keeps restarting in \
                             {} so that the port stays served",
                            ms(BACKOFF_MIN)
                        ));
                    }
                    s.kept_up = true;
                    s.state = SlotState::Waiting {
                        at: now + BACKOFF_MIN,
                    };
                    if k == index {
                        delay = BACKOFF_MIN;
                    }
                }
                None => {
                    note = Some(
                        "every slot is in backoff: no worker became ready since its slot's last \
                         crash (the app cannot start)"
                            .into(),
                    )
                }
            }
        }
        out.push(Action::Log(format!("{line}; {verb} in {}", ms(delay))));
        if let Some(note) = note {
            out.push(Action::Log(note));
        }
        release_if_crash_looping(index, delay, out);
        self.log_degraded(out);
    }

    /// Says in the log when the cluster becomes degraded, and when it no longer is.
    fn log_degraded(&mut self, out: &mut Vec<Action>) {
        // Cheap on every tick: the reasons are only written out when it changes. A stop
        // ends the question (and says nothing about it).
        if !matches!(self.phase, Phase::Running) {
            return;
        }
        let degraded = self.slots.iter().any(|s| s.backoff.crash_looping());
        match (degraded, self.degraded_logged) {
            (true, false) => {
                self.degraded_logged = true;
                let why = self.degraded().unwrap_or_default();
                out.push(Action::Log(format!("cluster degraded: {why}")));
            }
            (false, true) => {
                self.degraded_logged = false;
                out.push(Action::Log(
                    "cluster no longer degraded: no slot crash-loops".into(),
                ));
            }
            _ => {}
        }
    }

    fn on_ready(&mut self, pid: Pid, now: Instant, out: &mut Vec<Action>) {
        let Some(worker) = self.workers.get_mut(&pid) else {
            return;
        };
        if worker.state != WorkerState::Starting {
            return;
        }
        let line = worker.transition(WorkerState::Ready, now);
        let (index, generation, started) = (worker.slot, worker.generation, worker.started);
        if let Some(slot) = self.slots.get_mut(index) {
            slot.can_start = true;
        }
        let surging = self
            .rolling
            .as_ref()
            .and_then(|r| r.surge(index))
            .is_some_and(|s| s.step == SurgeStep::Starting(pid));
        if surging {
            // The new worker takes the slot; the old one, if any, is asked to stop.
            let slot = &mut self.slots[index];
            let old = slot.pid();
            slot.state = SlotState::Filled(pid);
            slot.generation = generation;
            out.push(Action::Log(line));
            let hung = self
                .rolling
                .as_ref()
                .is_some_and(|r| matches!(r.purpose, Purpose::Recycle { hung: true, .. }));
            if let (Some(old), true) = (old, hung) {
                // It will most likely not answer: SIGKILL comes sooner.
                let grace = crate::master::recycle::HUNG_GRACE.min(self.settings.grace);
                if let Some(w) = self.workers.get_mut(&old) {
                    w.stop_grace = Some(grace);
                }
            }
            let step = match old {
                Some(old) if self.settings.drain => {
                    // A hung worker's queue would never empty: its socket is swapped out
                    // and the worker stopped at once (the program moves the queue).
                    out.push(Action::Drain {
                        slot: index,
                        pid: old,
                        wait: !hung,
                    });
                    SurgeStep::Draining(old)
                }
                Some(old) => {
                    self.stop_worker(old, now, out);
                    SurgeStep::Retiring(old)
                }
                None => SurgeStep::Done,
            };
            if let Some(r) = self.rolling.as_mut() {
                r.set_step(index, step);
                if r.is_deploy() {
                    out.push(Action::Report(Report::SlotReady {
                        generation,
                        slot: index,
                        done: r.taken_over(),
                        total: r.progress().1,
                        after: now.saturating_duration_since(started),
                    }));
                }
            }
            self.advance_rolling(now, out);
        } else {
            out.push(Action::Log(line));
            if self.phase == Phase::Starting {
                self.phase = Phase::Running;
            }
        }
        let all_ready = self.slots.iter().all(|s| {
            s.pid()
                .and_then(|p| self.workers.get(&p))
                .is_some_and(|w| w.state == WorkerState::Ready)
        });
        if all_ready && !self.all_ready_logged {
            self.all_ready_logged = true;
            out.push(Action::Log(format!(
                "all {} workers ready, {} after start",
                self.slots.len(),
                ms(now.saturating_duration_since(self.started))
            )));
            if std::mem::take(&mut self.reload_queued) {
                self.on_reload(now, out);
            }
        }
    }

    fn on_reload(&mut self, now: Instant, out: &mut Vec<Action>) {
        match (&self.phase, self.rolling.as_mut()) {
            (Phase::Stopping { .. } | Phase::Done, _) => {
                out.push(Action::Log("reload ignored: stopping".into()))
            }
            (_, Some(r)) if !r.is_deploy() => {
                if !r.again {
                    out.push(Action::Log(
                        "reload during a recycle: the rolling restart follows it".into(),
                    ));
                }
                r.again = true;
            }
            (_, Some(r)) => {
                if !r.again {
                    out.push(Action::Log(format!(
                        "reload during the rolling restart to generation {}: one more pass follows it",
                        r.generation
                    )));
                }
                r.again = true;
            }
            (Phase::Starting, None) => {
                self.reload_queued = true;
                out.push(Action::Log(
                    "reload during start-up: the rolling restart follows once all workers are ready"
                        .into(),
                ));
            }
            (Phase::Running, None) => {
                self.generation += 1;
                out.push(Action::Log(format!(
                    "rolling restart to generation {} of {} workers ({} at a time)",
                    self.generation,
                    self.slots.len(),
                    self.settings.rolling_batch
                )));
                self.rolling = Some(RollingRestart::new(self.generation, self.slots.len(), now));
                self.rolling_started += 1;
                self.last_rollout = Some(Rollout {
                    generation: self.generation,
                    started: now,
                    result: RolloutResult::UnderWay,
                });
                out.push(Action::PrepareGeneration {
                    generation: self.generation,
                });
            }
        }
    }

    /// Starts the next slots of the rolling restart, or finishes it.
    fn advance_rolling(&mut self, now: Instant, out: &mut Vec<Action>) {
        let Some(r) = self.rolling.as_mut().filter(|r| r.prepared) else {
            return;
        };
        for index in r.next_slots(self.settings.rolling_batch) {
            let slot = &self.slots[index];
            out.push(Action::Spawn {
                slot: index,
                cpu: slot.cpu,
                generation: r.generation,
            });
        }
        if r.is_complete() {
            let (replaced, _) = r.progress();
            let took = now.saturating_duration_since(r.started);
            match &r.purpose {
                Purpose::Deploy => {
                    out.push(Action::Log(format!(
                        "rolling restart to generation {} done: {replaced} workers replaced in {}",
                        r.generation,
                        ms(took)
                    )));
                    out.push(Action::Report(Report::Done {
                        generation: r.generation,
                        replaced,
                        took,
                    }));
                    self.last_rollout = Some(Rollout {
                        generation: r.generation,
                        started: r.started,
                        result: RolloutResult::Done { at: now },
                    });
                    self.serving_generation = r.generation;
                }
                Purpose::Recycle { .. } => {
                    out.push(Action::Log(format!("recycle done in {}", ms(took))));
                }
            }
            let again = r.again;
            self.rolling = None;
            if again {
                self.on_reload(now, out);
            }
        }
    }

    /// Ends the rolling restart at the first failure: every worker still serving stays.
    fn abort_rolling(&mut self, why: String, now: Instant, out: &mut Vec<Action>) {
        let Some(r) = self.rolling.take() else {
            return;
        };
        let starting: Vec<Pid> = r.starting().collect();
        for pid in starting {
            self.stop_worker(pid, now, out);
        }
        if !r.is_deploy() {
            out.push(Action::Log(format!(
                "recycle failed: {why}; the old worker keeps serving"
            )));
            if r.again {
                self.on_reload(now, out);
            }
            return;
        }
        self.rolling_failed += 1;
        let serving = self.serving_generations();
        let names: Vec<String> = serving.iter().map(|g| g.to_string()).collect();
        out.push(Action::Log(format!(
            "rolling restart to generation {} failed: {why}; stopped it there: generation {} \
             still serving; send SIGHUP to try again",
            r.generation,
            names.join(" and ")
        )));
        self.last_rollout = Some(Rollout {
            generation: r.generation,
            started: r.started,
            result: RolloutResult::RolledBack {
                at: now,
                why: why.clone(),
            },
        });
        out.push(Action::Report(Report::Failed {
            generation: r.generation,
            why,
            serving,
        }));
        if r.again {
            // A reload came during the failed pass: it may well carry the fix.
            out.push(Action::Log("the reload that came during it follows".into()));
            self.on_reload(now, out);
        }
    }

    fn on_tick(&mut self, now: Instant, out: &mut Vec<Action>) {
        self.spawn_next_initial(out);
        let stopping = matches!(self.phase, Phase::Stopping { .. } | Phase::Done);
        let surging = |s: usize| self.rolling.as_ref().is_some_and(|r| r.surge(s).is_some());
        let mut due = Vec::new();
        for slot in &mut self.slots {
            if let SlotState::Waiting { at } = slot.state {
                // A slot being rolled over gets its new worker from the surge instead.
                if at <= now && !stopping && !surging(slot.index) {
                    slot.state = SlotState::Empty;
                    slot.restarts += 1;
                    due.push(Action::Spawn {
                        slot: slot.index,
                        cpu: slot.cpu,
                        generation: slot.generation,
                    });
                }
            }
        }
        out.extend(due);

        let mut ready = Vec::new();
        let mut late = Vec::new();
        let mut overdue = Vec::new();
        for w in self.workers.values() {
            match w.state {
                WorkerState::Starting => {
                    if matches!(self.settings.ready, ReadyMode::Delay(d) if now >= w.started + d) {
                        ready.push(w.pid);
                    } else if now >= w.started + self.settings.ready_timeout {
                        late.push(w.pid);
                    }
                }
                WorkerState::Stopping {
                    since,
                    killed: false,
                } if now >= since + w.stop_grace.unwrap_or(self.settings.grace) => {
                    overdue.push(w.pid)
                }
                _ => {}
            }
        }
        for pid in ready {
            self.on_ready(pid, now, out);
        }
        for pid in late {
            self.on_ready_timeout(pid, now, out);
        }
        for pid in overdue {
            self.kill_worker(pid, now, out);
        }
        // A crash-looping slot whose worker has now served for --min-uptime: the loop is over.
        let min_uptime = self.settings.min_uptime;
        for slot in &mut self.slots {
            let Some(w) = slot.pid().and_then(|p| self.workers.get(&p)) else {
                continue;
            };
            if slot.backoff.crash_looping() && w.served(now, min_uptime) {
                slot.backoff.after_service();
                slot.kept_up = false;
                out.push(Action::Log(format!(
                    "{w}: up {} after ready: slot {}'s crash loop is over",
                    ms(min_uptime),
                    slot.index
                )));
            }
        }
        self.log_degraded(out);
    }

    fn on_scale(&mut self, wanted: usize, now: Instant, out: &mut Vec<Action>) {
        let wanted = wanted.max(1);
        let have = self.slots.len();
        if wanted == have || !matches!(self.phase, Phase::Running | Phase::Starting) {
            return;
        }
        if let Some(r) = &self.rolling {
            let what = if r.is_deploy() {
                "a rolling restart"
            } else {
                "a recycle"
            };
            return out.push(Action::Log(format!(
                "scale to {wanted} refused: {what} is under way; try again once it is done"
            )));
        }
        out.push(Action::Log(format!(
            "scaling from {have} to {wanted} workers"
        )));
        if wanted > have {
            for i in have..wanted {
                let mut slot = Slot::new(i, cpu_of(&self.settings.cpus, i));
                slot.generation = self.serving_generation;
                self.slots.push(slot);
            }
            // Forked one per wake, like the initial start-up.
            self.next_initial = self.next_initial.min(have);
            self.spawn_next_initial(out);
        } else {
            while self.slots.len() > wanted {
                let Some(slot) = self.slots.pop() else { break };
                let ready = slot
                    .pid()
                    .and_then(|p| self.workers.get(&p))
                    .filter(|w| w.state == WorkerState::Ready)
                    .map(|w| w.pid);
                if let (Some(pid), true) = (ready, self.settings.drain) {
                    // Its socket leaves the selection first; the worker stops once it drained.
                    out.push(Action::Drain {
                        slot: slot.index,
                        pid,
                        wait: true,
                    });
                    continue;
                }
                // Its worker's own fd decides from here, as without takeover: the master's
                // reference would keep the socket in the group with nobody to serve it.
                out.push(Action::ReleaseSockets {
                    slot: slot.index,
                    why: "the slot was scaled away".into(),
                });
                if let Some(pid) = slot.pid() {
                    self.stop_worker(pid, now, out);
                }
            }
            self.next_initial = self.next_initial.min(wanted);
        }
        self.settings.workers = wanted;
        self.all_ready_logged = false;
    }

    /// Starts the recycle of the serving worker `pid`: one slot's surge, on its generation.
    /// Ignored (the next look asks again) unless the cluster runs with nothing else under
    /// way: one recycle at a time, none during a rolling restart.
    fn on_recycle(&mut self, pid: Pid, reason: Reason, now: Instant, out: &mut Vec<Action>) {
        if self.phase != Phase::Running || self.rolling.is_some() {
            return;
        }
        let Some(w) = self.workers.get(&pid) else {
            return;
        };
        let Some(slot) = self.slots.get_mut(w.slot).filter(|s| s.pid() == Some(pid)) else {
            return;
        };
        if w.state != WorkerState::Ready {
            return;
        }
        out.push(Action::Log(format!("{w}: recycled: {reason}")));
        *self.recycles.entry(reason.kind()).or_default() += 1;
        slot.last_recycle = Some(reason.to_string());
        self.rolling = Some(RollingRestart::recycle(
            slot.index,
            slot.generation,
            reason.to_string(),
            reason.is_hung(),
            now,
        ));
        self.advance_rolling(now, out);
    }

    fn on_socket_lost(&mut self, index: usize, inode: u64, now: Instant, out: &mut Vec<Action>) {
        if !matches!(self.phase, Phase::Running | Phase::Starting) {
            return;
        }
        let starting = self
            .rolling
            .as_ref()
            .and_then(|r| r.surge(index))
            .and_then(|s| match s.step {
                SurgeStep::Starting(pid) => Some(pid),
                _ => None,
            });
        let why = format!(
            "worker {index}: its socket (inode {inode}) no longer listens (an app shut it down \
             with shutdown(2))"
        );
        if starting.is_some() {
            // The surge's new worker was given the dead socket: this pass cannot finish.
            return self.abort_rolling(why, now, out);
        }
        let Some(slot) = self.slots.get_mut(index) else {
            return;
        };
        let Some(pid) = slot.pid() else {
            // No worker serves it: the next one opens a fresh socket anyway.
            return out.push(Action::Log(format!(
                "{why}; the next worker opens a fresh one"
            )));
        };
        // The worker serves a socket the kernel no longer sends connections to: replace it
        // at once (no backoff, nothing crashed) with one on a fresh socket.
        slot.state = SlotState::Waiting { at: now };
        out.push(Action::Log(format!(
            "{why}; replacing worker {index} (pid {pid}) with one on a fresh socket"
        )));
        self.stop_worker(pid, now, out);
    }

    /// The old worker's socket drained: stop the worker (also when the rolling restart was
    /// abandoned meanwhile: it no longer serves its slot either way).
    fn on_drained(&mut self, slot: usize, pid: Pid, now: Instant, out: &mut Vec<Action>) {
        let serving = self.slots.get(slot).and_then(|s| s.pid()) == Some(pid);
        if !serving {
            self.stop_worker(pid, now, out);
        }
        if let Some(r) = self.rolling.as_mut() {
            if r.surge(slot)
                .is_some_and(|s| s.step == SurgeStep::Draining(pid))
            {
                r.set_step(slot, SurgeStep::Retiring(pid));
            }
        }
    }

    fn on_ready_timeout(&mut self, pid: Pid, now: Instant, out: &mut Vec<Action>) {
        let Some(w) = self.workers.get(&pid) else {
            return;
        };
        if let Some(addrs) = &w.listens_elsewhere {
            // Counting it as ready would leave the port taking connections nobody accepts.
            let why = format!(
                "{w}: not ready after {}: it listens on {addrs} itself, not on its fd 3; {FD3_HINT}",
                ms(self.settings.ready_timeout)
            );
            return self.fail_worker(pid, why, now, out);
        }
        let why = format!(
            "{w}: not ready after {} ({})",
            ms(self.settings.ready_timeout),
            self.settings.ready.not_ready_hint()
        );
        let slot_served = self.slots.get(w.slot).is_some_and(|s| s.pid().is_some());
        let surging = self
            .rolling
            .as_mut()
            .and_then(|r| r.surge_of_pid(pid))
            .is_some();
        if surging && slot_served {
            self.abort_rolling(why, now, out);
        } else {
            // At start-up, after a crash, or in a surge whose old worker died, it is the
            // slot's only worker: it runs, we just cannot see that it serves. Counting it as
            // ready beats killing it.
            out.push(Action::Log(format!("{why}; counting it as ready")));
            self.on_ready(pid, now, out);
        }
    }

    /// A starting worker that cannot serve: the start-up fails, a rolling restart is rolled
    /// back, a restarted worker is stopped (its slot restarts it with backoff).
    fn fail_worker(&mut self, pid: Pid, why: String, now: Instant, out: &mut Vec<Action>) {
        let surging = self
            .rolling
            .as_mut()
            .and_then(|r| r.surge_of_pid(pid))
            .is_some();
        match self.phase {
            _ if surging => self.abort_rolling(why, now, out),
            Phase::Starting => self.begin_stop(Some(why), now, out),
            _ => {
                out.push(Action::Log(why));
                self.stop_worker(pid, now, out);
            }
        }
    }

    /// Sends the stop signal to every worker and cancels pending restarts.
    fn begin_stop(&mut self, failure: Option<String>, now: Instant, out: &mut Vec<Action>) {
        if let Some(f) = &failure {
            out.push(Action::Log(format!("start-up failed: {f}")));
        }
        if let Some(r) = self.rolling.take() {
            out.push(Action::Log(format!(
                "rolling restart to generation {} abandoned: stopping",
                r.generation
            )));
            if r.is_deploy() {
                self.last_rollout = Some(Rollout {
                    generation: r.generation,
                    started: r.started,
                    result: RolloutResult::Abandoned { at: now },
                });
                out.push(Action::Report(Report::Abandoned {
                    generation: r.generation,
                }));
            }
        }
        out.push(Action::Log(format!(
            "stopping {} workers (grace {})",
            self.workers.len(),
            ms(self.settings.grace)
        )));
        self.phase = Phase::Stopping {
            forced: false,
            failure,
        };
        // Held sockets would keep taking connections that nobody will serve; the workers'
        // own fds keep theirs open while they drain.
        out.push(Action::ReleaseAllSockets);
        for slot in &mut self.slots {
            if let SlotState::Waiting { .. } = slot.state {
                slot.state = SlotState::Empty;
            }
        }
        let pids: Vec<Pid> = self.workers.keys().copied().collect();
        for pid in pids {
            self.stop_worker(pid, now, out);
        }
    }

    /// Asks one worker to stop (once).
    fn stop_worker(&mut self, pid: Pid, now: Instant, out: &mut Vec<Action>) {
        let Some(w) = self.workers.get_mut(&pid) else {
            return;
        };
        if matches!(w.state, WorkerState::Starting | WorkerState::Ready) {
            let stopping = WorkerState::Stopping {
                since: now,
                killed: false,
            };
            out.push(Action::Log(w.transition(stopping, now)));
            out.push(Action::Signal {
                pgid: pid,
                signal: self.settings.stop_signal,
            });
            // A stopped process (SIGSTOP, SIGTTIN) acts on the stop signal only once it is
            // continued; systemd sends SIGCONT after its kill signal for the same reason.
            out.push(Action::Signal {
                pgid: pid,
                signal: Signal::SIGCONT,
            });
        }
    }

    /// SIGKILLs one worker's process group.
    fn kill_worker(&mut self, pid: Pid, now: Instant, out: &mut Vec<Action>) {
        self.stop_worker(pid, now, out);
        let Some(w) = self.workers.get_mut(&pid) else {
            return;
        };
        if let WorkerState::Stopping {
            since,
            killed: false,
        } = w.state
        {
            let killed = WorkerState::Stopping {
                since,
                killed: true,
            };
            out.push(Action::Log(w.transition(killed, now)));
            out.push(Action::Signal {
                pgid: pid,
                signal: Signal::SIGKILL,
            });
            if let Phase::Stopping { forced, .. } = &mut self.phase {
                *forced = true;
            }
        }
    }

    fn kill_all(&mut self, now: Instant, out: &mut Vec<Action>) {
        let pids: Vec<Pid> = self.workers.keys().copied().collect();
        for pid in pids {
            self.kill_worker(pid, now, out);
        }
    }

    fn finish_if_stopped(&mut self, out: &mut Vec<Action>) {
        let Phase::Stopping { forced, failure } = &self.phase else {
            return;
        };
        if !self.workers.is_empty() {
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
}

/// What to do about an app that does not serve the socket at fd 3.
pub const FD3_HINT: &str = "the app must serve the listening socket it is given at fd 3 \
    (LISTEN_FDS=1, LISTEN_FDNAMES), not bind a port itself: e.g. node server.listen({fd: 3}), \
    uvicorn --fd 3, gunicorn --bind fd://3, Go net.FileListener(os.NewFile(3, \"\"))";

/// The CPU of slot `i`: the i-th of the pin list, wrapping around.
/// A slot whose next restart is far off lets go of its sockets (sockets/slots.rs).
fn release_if_crash_looping(slot: usize, delay: Duration, out: &mut Vec<Action>) {
    if delay >= crate::sockets::slots::RELEASE_AFTER_BACKOFF {
        out.push(Action::ReleaseSockets {
            slot,
            why: format!(
                "crash loop (next restart in {}), so the kernel stops sending it connections",
                ms(delay)
            ),
        });
    }
}

fn cpu_of(cpus: &Option<Vec<usize>>, i: usize) -> Option<usize> {
    cpus.as_ref()
        .filter(|c| !c.is_empty())
        .map(|c| c[i % c.len()])
}

#[cfg(test)]
mod tests {
    use super::*;

    const TERM: Signal = Signal::SIGTERM;
    const KILL: Signal = Signal::SIGKILL;
    const TIMEOUT: Duration = Duration::from_secs(30);
    pub const MIN_UPTIME: Duration = Duration::from_secs(1);

    pub fn sup_with(workers: usize, ready: ReadyMode, batch: usize) -> (Supervisor, Instant) {
        let t0 = Instant::now();
        let s = Supervisor::new(
            Settings {
                workers,
                cpus: Some(vec![0, 1]),
                grace: Duration::from_secs(5),
                stop_signal: TERM,
                ready,
                ready_timeout: TIMEOUT,
                rolling_batch: batch,
                drain: false,
                min_uptime: MIN_UPTIME,
                max_memory: false,
            },
            t0,
        );
        (s, t0)
    }

    pub fn sup(workers: usize) -> (Supervisor, Instant) {
        sup_with(workers, ReadyMode::Listening, 1)
    }

    pub fn pid(n: i32) -> Pid {
        Pid::from_raw(n)
    }

    pub fn spawned(slot: usize, generation: Generation, p: i32) -> Event {
        Event::Spawned {
            slot,
            generation,
            pid: pid(p),
            cpu: Some([0, 1][slot % 2]),
            sockets: vec![],
        }
    }

    pub fn exited(p: i32, reason: ExitReason) -> Event {
        Event::Exited {
            pid: pid(p),
            reason,
            killer: None,
        }
    }

    pub fn ready(p: i32) -> Event {
        Event::Ready { pid: pid(p) }
    }

    pub fn spawns(actions: &[Action]) -> Vec<(usize, Generation)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Spawn {
                    slot, generation, ..
                } => Some((*slot, *generation)),
                _ => None,
            })
            .collect()
    }

    /// The signals sent, but the SIGCONT that follows every stop signal.
    pub fn signals(actions: &[Action]) -> Vec<(i32, Signal)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Signal { pgid, signal } if *signal != Signal::SIGCONT => {
                    Some((pgid.as_raw(), *signal))
                }
                _ => None,
            })
            .collect()
    }

    pub fn logs(actions: &[Action]) -> String {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Log(l) => Some(l.as_str()),
                _ => None,
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    pub fn exit(actions: &[Action]) -> Option<Outcome> {
        actions.iter().find_map(|a| match a {
            Action::Exit(o) => Some(o.clone()),
            _ => None,
        })
    }

    /// Starts `n` workers with pids 100.. and makes them ready.
    pub fn running(n: usize) -> (Supervisor, Instant) {
        running_with(n, 1)
    }

    pub fn running_with(n: usize, batch: usize) -> (Supervisor, Instant) {
        let (mut s, t0) = sup_with(n, ReadyMode::Listening, batch);
        assert_eq!(spawns(&s.step(Event::Start, t0)), vec![(0, 1)]);
        for i in 0..n {
            assert!(spawns(&s.step(spawned(i, 1, 100 + i as i32), t0)).is_empty());
            let next = spawns(&s.step(Event::Tick, t0));
            let expected = if i + 1 < n { vec![(i + 1, 1)] } else { vec![] };
            assert_eq!(next, expected, "start-up forks one slot per tick");
        }
        assert_eq!(s.next_deadline(), Some(t0 + TIMEOUT), "ready timeout");
        let t = t0 + Duration::from_millis(40);
        let mut out = Vec::new();
        for i in 0..n {
            out.extend(s.step(ready(100 + i as i32), t));
        }
        assert!(logs(&out).contains(&format!("all {n} workers ready, 40 ms after start")));
        assert_eq!(s.phase, Phase::Running);
        assert_eq!(s.next_deadline(), None, "idle means no timer");
        (s, t)
    }

    /// Starts a rolling restart and prepares its generation.
    pub fn reload(s: &mut Supervisor, t: Instant) -> Vec<Action> {
        let out = s.step(Event::Reload, t);
        let generation = match out.iter().find_map(|a| match a {
            Action::PrepareGeneration { generation } => Some(*generation),
            _ => None,
        }) {
            Some(g) => g,
            None => panic!("no PrepareGeneration in {out:?}"),
        };
        s.step(Event::GenerationPrepared { generation }, t)
    }

    #[test]
    fn crashed_worker_is_restarted_in_its_slot_after_backoff() {
        let (mut s, t) = running(2);
        let out = s.step(exited(101, ExitReason::Code(1)), t);
        assert!(logs(&out).contains("restarting in 100 ms"), "{out:?}");
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
        s.step(spawned(1, 1, 200), t2);
        let out = s.step(exited(200, ExitReason::signal(KILL)), t2);
        let log = logs(&out);
        assert!(
            log.contains("signal SIGKILL") && log.contains("restarting in 200 ms"),
            "{log}"
        );
    }

    #[test]
    fn failure_before_any_worker_is_ready_stops_everything_and_fails() {
        let (mut s, t0) = sup(3);
        s.step(Event::Start, t0);
        s.step(spawned(0, 1, 100), t0);
        assert_eq!(s.next_deadline(), Some(t0), "the next fork is due at once");
        s.step(Event::Tick, t0);
        let failed = Event::SpawnFailed {
            slot: 1,
            generation: 1,
            error: "binding 127.0.0.1:1: denied".into(),
        };
        let out = s.step(failed, t0);
        assert_eq!(signals(&out), vec![(100, TERM)]);
        assert!(spawns(&out).is_empty(), "slot 2 is never forked");
        let out = s.step(exited(100, ExitReason::signal(TERM)), t0);
        assert_eq!(
            exit(&out),
            Some(Outcome::Failed(
                "worker 1 (cpu 1) (gen 1): binding 127.0.0.1:1: denied".into()
            ))
        );
    }

    #[test]
    fn app_exiting_at_once_is_a_start_up_failure_not_a_restart_loop() {
        let (mut s, t0) = sup(1);
        s.step(Event::Start, t0);
        s.step(spawned(0, 1, 100), t0);
        let out = s.step(exited(100, ExitReason::Code(2)), t0);
        match exit(&out) {
            Some(Outcome::Failed(msg)) => assert!(
                msg.contains("worker 0 (pid 100, cpu 0, gen 1): exited (exit status 2)")
                    && msg.contains("before any worker was ready"),
                "{msg}"
            ),
            other => panic!("expected failure, got {other:?}"),
        }
    }

    #[test]
    fn a_worker_whose_readiness_cannot_be_seen_counts_as_ready_at_start_up() {
        let (mut s, t0) = sup(1);
        s.step(Event::Start, t0);
        s.step(spawned(0, 1, 100), t0);
        let out = s.step(Event::Tick, t0 + TIMEOUT);
        let log = logs(&out);
        assert!(
            log.contains("not ready after 30.0 s") && log.contains("--ready notify"),
            "{log}"
        );
        assert!(
            log.contains("counting it as ready") && log.contains("all 1 workers ready"),
            "{log}"
        );
        assert_eq!(s.phase, Phase::Running);
    }

    #[test]
    fn delay_mode_makes_workers_ready_after_the_delay() {
        let (mut s, t0) = sup_with(1, ReadyMode::Delay(Duration::from_millis(500)), 1);
        s.step(Event::Start, t0);
        s.step(spawned(0, 1, 100), t0);
        assert_eq!(s.next_deadline(), Some(t0 + Duration::from_millis(500)));
        let out = s.step(Event::Tick, t0 + Duration::from_millis(500));
        assert!(logs(&out).contains("ready after 500 ms"), "{out:?}");
    }

    #[test]
    fn graceful_stop_exits_zero_when_workers_leave_within_grace() {
        let (mut s, t) = running(2);
        let out = s.step(Event::StopGracefully, t);
        assert_eq!(signals(&out), vec![(100, TERM), (101, TERM)]);
        assert_eq!(s.next_deadline(), Some(t + Duration::from_secs(5)));
        s.step(exited(100, ExitReason::signal(TERM)), t);
        let out = s.step(exited(101, ExitReason::Code(0)), t);
        assert_eq!(exit(&out), Some(Outcome::Stopped));
    }

    #[test]
    fn grace_expiry_sigkills_and_reports_it() {
        let (mut s, t) = running(2);
        s.step(Event::StopGracefully, t);
        s.step(exited(100, ExitReason::Code(0)), t);
        let out = s.step(Event::Tick, t + Duration::from_secs(5));
        assert_eq!(signals(&out), vec![(101, KILL)]);
        assert_eq!(s.next_deadline(), None);
        let out = s.step(exited(101, ExitReason::signal(KILL)), t);
        assert_eq!(exit(&out), Some(Outcome::Killed));
    }

    #[test]
    fn a_repeated_stop_request_does_not_escalate_but_sigquit_kills_at_once() {
        let (mut s, t) = running(1);
        s.step(Event::StopGracefully, t);
        // `stop` then the service manager's SIGTERM: the same request, twice.
        let again = s.step(Event::StopGracefully, t + Duration::from_secs(1));
        assert_eq!(signals(&again), vec![]);
        assert_eq!(
            exit(&s.step(exited(100, ExitReason::Code(0)), t)),
            Some(Outcome::Stopped)
        );
        let (mut s, t) = running(1);
        s.step(Event::StopGracefully, t);
        assert_eq!(signals(&s.step(Event::StopNow, t)), vec![(100, KILL)]);
        let (mut s, t) = running(1);
        assert_eq!(
            signals(&s.step(Event::StopNow, t)),
            vec![(100, TERM), (100, KILL)]
        );
    }

    #[test]
    fn stop_cancels_pending_restarts_and_orphans_are_ignored() {
        let (mut s, t) = running(2);
        s.step(exited(101, ExitReason::Code(1)), t);
        assert!(s.step(exited(999, ExitReason::Code(0)), t).is_empty());
        s.step(Event::StopGracefully, t);
        assert!(spawns(&s.step(Event::Tick, t + Duration::from_secs(1))).is_empty());
        let out = s.step(exited(100, ExitReason::Code(0)), t);
        assert_eq!(exit(&out), Some(Outcome::Stopped));
    }

    #[test]
    fn failed_restart_after_start_up_is_retried_with_backoff() {
        let (mut s, t) = running(1);
        s.step(exited(100, ExitReason::Code(1)), t);
        let t = t + Duration::from_millis(100);
        s.step(Event::Tick, t);
        let failed = Event::SpawnFailed {
            slot: 0,
            generation: 1,
            error: "exec ./app: ENOENT".into(),
        };
        let out = s.step(failed, t);
        assert!(logs(&out).contains("retrying in 200 ms"), "{out:?}");
        assert!(exit(&out).is_none());
    }

    #[test]
    fn rolling_restart_surges_slot_by_slot_and_never_shrinks() {
        let (mut s, t) = running(2);
        let out = reload(&mut s, t);
        assert_eq!(spawns(&out), vec![(0, 2)], "one slot at a time");
        assert!(
            s.step(spawned(0, 2, 200), t)
                .iter()
                .all(|a| !matches!(a, Action::Signal { .. })),
            "the old worker serves until the new one is ready"
        );
        // New worker of slot 0 ready: the old one is asked to stop; slot 1 waits for it.
        let out = s.step(ready(200), t);
        assert_eq!(signals(&out), vec![(100, TERM)]);
        assert!(spawns(&out).is_empty());
        assert_eq!(s.slots()[0].pid(), Some(pid(200)));
        let out = s.step(exited(100, ExitReason::signal(TERM)), t);
        assert_eq!(spawns(&out), vec![(1, 2)]);
        s.step(spawned(1, 2, 201), t);
        s.step(ready(201), t);
        let out = s.step(
            exited(101, ExitReason::Code(0)),
            t + Duration::from_millis(80),
        );
        assert!(
            logs(&out)
                .contains("rolling restart to generation 2 done: 2 workers replaced in 80 ms"),
            "{out:?}"
        );
        assert!(s.rolling.is_none());
        assert_eq!(s.slots()[1].generation, 2);
    }

    #[test]
    fn with_drain_the_old_worker_stops_only_once_its_socket_drained() {
        let (mut s, t) = running(2);
        s.settings.drain = true;
        reload(&mut s, t);
        s.step(spawned(0, 2, 200), t);
        let out = s.step(ready(200), t);
        assert!(
            out.contains(&Action::Drain {
                slot: 0,
                pid: pid(100),
                wait: true,
            }),
            "{out:?}"
        );
        assert!(signals(&out).is_empty(), "no stop signal before the drain");
        assert_eq!(s.slots()[0].pid(), Some(pid(200)), "the new worker serves");
        assert!(spawns(&s.step(Event::Tick, t)).is_empty(), "slot 1 waits");
        let out = s.step(
            Event::Drained {
                slot: 0,
                pid: pid(100),
            },
            t,
        );
        assert_eq!(signals(&out), vec![(100, TERM)]);
        let out = s.step(exited(100, ExitReason::signal(TERM)), t);
        assert_eq!(spawns(&out), vec![(1, 2)], "then the next slot");
    }

    #[test]
    fn with_drain_a_scaled_away_worker_stops_once_its_socket_drained() {
        let (mut s, t) = running(2);
        s.settings.drain = true;
        let out = s.step(Event::Scale(1), t);
        assert!(
            out.contains(&Action::Drain {
                slot: 1,
                pid: pid(101),
                wait: true
            }),
            "{out:?}"
        );
        assert!(signals(&out).is_empty(), "{out:?}");
        let drained = Event::Drained {
            slot: 1,
            pid: pid(101),
        };
        assert_eq!(signals(&s.step(drained, t)), vec![(101, TERM)]);
    }

    #[test]
    fn an_old_worker_dying_while_its_socket_drains_moves_the_pass_on() {
        let (mut s, t) = running(2);
        s.settings.drain = true;
        reload(&mut s, t);
        s.step(spawned(0, 2, 200), t);
        s.step(ready(200), t);
        let out = s.step(exited(100, ExitReason::Code(1)), t);
        assert_eq!(spawns(&out), vec![(1, 2)]);
        // The drain's late answer finds nothing to stop.
        let late = Event::Drained {
            slot: 0,
            pid: pid(100),
        };
        assert!(signals(&s.step(late, t)).is_empty());
    }

    #[test]
    fn a_drain_outliving_its_abandoned_pass_still_stops_the_old_worker() {
        let (mut s, t) = running(2);
        s.settings.drain = true;
        s.settings.rolling_batch = 2;
        reload(&mut s, t);
        s.step(spawned(0, 2, 200), t);
        s.step(spawned(1, 2, 201), t);
        s.step(ready(200), t);
        // Slot 1's new worker crashes: the pass is abandoned, slot 0 keeps its new worker.
        s.step(exited(201, ExitReason::Code(1)), t);
        assert!(s.rolling().is_none());
        let out = s.step(
            Event::Drained {
                slot: 0,
                pid: pid(100),
            },
            t,
        );
        assert_eq!(signals(&out), vec![(100, TERM)]);
    }

    #[test]
    fn rolling_batch_replaces_k_slots_at_once() {
        let (mut s, t) = running_with(3, 2);
        assert_eq!(spawns(&reload(&mut s, t)), vec![(0, 2), (1, 2)]);
    }

    #[test]
    fn new_worker_crashing_rolls_back_and_keeps_every_old_worker() {
        let (mut s, t) = running(3);
        reload(&mut s, t);
        s.step(spawned(0, 2, 200), t);
        let out = s.step(exited(200, ExitReason::Code(1)), t);
        let log = logs(&out);
        assert!(log.contains("rolling restart to generation 2 failed: worker 0 (pid 200, cpu 0, gen 2): exited (exit status 1)"), "{log}");
        assert!(
            log.contains("before it was ready") && log.contains("generation 1 still serving"),
            "{log}"
        );
        assert!(signals(&out).is_empty(), "no old worker is touched");
        assert!(spawns(&out).is_empty(), "no slot is restarted");
        assert_eq!(
            (0..3).map(|i| s.slots()[i].pid()).collect::<Vec<_>>(),
            vec![Some(pid(100)), Some(pid(101)), Some(pid(102))]
        );
        // A later reload tries again, with a new generation.
        assert_eq!(spawns(&reload(&mut s, t)), vec![(0, 3)]);
    }

    #[test]
    fn new_worker_never_ready_is_stopped_and_the_pass_rolled_back() {
        let (mut s, t) = running(2);
        reload(&mut s, t);
        s.step(spawned(0, 2, 200), t);
        // Slot 0 done, slot 1's new worker never shows readiness.
        s.step(ready(200), t);
        s.step(exited(100, ExitReason::Code(0)), t);
        s.step(spawned(1, 2, 201), t);
        let out = s.step(Event::Tick, t + TIMEOUT);
        let log = logs(&out);
        assert_eq!(
            signals(&out),
            vec![(201, TERM)],
            "only the new worker is stopped"
        );
        assert!(
            log.contains("not ready after 30.0 s") && log.contains("--ready delay:"),
            "{log}"
        );
        assert!(log.contains("generation 1 and 2 still serving"), "{log}");
    }

    #[test]
    fn reloads_during_a_pass_coalesce_into_exactly_one_more_pass() {
        let (mut s, t) = running(1);
        reload(&mut s, t);
        for _ in 0..3 {
            assert!(spawns(&s.step(Event::Reload, t)).is_empty());
        }
        s.step(spawned(0, 2, 200), t);
        s.step(ready(200), t);
        let out = s.step(exited(100, ExitReason::Code(0)), t);
        assert!(
            out.contains(&Action::PrepareGeneration { generation: 3 }),
            "{out:?}"
        );
        let out = s.step(Event::GenerationPrepared { generation: 3 }, t);
        assert_eq!(spawns(&out), vec![(0, 3)]);
        s.step(spawned(0, 3, 300), t);
        s.step(ready(300), t);
        let out = s.step(exited(200, ExitReason::Code(0)), t);
        assert!(logs(&out).contains("generation 3 done"));
        assert!(
            !out.iter()
                .any(|a| matches!(a, Action::PrepareGeneration { .. })),
            "no third pass"
        );
    }

    #[test]
    fn stop_during_a_rolling_restart_stops_old_and_new_workers() {
        let (mut s, t) = running(2);
        reload(&mut s, t);
        s.step(spawned(0, 2, 200), t);
        let out = s.step(Event::StopGracefully, t);
        assert_eq!(signals(&out), vec![(100, TERM), (101, TERM), (200, TERM)]);
        for p in [100, 101, 200] {
            s.step(exited(p, ExitReason::Code(0)), t);
        }
        assert_eq!(s.phase, Phase::Done);
    }

    #[test]
    fn old_worker_that_ignores_the_stop_is_killed_after_grace_and_the_pass_goes_on() {
        let (mut s, t) = running(2);
        reload(&mut s, t);
        s.step(spawned(0, 2, 200), t);
        s.step(ready(200), t);
        let out = s.step(Event::Tick, t + Duration::from_secs(5));
        assert_eq!(signals(&out), vec![(100, KILL)]);
        let out = s.step(
            exited(100, ExitReason::signal(KILL)),
            t + Duration::from_secs(5),
        );
        assert_eq!(spawns(&out), vec![(1, 2)]);
    }

    #[test]
    fn generation_that_cannot_be_prepared_fails_the_pass_without_touching_workers() {
        let (mut s, t) = running(1);
        s.step(Event::Reload, t);
        let out = s.step(
            Event::GenerationFailed {
                generation: 2,
                error: "--cmd: ./app: no such file".into(),
            },
            t,
        );
        assert!(
            logs(&out).contains("failed: --cmd: ./app: no such file"),
            "{out:?}"
        );
        assert!(signals(&out).is_empty() && spawns(&out).is_empty());
    }

    #[test]
    fn crashed_old_worker_in_a_slot_being_rolled_is_replaced_by_the_surge() {
        let (mut s, t) = running(1);
        reload(&mut s, t);
        s.step(spawned(0, 2, 200), t);
        s.step(exited(100, ExitReason::Code(1)), t);
        assert!(spawns(&s.step(Event::Tick, t + Duration::from_secs(1))).is_empty());
        let out = s.step(ready(200), t);
        assert!(logs(&out).contains("generation 2 done"), "{out:?}");
        assert_eq!(s.slots()[0].pid(), Some(pid(200)));
    }

    #[test]
    fn scaling_up_forks_new_pinned_slots_and_down_stops_the_highest() {
        let (mut s, t) = running(2);
        let out = s.step(Event::Scale(4), t);
        assert!(logs(&out).contains("scaling from 2 to 4 workers"));
        assert_eq!(spawns(&out), vec![(2, 1)]);
        assert_eq!(
            spawns(&s.step(Event::Tick, t)),
            vec![(3, 1)],
            "one fork per wake"
        );
        assert_eq!(s.slots()[3].cpu, Some(1), "slot 3 wraps to the second CPU");
        s.step(spawned(2, 1, 102), t);
        s.step(spawned(3, 1, 103), t);
        let out = s.step(Event::Scale(1), t);
        assert_eq!(signals(&out), vec![(103, TERM), (102, TERM), (101, TERM)]);
        assert_eq!(s.slots().len(), 1);
        let out = s.step(exited(103, ExitReason::Code(0)), t);
        assert!(
            logs(&out).contains("exited"),
            "a scaled-away worker is just logged"
        );
        assert!(spawns(&out).is_empty());
        assert!(
            signals(&s.step(Event::Scale(0), t)).is_empty(),
            "never below 1"
        );
    }

    #[test]
    fn scaling_is_refused_during_a_rolling_restart() {
        let (mut s, t) = running(2);
        reload(&mut s, t);
        let out = s.step(Event::Scale(3), t);
        assert!(logs(&out).contains("refused"), "{out:?}");
        assert_eq!(s.slots().len(), 2);
    }

    #[test]
    fn new_slots_start_on_the_generation_that_serves() {
        let (mut s, t) = running(1);
        reload(&mut s, t);
        s.step(spawned(0, 2, 200), t);
        s.step(ready(200), t);
        s.step(exited(100, ExitReason::Code(0)), t);
        assert_eq!(spawns(&s.step(Event::Scale(2), t)), vec![(1, 2)]);
    }

    #[test]
    fn a_stale_spawn_failure_from_an_abandoned_batch_leaves_the_slot_alone() {
        let (mut s, t) = running_with(2, 2);
        reload(&mut s, t);
        let failed = |slot| Event::SpawnFailed {
            slot,
            generation: 2,
            error: "exec: Exec format error".into(),
        };
        s.step(failed(0), t);
        let out = s.step(failed(1), t);
        assert!(
            signals(&out).is_empty() && spawns(&out).is_empty(),
            "{out:?}"
        );
        assert_eq!(
            s.slots()[1].pid(),
            Some(pid(101)),
            "slot 1 still served by its worker"
        );
        assert!(spawns(&s.step(Event::Tick, t + Duration::from_secs(1))).is_empty());
    }

    #[test]
    fn a_new_worker_dying_after_ready_stops_the_pass_and_its_slot_goes_back() {
        let (mut s, t) = running(3);
        reload(&mut s, t);
        s.step(spawned(0, 2, 200), t);
        s.step(ready(200), t);
        s.step(exited(100, ExitReason::Code(0)), t);
        s.step(spawned(1, 2, 201), t);
        // The first new worker dies after it was ready: no further slot is touched.
        let out = s.step(exited(200, ExitReason::Code(1)), t);
        let log = logs(&out);
        assert!(
            log.contains("failed") && log.contains("after it was ready"),
            "{log}"
        );
        assert_eq!(
            signals(&out),
            vec![(201, TERM)],
            "the surge under way is stopped"
        );
        assert!(s.rolling.is_none());
        let out = s.step(Event::Tick, t + Duration::from_millis(100));
        assert_eq!(
            spawns(&out),
            vec![(0, 1)],
            "slot 0 restarts on generation 1"
        );
        assert_eq!(
            s.slots()[2].pid(),
            Some(pid(102)),
            "slot 2 was never touched"
        );
    }

    #[test]
    fn a_reload_queued_during_a_failed_pass_still_runs() {
        let (mut s, t) = running(1);
        reload(&mut s, t);
        s.step(Event::Reload, t);
        s.step(spawned(0, 2, 200), t);
        let out = s.step(exited(200, ExitReason::Code(1)), t);
        assert!(
            out.contains(&Action::PrepareGeneration { generation: 3 }),
            "{out:?}"
        );
    }

    #[test]
    fn a_surge_worker_that_is_its_slots_only_worker_is_not_stopped_at_the_timeout() {
        let (mut s, t) = running(1);
        reload(&mut s, t);
        s.step(spawned(0, 2, 200), t);
        s.step(exited(100, ExitReason::Code(1)), t); // the old worker crashed meanwhile
        let out = s.step(Event::Tick, t + TIMEOUT);
        assert!(signals(&out).is_empty(), "{out:?}");
        let log = logs(&out);
        assert!(
            log.contains("counting it as ready") && log.contains("generation 2 done"),
            "{log}"
        );
        assert_eq!(s.slots()[0].pid(), Some(pid(200)));
    }

    #[test]
    fn a_stop_signal_is_followed_by_sigcont_so_a_stopped_worker_can_act_on_it() {
        let (mut s, t) = running(1);
        let out = s.step(Event::StopGracefully, t);
        let sent: Vec<Signal> = out
            .iter()
            .filter_map(|a| match a {
                Action::Signal { signal, .. } => Some(*signal),
                _ => None,
            })
            .collect();
        assert_eq!(sent, vec![TERM, Signal::SIGCONT]);
    }

    #[test]
    fn a_worker_listening_elsewhere_fails_at_the_timeout_instead_of_counting_as_ready() {
        let elsewhere = |p: i32| Event::ListensElsewhere {
            pid: pid(p),
            addrs: "127.0.0.1:3000".into(),
        };
        // At start-up: the start-up fails with that cause.
        let (mut s, t0) = sup(1);
        s.step(Event::Start, t0);
        s.step(spawned(0, 1, 100), t0);
        let out = s.step(elsewhere(100), t0);
        assert!(
            logs(&out).contains("listens on 127.0.0.1:3000 itself"),
            "{out:?}"
        );
        assert!(s.step(elsewhere(100), t0).is_empty(), "said once");
        let out = s.step(Event::Tick, t0 + TIMEOUT);
        assert_eq!(signals(&out), vec![(100, TERM)]);
        let out = s.step(exited(100, ExitReason::signal(TERM)), t0 + TIMEOUT);
        match exit(&out) {
            Some(Outcome::Failed(why)) => assert!(why.contains("not on its fd 3"), "{why}"),
            other => panic!("{other:?}"),
        }

        // In a rolling restart: the pass is rolled back.
        let (mut s, t) = running(1);
        reload(&mut s, t);
        s.step(spawned(0, 2, 200), t);
        s.step(elsewhere(200), t);
        let out = s.step(Event::Tick, t + TIMEOUT);
        assert!(
            out.iter().any(
                |a| matches!(a, Action::Report(Report::Failed { why, .. }) if why.contains("fd 3"))
            ),
            "{out:?}"
        );
        assert_eq!(
            s.slots()[0].pid(),
            Some(pid(100)),
            "the old worker serves on"
        );
    }
}

#[cfg(test)]
mod crash_loop_tests {
    //! Backoff for crash loops, not for deaths; never every slot in backoff by our hand.
    use super::tests::*;
    use super::*;

    const KILL: Signal = Signal::SIGKILL;

    fn releases(actions: &[Action]) -> Vec<usize> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::ReleaseSockets { slot, .. } => Some(*slot),
                _ => None,
            })
            .collect()
    }

    /// Restarts `slot` (due by `t`) with pid `p`; makes it ready at once if `ready`.
    fn restart(s: &mut Supervisor, slot: usize, p: i32, ready_too: bool, t: Instant) {
        assert_eq!(
            spawns(&s.step(Event::Tick, t)),
            vec![(slot, 1)],
            "slot {slot} due"
        );
        s.step(spawned(slot, 1, p), t);
        if ready_too {
            s.step(ready(p), t);
        }
    }

    #[test]
    fn a_worker_that_served_is_restarted_in_the_base_delay_however_often_it_is_killed() {
        let (mut s, t0) = running(1);
        let mut t = t0;
        let mut p = 100;
        for kill in 0..12 {
            // Killed after serving 1.5 s, again and again (the kill storm of issue 25).
            t += Duration::from_millis(1500);
            let out = s.step(exited(p, ExitReason::signal(KILL)), t);
            assert!(
                logs(&out).contains("restarting in 100 ms"),
                "kill {kill}: {out:?}"
            );
            assert!(releases(&out).is_empty(), "kill {kill}: the socket stays");
            assert!(s.degraded().is_none(), "kill {kill}");
            t += Duration::from_millis(100);
            p = 200 + kill;
            restart(&mut s, 0, p, true, t);
        }
        assert_eq!(s.deaths().get("unknown"), Some(&12), "{:?}", s.deaths());
    }

    #[test]
    fn control_a_worker_dying_within_min_uptime_of_ready_backs_off_and_lets_go_of_its_socket() {
        let (mut s, t0) = running(2);
        let mut t = t0;
        let mut p = 101;
        let mut delays = Vec::new();
        let mut released = None;
        for crash in 1..=5 {
            t += MIN_UPTIME / 2;
            let out = s.step(exited(p, ExitReason::Code(1)), t);
            let log = logs(&out);
            let delay = log
                .split("restarting in ")
                .nth(1)
                .unwrap()
                .lines()
                .next()
                .unwrap();
            delays.push(delay.to_string());
            if !releases(&out).is_empty() {
                released = Some(crash);
            }
            t = s.next_deadline().unwrap();
            p = 200 + crash;
            restart(&mut s, 1, p, true, t);
        }
        assert_eq!(delays, ["100 ms", "200 ms", "400 ms", "800 ms", "1.6 s"]);
        assert_eq!(released, Some(5));
        let why = s.degraded().expect("degraded");
        assert!(
            why.starts_with("slot 1 crash-loops (5 quick deaths in a row, last exit status 1 within --min-uptime of ready)"),
            "{why}"
        );
        // Its worker now lives --min-uptime after ready: the loop is over, at that moment.
        assert_eq!(s.next_deadline(), Some(t + MIN_UPTIME));
        let out = s.step(Event::Tick, t + MIN_UPTIME);
        let log = logs(&out);
        assert!(log.contains("slot 1's crash loop is over"), "{log}");
        assert!(log.contains("cluster no longer degraded"), "{log}");
        assert!(s.degraded().is_none());
        let out = s.step(exited(p, ExitReason::signal(KILL)), t + 10 * MIN_UPTIME);
        assert!(logs(&out).contains("restarting in 100 ms"), "{out:?}");
    }

    #[test]
    fn the_last_slot_out_of_backoff_keeps_restarting_at_the_base_delay() {
        let (mut s, t0) = running(2);
        // Every worker crashes 0.2 s after it is ready (a bad config read after ready);
        // simulated in steps of 10 ms for 20 s.
        let mut alive: BTreeMap<usize, (i32, Instant)> = [(0, (100, t0)), (1, (101, t0))].into();
        let mut next = 300;
        let mut all = String::new();
        let mut t = t0;
        while t < t0 + Duration::from_secs(20) {
            t += Duration::from_millis(10);
            let mut out = s.step(Event::Tick, t);
            for (slot, _) in spawns(&out.clone()) {
                out.extend(s.step(spawned(slot, 1, next), t));
                out.extend(s.step(ready(next), t));
                alive.insert(slot, (next, t));
                next += 1;
            }
            for (slot, (p, since)) in alive.clone() {
                if t >= since + Duration::from_millis(200) {
                    out.extend(s.step(exited(p, ExitReason::Code(1)), t));
                    alive.remove(&slot);
                }
            }
            let dark = s
                .slots()
                .iter()
                .filter(|sl| matches!(sl.state, SlotState::Waiting { at } if at > t + BACKOFF_MIN))
                .count();
            all.push_str(&logs(&out));
            all.push('\n');
            assert!(dark < 2, "both slots in backoff at {:?}:\n{all}", t - t0);
        }
        assert!(
            all.contains(
                "worker 1: every other slot is in backoff: it keeps restarting in 100 ms so that \
                 the port stays served"
            ),
            "{all}"
        );
        // Said when a slot begins to be the one kept (the two take turns while their
        // delays are short), not at each of its restarts.
        let said = all.matches("every other slot is in backoff").count();
        assert!((1..10).contains(&said), "said {said} times:\n{all}");
        assert!(s.slots()[1].kept_up && !s.slots()[0].kept_up);
        let why = s.degraded().expect("degraded");
        assert!(
            why.contains("slot 0 crash-loops") && why.contains("slot 1 keeps restarting"),
            "{why}"
        );
        // Slot 0 backs off to 30 s; slot 1 restarts every 100 ms + 200 ms it serves.
        assert!(s.slots()[1].restarts > 50, "{}", s.slots()[1].restarts);
        assert!(s.slots()[0].restarts < 15, "{}", s.slots()[0].restarts);
    }

    #[test]
    fn control_workers_that_never_become_ready_all_back_off() {
        let (mut s, t0) = running(2);
        let mut t = t0 + Duration::from_millis(10);
        // The app is broken now: every new worker exits 1 at once, before ready.
        s.step(exited(100, ExitReason::Code(1)), t);
        let out = s.step(exited(101, ExitReason::Code(1)), t);
        assert!(releases(&out).is_empty());
        let mut p = 200;
        let mut all_dark = false;
        let mut released = Vec::new();
        for _ in 0..12 {
            t = s.next_deadline().unwrap();
            for (slot, _) in spawns(&s.step(Event::Tick, t)) {
                s.step(spawned(slot, 1, p), t);
                let out = s.step(exited(p, ExitReason::Code(1)), t);
                released.extend(releases(&out));
                all_dark |=
                    logs(&out).contains("no worker became ready since its slot's last crash");
                assert!(!logs(&out).contains("keeps restarting"), "{out:?}");
                p += 1;
            }
        }
        assert!(all_dark, "said that the app cannot start");
        released.sort_unstable();
        released.dedup();
        assert_eq!(
            released,
            vec![0, 1],
            "both crash-looping slots let go of their sockets"
        );
        assert!(s.degraded().is_some());
    }

    #[test]
    fn deaths_are_counted_by_cause_and_stops_the_master_asked_for_are_not() {
        let (mut s, t) = running(3);
        let oom = Cause::OomKiller {
            kernel: Some("Memory cgroup out of memory: Killed process 100 (python3)".into()),
        };
        let out = s.step(
            Event::Exited {
                pid: pid(100),
                reason: ExitReason::signal(KILL),
                killer: Some(oom),
            },
            t,
        );
        let log = logs(&out);
        assert!(
            log.contains("exited (signal SIGKILL) after 40 ms: killed by the OOM killer (kernel: Memory cgroup out of memory: Killed process 100 (python3)) (--max-memory recycles a worker before the OOM killer strikes); restarting in"),
            "{log}"
        );
        assert_eq!(
            s.slots()[0].last_cause.as_deref(),
            Some("killed by the OOM killer (kernel: Memory cgroup out of memory: Killed process 100 (python3))")
        );
        s.step(exited(101, ExitReason::signal(Signal::SIGSEGV)), t);
        let out = s.step(
            Event::Exited {
                pid: pid(102),
                reason: ExitReason::signal(KILL),
                killer: Some(Cause::OtherProcess),
            },
            t,
        );
        assert!(logs(&out).contains("killed by another process"), "{out:?}");
        // Stopped by the master, and SIGKILLed by it after grace: no deaths.
        let t = t + Duration::from_millis(100);
        for (slot, _) in spawns(&s.step(Event::Tick, t)) {
            s.step(spawned(slot, 1, 200 + slot as i32), t);
        }
        s.step(Event::StopNow, t);
        for p in [200, 201, 202] {
            s.step(exited(p, ExitReason::signal(KILL)), t);
        }
        let deaths: Vec<_> = s.deaths().iter().map(|(k, v)| (*k, *v)).collect();
        assert_eq!(
            deaths,
            [("oom_killer", 1), ("other_process", 1), ("signal", 1)]
        );
    }
}

#[cfg(test)]
mod socket_tests {
    //! When the supervisor tells sockets/slots.rs to let go of a slot's sockets.
    use super::tests::*;
    use super::*;

    fn releases(actions: &[Action]) -> Vec<usize> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::ReleaseSockets { slot, .. } => Some(*slot),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_slot_keeps_its_socket_through_four_quick_crashes_and_lets_go_at_the_fifth() {
        let (mut s, t0) = running(2);
        let mut t = t0 + Duration::from_millis(50);
        let mut p = 100;
        let mut released_at = None;
        for crash in 1..=5 {
            let out = s.step(exited(p, ExitReason::Code(1)), t);
            if !releases(&out).is_empty() {
                assert_eq!(releases(&out), vec![0]);
                assert!(logs(&out).contains("restarting in 1.6 s"), "{}", logs(&out));
                released_at = Some(crash);
                break;
            }
            t = s.next_deadline().unwrap();
            assert_eq!(spawns(&s.step(Event::Tick, t)), vec![(0, 1)]);
            p = 200 + crash;
            s.step(spawned(0, 1, p), t);
        }
        assert_eq!(released_at, Some(5));
    }

    #[test]
    fn scale_down_and_stop_let_go_of_sockets_and_a_crash_does_not() {
        let (mut s, t0) = running(3);
        let out = s.step(exited(101, ExitReason::Code(1)), t0);
        assert!(releases(&out).is_empty(), "a first crash keeps the socket");
        let out = s.step(Event::Scale(1), t0);
        let mut released = releases(&out);
        released.sort_unstable();
        assert_eq!(released, vec![1, 2]);
        let out = s.step(Event::StopGracefully, t0);
        assert!(out.contains(&Action::ReleaseAllSockets));
    }

    #[test]
    fn a_worker_on_a_socket_that_no_longer_listens_is_replaced_at_once() {
        let (mut s, t0) = running(2);
        let out = s.step(Event::SocketLost { slot: 1, inode: 7 }, t0);
        assert!(logs(&out).contains("no longer listens"), "{}", logs(&out));
        assert_eq!(signals(&out), vec![(101, Signal::SIGTERM)]);
        // Replaced without backoff, and the old worker's exit is not a crash.
        assert_eq!(spawns(&s.step(Event::Tick, t0)), vec![(1, 1)]);
        s.step(spawned(1, 1, 300), t0);
        let out = s.step(exited(101, ExitReason::Code(0)), t0);
        assert!(spawns(&out).is_empty() && !logs(&out).contains("restarting"));
        assert_eq!(s.slots()[1].restarts, 1);
    }

    #[test]
    fn a_lost_socket_under_a_surges_new_worker_rolls_the_pass_back() {
        let (mut s, t0) = running(1);
        s.step(Event::Reload, t0);
        let out = s.step(Event::GenerationPrepared { generation: 2 }, t0);
        assert_eq!(spawns(&out), vec![(0, 2)]);
        s.step(spawned(0, 2, 300), t0);
        let out = s.step(Event::SocketLost { slot: 0, inode: 7 }, t0);
        assert!(logs(&out).contains("failed"), "{}", logs(&out));
        assert_eq!(signals(&out), vec![(300, Signal::SIGTERM)]);
    }
}

#[cfg(test)]
mod recycle_tests {
    //! Recycles: a one-slot surge through the rolling-restart machinery.
    use super::tests::*;
    use super::*;
    use crate::master::recycle::Reason;

    fn memory() -> Reason {
        Reason::Memory {
            bytes: 700 << 20,
            limit: 512 << 20,
        }
    }

    fn hung() -> Reason {
        Reason::Hung {
            stalled: Duration::from_secs(1),
            queued: 9,
            stopped: true,
        }
    }

    #[test]
    fn a_recycle_surges_one_slot_on_its_generation_and_stops_the_old_worker_once_ready() {
        let (mut s, t0) = running(2);
        let out = s.step(
            Event::Recycle {
                pid: pid(101),
                reason: memory(),
            },
            t0,
        );
        assert!(
            logs(&out)
                .contains("worker 1 (pid 101, cpu 1, gen 1): recycled: memory 700 MiB > 512 MiB"),
            "{}",
            logs(&out)
        );
        assert_eq!(spawns(&out), vec![(1, 1)]);
        assert!(
            signals(&out).is_empty(),
            "the old one serves until the new one is ready"
        );
        assert_eq!(s.recycling(), Some(1));
        assert!(s.rolling().is_none(), "a recycle is not a deploy");
        s.step(spawned(1, 1, 300), t0);
        let out = s.step(ready(300), t0);
        assert_eq!(signals(&out), vec![(101, Signal::SIGTERM)]);
        let out = s.step(exited(101, ExitReason::Code(0)), t0);
        assert!(logs(&out).contains("recycle done"), "{}", logs(&out));
        assert_eq!(s.recycling(), None);
        assert_eq!(s.recycles().get("memory"), Some(&1));
        assert_eq!(s.rolling_counts(), (0, 0));
        assert!(s.slots()[1]
            .last_recycle
            .as_deref()
            .unwrap()
            .starts_with("memory"));
    }

    #[test]
    fn one_recycle_at_a_time_and_none_during_a_rolling_restart() {
        let (mut s, t0) = running(3);
        s.step(
            Event::Recycle {
                pid: pid(100),
                reason: memory(),
            },
            t0,
        );
        let out = s.step(
            Event::Recycle {
                pid: pid(101),
                reason: memory(),
            },
            t0,
        );
        assert!(out.is_empty(), "a second recycle waits: {out:?}");
        let (mut s, t0) = running(2);
        s.step(Event::Reload, t0);
        let out = s.step(
            Event::Recycle {
                pid: pid(100),
                reason: memory(),
            },
            t0,
        );
        assert!(
            out.is_empty(),
            "no recycle during a rolling restart: {out:?}"
        );
    }

    #[test]
    fn a_hung_worker_is_killed_after_a_short_grace_once_its_successor_serves() {
        let (mut s, t0) = running(1);
        s.step(
            Event::Recycle {
                pid: pid(100),
                reason: hung(),
            },
            t0,
        );
        s.step(spawned(0, 1, 300), t0);
        s.step(ready(300), t0);
        let grace = crate::master::recycle::HUNG_GRACE;
        assert_eq!(
            s.next_deadline(),
            Some(t0 + grace),
            "not --grace (5 s here)"
        );
        let out = s.step(Event::Tick, t0 + grace);
        assert_eq!(signals(&out), vec![(100, Signal::SIGKILL)]);
    }

    #[test]
    fn a_successor_that_fails_leaves_the_old_worker_serving() {
        let (mut s, t0) = running(1);
        s.step(
            Event::Recycle {
                pid: pid(100),
                reason: memory(),
            },
            t0,
        );
        s.step(spawned(0, 1, 300), t0);
        let out = s.step(exited(300, ExitReason::Code(1)), t0);
        assert!(logs(&out).contains("recycle failed"), "{}", logs(&out));
        assert!(signals(&out).is_empty());
        assert_eq!(s.slots()[0].pid(), Some(pid(100)));
        assert_eq!(s.recycling(), None);
    }

    #[test]
    fn a_recycle_is_neither_reported_to_reload_clients_nor_the_last_rollout() {
        let (mut s, t0) = running(2);
        let mut out = s.step(
            Event::Recycle {
                pid: pid(101),
                reason: memory(),
            },
            t0,
        );
        out.extend(s.step(spawned(1, 1, 300), t0));
        out.extend(s.step(ready(300), t0));
        out.extend(s.step(exited(101, ExitReason::Code(0)), t0));
        assert!(
            !out.iter().any(|a| matches!(a, Action::Report(_))),
            "{out:?}"
        );
        assert_eq!(s.last_rollout(), None);
        // Control: a deploy is.
        let out = reload(&mut s, t0);
        assert_eq!(
            s.last_rollout().map(|r| (r.generation, r.result.name())),
            Some((2, "under way"))
        );
        let mut out = [out, s.step(spawned(0, 2, 400), t0)].concat();
        out.extend(s.step(ready(400), t0));
        assert!(
            out.iter().any(|a| matches!(
                a,
                Action::Report(Report::SlotReady {
                    generation: 2,
                    slot: 0,
                    done: 1,
                    total: 2,
                    ..
                })
            )),
            "{out:?}"
        );
    }
}
