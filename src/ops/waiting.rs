//! Control clients waiting for the outcome of what they asked: a `reload` follows its
//! rolling restart slot by slot, a `scale` waits for its workers, a `stop` for the master's
//! exit.
//!
//! The master holds their connections open (see `ops/conns.rs`) and feeds this module the
//! supervisor's [`Report`]s and, after every turn of its loop, the supervisor itself; what
//! comes back are the lines to send. A line is `progress: …` while it goes on, and a last
//! one whose first word tells the client its exit code (see [`Line::exit_code`]).
//! Nothing here does I/O.

use std::time::Instant;

use crate::master::supervisor::{Outcome, Report, Supervisor};
use crate::master::worker::{ms, Generation, SlotState};

/// What a held client waits for.
#[derive(Debug, Clone, PartialEq)]
pub enum Wait {
    /// The rolling restart to this generation (the first pass that starts after the
    /// request) to end.
    Reload {
        /// Its generation.
        generation: Generation,
    },
    /// The cluster to run `to` ready workers, and no more.
    Scale {
        /// Slots before the request.
        from: usize,
        /// Slots asked for.
        to: usize,
    },
    /// The master to exit.
    Stop,
}

/// One line for a waiting client.
#[derive(Debug, Clone, PartialEq)]
pub enum Line {
    /// It goes on.
    Progress(String),
    /// The outcome; the connection is closed after it.
    Final(String),
}

impl Line {
    /// The exit code a client command ends with after the last line `line` (documented in
    /// `--help` and the README): 0 `ok:`, 1 `error:` (refused, or overtaken by a stop),
    /// 3 `killed:` (stopped, but some worker was SIGKILLed), 4 `failed:` (the new generation
    /// was rolled back, or a new worker failed to start).
    pub fn exit_code(line: &str) -> u8 {
        match line.split(':').next() {
            Some("ok") => 0,
            Some("killed") => 3,
            Some("failed") => 4,
            _ => 1,
        }
    }
}

/// The waiting clients, by connection id.
#[derive(Debug, Default)]
pub struct Waiters {
    waiting: Vec<(u64, Wait)>,
}

impl Waiters {
    /// Client `id` waits for `wait`.
    pub fn add(&mut self, id: u64, wait: Wait) {
        self.waiting.push((id, wait));
    }

    /// Forgets the clients for which `open` is false (they hung up).
    pub fn retain_open(&mut self, open: impl Fn(u64) -> bool) {
        self.waiting.retain(|(id, _)| open(*id));
    }

    /// Whether anyone waits.
    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }

    /// The lines a rolling restart's report means for the reload clients.
    pub fn on_report(&mut self, report: &Report) -> Vec<(u64, Line)> {
        let (generation, line) = match report {
            Report::SlotStarting {
                generation,
                slot,
                total,
                pid,
            } => (
                *generation,
                Line::Progress(format!(
                    "progress: slot {}/{total}: generation {generation} starting (worker {slot}, pid {pid})",
                    slot + 1
                )),
            ),
            Report::SlotReady {
                generation,
                slot,
                done,
                total,
                after,
            } => (
                *generation,
                Line::Progress(format!(
                    "progress: slot {}/{total}: generation {generation} ready after {} ({done}/{total} done)",
                    slot + 1,
                    ms(*after)
                )),
            ),
            Report::Done {
                generation,
                replaced,
                took,
            } => (
                *generation,
                Line::Final(format!(
                    "ok: generation {generation} serves every slot: {replaced} workers replaced in {}",
                    ms(*took)
                )),
            ),
            Report::Failed {
                generation,
                why,
                serving,
            } => {
                let serving: Vec<String> = serving.iter().map(|g| g.to_string()).collect();
                let verb = if serving.len() == 1 { "serves" } else { "serve" };
                (
                    *generation,
                    Line::Final(format!(
                        "failed: generation {generation} rolled back: {why}; generation {} still {verb}",
                        serving.join(" and ")
                    )),
                )
            }
            Report::Abandoned { generation } => (
                *generation,
                Line::Final(format!(
                    "error: the rolling restart to generation {generation} was abandoned: the cluster is stopping"
                )),
            ),
        };
        let mut out = Vec::new();
        self.waiting.retain(|(id, wait)| match wait {
            Wait::Reload { generation: g } if *g == generation => {
                let last = matches!(line, Line::Final(_));
                out.push((*id, line.clone()));
                !last
            }
            _ => true,
        });
        out
    }

    /// The outcomes the supervisor's state settles now: scales that are done or failed,
    /// and whatever a stop overtook.
    pub fn check(&mut self, supervisor: &Supervisor, now: Instant) -> Vec<(u64, Line)> {
        let mut out = Vec::new();
        let stopping = supervisor.is_stopping();
        self.waiting.retain(|(id, wait)| {
            let line = match wait {
                Wait::Stop => None,
                Wait::Reload { generation } if stopping => Some(format!(
                    "error: the cluster is stopping: no rolling restart to generation {generation}"
                )),
                Wait::Reload { .. } => None,
                Wait::Scale { to, .. } if stopping => {
                    Some(format!("error: scale to {to}: the cluster is stopping"))
                }
                Wait::Scale { from, to } => scale_outcome(supervisor, *from, *to, now),
            };
            match line {
                Some(line) => {
                    out.push((*id, Line::Final(line)));
                    false
                }
                None => true,
            }
        });
        out
    }

    /// The last lines when the master exits with `outcome`.
    pub fn on_exit(&mut self, outcome: &Outcome) -> Vec<(u64, Line)> {
        self.waiting
            .drain(..)
            .map(|(id, wait)| {
                let line = match (wait, outcome) {
                    (Wait::Stop, Outcome::Stopped) => {
                        "ok: stopped: every worker exited within the grace period".into()
                    }
                    (Wait::Stop, Outcome::Killed) => {
                        "killed: stopped, but some worker had to be SIGKILLed after the grace period (the master exits 3)"
                            .into()
                    }
                    (Wait::Stop, Outcome::Failed(why)) => format!("error: {why}"),
                    (_, _) => "error: the cluster stopped".into(),
                };
                (id, Line::Final(line))
            })
            .collect()
    }
}

