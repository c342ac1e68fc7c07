//! The plan of one rolling restart: which slots are done, under way, and still to do.
//!
//! Surge, never shrink: a slot's new worker starts while the old one still serves (with the
//! slot's socket, which the master holds: for a moment both accept from its queue); only once the new one is ready
//! is the old one asked to stop, and the next slot starts once the old one has exited.
//! The supervisor owns the processes; this only tracks where each slot of the pass is.

use std::collections::VecDeque;
use std::time::Instant;

use nix::unistd::Pid;

use crate::master::worker::Generation;

/// Where one slot of the pass is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SurgeStep {
    /// Its new worker is being forked.
    Spawning,
    /// Its new worker runs and is not ready yet.
    Starting(Pid),
    /// Its new worker serves; the old one's (this pid's) socket drains before it is
    /// stopped (`--steer bpf`).
    Draining(Pid),
    /// Its new worker serves; the old one (this pid) is stopping.
    Retiring(Pid),
    /// Finished.
    Done,
}

/// One slot being replaced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Surge {
    /// The slot.
    pub slot: usize,
    /// How far it got.
    pub step: SurgeStep,
}

/// What a pass is for.
#[derive(Debug, Clone, PartialEq)]
pub enum Purpose {
    /// A deploy (SIGHUP, `reload`): every slot, to a new generation.
    Deploy,
    /// A recycle (master/recycle.rs): one slot, on its own generation, for this reason.
    Recycle {
        /// Why, as the log line says it.
        reason: String,
        /// The old worker is hung: it gets a short grace after the stop signal.
        hung: bool,
    },
}

/// One pass over every slot, to `generation`; or a recycle of one slot (the same surge).
#[derive(Debug, Clone)]
pub struct RollingRestart {
    /// What the pass is for.
    pub purpose: Purpose,
    /// The generation the pass brings in.
    pub generation: Generation,
    /// When the pass began.
    pub started: Instant,
    /// Whether the master has prepared the generation (re-resolved the program).
    pub prepared: bool,
    /// A reload came during the pass: one more pass follows.
    pub again: bool,
    pending: VecDeque<usize>,
    surges: Vec<Surge>,
    replaced: usize,
    total: usize,
}

impl RollingRestart {
    /// A pass over slots `0..slots`.
    pub fn new(generation: Generation, slots: usize, now: Instant) -> RollingRestart {
        RollingRestart {
            purpose: Purpose::Deploy,
            generation,
            started: now,
            prepared: false,
            again: false,
            pending: (0..slots).collect(),
            surges: Vec::new(),
            replaced: 0,
            total: slots,
        }
    }

    /// A recycle of `slot`, whose workers run `generation`.
    pub fn recycle(
        slot: usize,
        generation: Generation,
        reason: String,
        hung: bool,
        now: Instant,
    ) -> RollingRestart {
        RollingRestart {
            purpose: Purpose::Recycle { reason, hung },
            generation,
            started: now,
            prepared: true, // same program, nothing to look up
            again: false,
            pending: VecDeque::from([slot]),
            surges: Vec::new(),
            replaced: 0,
            total: 1,
        }
    }

    /// Whether this is a deploy (not a recycle).
    pub fn is_deploy(&self) -> bool {
        self.purpose == Purpose::Deploy
    }

    /// The surge of `slot`, if it is under way.
    pub fn surge(&self, slot: usize) -> Option<&Surge> {
        self.surges
            .iter()
            .find(|s| s.slot == slot && s.step != SurgeStep::Done)
    }

    /// The surge whose new or retiring worker is `pid`.
    pub fn surge_of_pid(&mut self, pid: Pid) -> Option<&mut Surge> {
        self.surges
            .iter_mut()
            .find(|s| matches!(s.step, SurgeStep::Starting(p) | SurgeStep::Draining(p) | SurgeStep::Retiring(p) if p == pid))
    }

    /// Moves `slot`'s surge on.
    pub fn set_step(&mut self, slot: usize, step: SurgeStep) {
        if let Some(s) = self.surges.iter_mut().find(|s| s.slot == slot) {
            s.step = step;
            if step == SurgeStep::Done {
                self.replaced += 1;
            }
        }
    }

    /// Slots to start now, keeping at most `batch` under way.
    pub fn next_slots(&mut self, batch: usize) -> Vec<usize> {
        self.surges.retain(|s| s.step != SurgeStep::Done);
        let mut started = Vec::new();
        while self.surges.len() < batch.max(1) {
            let Some(slot) = self.pending.pop_front() else {
                break;
            };
            self.surges.push(Surge {
                slot,
                step: SurgeStep::Spawning,
            });
            started.push(slot);
        }
        started
    }

    /// Slots under way.
    pub fn surges(&self) -> impl Iterator<Item = usize> + '_ {
        self.surges
            .iter()
            .filter(|s| s.step != SurgeStep::Done)
            .map(|s| s.slot)
            .chain(self.pending.iter().copied())
    }

    /// The new workers that are running but not yet ready.
    pub fn starting(&self) -> impl Iterator<Item = Pid> + '_ {
        self.surges.iter().filter_map(|s| match s.step {
            SurgeStep::Starting(pid) => Some(pid),
            _ => None,
        })
    }

    /// Whether every slot is done.
    pub fn is_complete(&self) -> bool {
        self.pending.is_empty() && self.surges.iter().all(|s| s.step == SurgeStep::Done)
    }

    /// Slots whose new worker has taken over (its old one may still be stopping).
    pub fn taken_over(&self) -> usize {
        self.replaced
            + self
                .surges
                .iter()
                .filter(|s| matches!(s.step, SurgeStep::Draining(_) | SurgeStep::Retiring(_)))
                .count()
    }

    /// Slots replaced so far, and slots in the pass.
    pub fn progress(&self) -> (usize, usize) {
        (self.replaced, self.total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_go_in_order_at_most_batch_at_a_time() {
        let mut r = RollingRestart::new(2, 5, Instant::now());
        assert_eq!(r.next_slots(2), vec![0, 1]);
        assert_eq!(r.next_slots(2), Vec::<usize>::new(), "two under way");
        r.set_step(0, SurgeStep::Starting(Pid::from_raw(10)));
        r.set_step(0, SurgeStep::Retiring(Pid::from_raw(5)));
        assert_eq!(r.surge_of_pid(Pid::from_raw(5)).map(|s| s.slot), Some(0));
        r.set_step(0, SurgeStep::Done);
        assert_eq!(r.next_slots(2), vec![2]);
        for slot in [1, 2] {
            r.set_step(slot, SurgeStep::Done);
        }
        assert_eq!(r.next_slots(2), vec![3, 4]);
        assert!(!r.is_complete());
        r.set_step(3, SurgeStep::Done);
        r.set_step(4, SurgeStep::Done);
        assert!(r.is_complete());
        assert_eq!(r.progress(), (5, 5));
    }
}