/// Whether a scale from `from` to `to` slots is over: every slot ready and the workers
/// scaled away gone (ok), or a new slot's worker failing (failed).
fn scale_outcome(supervisor: &Supervisor, from: usize, to: usize, now: Instant) -> Option<String> {
    let slots = supervisor.slots();
    if slots.len() != to {
        return Some(format!(
            "error: scale to {to}: overtaken: the cluster now has {} slots",
            slots.len()
        ));
    }
    for slot in slots.iter().skip(from) {
        if let SlotState::Waiting { at } = slot.state {
            let what = match slot.last_exit {
                Some(reason) => format!("exited ({reason})"),
                None => "could not be started".into(),
            };
            return Some(format!(
                "failed: scale to {to}: {} {what}; it restarts in {} (see `reuseport-cluster status` and the log)",
                slot.label(),
                ms(at.saturating_duration_since(now))
            ));
        }
    }
    let done = supervisor.ready_count() == to && supervisor.workers().count() == to;
    done.then(|| format!("ok: {to} workers ready"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_reload_client_follows_its_own_pass_and_ends_with_its_outcome() {
        let mut w = Waiters::default();
        w.add(1, Wait::Reload { generation: 3 });
        w.add(2, Wait::Stop);
        let other = Report::Done {
            generation: 2,
            replaced: 2,
            took: Duration::from_millis(5),
        };
        assert!(w.on_report(&other).is_empty(), "not its pass");
        let ready = Report::SlotReady {
            generation: 3,
            slot: 0,
            done: 1,
            total: 2,
            after: Duration::from_millis(41),
        };
        assert_eq!(
            w.on_report(&ready),
            vec![(
                1,
                Line::Progress(
                    "progress: slot 1/2: generation 3 ready after 41 ms (1/2 done)".into()
                )
            )]
        );
        let failed = Report::Failed {
            generation: 3,
            why: "worker 1 (pid 7, gen 3): exited (exit status 42) before it was ready".into(),
            serving: vec![2, 3],
        };
        let out = w.on_report(&failed);
        let Line::Final(last) = &out[0].1 else {
            panic!("{out:?}")
        };
        assert_eq!(
            last,
            "failed: generation 3 rolled back: worker 1 (pid 7, gen 3): exited (exit status 42) \
             before it was ready; generation 2 and 3 still serve"
        );
        assert_eq!(Line::exit_code(last), 4);
        assert!(w.on_report(&failed).is_empty(), "answered once");
        let out = w.on_exit(&Outcome::Killed);
        assert_eq!(out.len(), 1);
        let Line::Final(last) = &out[0].1 else {
            panic!()
        };
        assert_eq!(Line::exit_code(last), 3, "{last}");
        assert!(w.is_empty());
    }

    #[test]
    fn exit_codes_follow_the_first_word() {
        assert_eq!(Line::exit_code("ok: generation 2 serves every slot"), 0);
        assert_eq!(Line::exit_code("error: the cluster is stopping"), 1);
        assert_eq!(Line::exit_code("failed: generation 2 rolled back: x"), 4);
        assert_eq!(Line::exit_code("killed: stopped, but"), 3);
        assert_eq!(Line::exit_code("garbage"), 1);
    }
}
