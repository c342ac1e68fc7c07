//! What a worker leaves behind: the processes it started that outlive it.
//!
//! A worker is a process group, but its processes need not stay in it: the leader may exit
//! first (`sh -c`, `npm start` and launcher scripts all do, on SIGTERM, before the app they
//! started has drained), and a process may leave the group (`setsid`, a daemonizing
//! library). The master is their subreaper, so every one of them stays in its process tree:
//! reparented to the master when its parent dies. That tree, read from /proc, is the
//! master's view of every descendant.
//!
//! A process in the tree that is neither a worker nor below a live worker is a *leftover*.
//! It is put in the care of the worker that started it (by process group, or by the
//! LISTEN_PID it inherited in its environment; else of the worker being reaped) and keeps
//! that worker's grace: if the worker was asked to stop at T, its leftovers are SIGKILLed
//! at T + grace, not at once; if the worker crashed, its leftovers get the stop signal now
//! and SIGKILL after the grace. What a leftover starts while it drains (a `sleep` in a
//! drain script) is its own business until the grace ends, when the whole subtree is
//! SIGKILLed. The master exits only once no leftover is left (see master/mod.rs), so nothing
//! the cluster started outlives it or holds its port after it.
//!
//! Every leftover moves through [`LeftoverState`] in one place, [`Leftovers::advance`].

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::master::worker::ms;

/// How often the tree is read again while leftovers run (a leftover that is not the
/// master's child ends without a SIGCHLD to the master).
const RESCAN: Duration = Duration::from_millis(100);

/// One process as /proc shows it.
#[derive(Debug, Clone, PartialEq)]
struct Proc {
    ppid: i32,
    pgid: i32,
    /// Start time in clock ticks since boot: (pid, start) names one process for good.
    start: u64,
    zombie: bool,
}

/// Where a leftover is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeftoverState {
    /// Has the stop signal (its own or its worker's); SIGKILLed at `deadline`.
    Draining {
        /// When the grace runs out.
        deadline: Instant,
    },
    /// SIGKILLed, with everything below it.
    Killed,
}

#[derive(Debug, Clone)]
struct Leftover {
    start: u64,
    /// The worker it was left by, as the log names it.
    owner: String,
    /// That worker's pid (its process group).
    owner_pid: i32,
    state: LeftoverState,
}

/// What a worker being reaped was doing, as far as its leftovers are concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// It was asked to stop at `since` (its group had the stop signal then).
    Stopping {
        /// When the stop signal was sent.
        since: Instant,
        /// Its own grace, if not `--grace` (a hung worker's is shorter).
        grace: Option<Duration>,
    },
    /// It was SIGKILLed (so was its group).
    Killed,
    /// It ended by itself: a crash, or an exit nobody asked for.
    Unasked,
}

/// The leftovers the master waits for.
#[derive(Debug)]
pub struct Leftovers {
    master: i32,
    grace: Duration,
    stop_signal: Signal,
    procs: BTreeMap<i32, Leftover>,
    /// Leftovers SIGKILLed since the master started (the exit code says so at a stop).
    killed: u64,
}

impl Leftovers {
    /// Tracks what the workers of this master leave behind.
    pub fn new(grace: Duration, stop_signal: Signal) -> Leftovers {
        Leftovers {
            master: std::process::id() as i32,
            grace,
            stop_signal,
            procs: BTreeMap::new(),
            killed: 0,
        }
    }

    /// Whether any leftover still runs.
    pub fn is_empty(&self) -> bool {
        self.procs.is_empty()
    }

    /// How many leftovers were SIGKILLed so far.
    pub fn killed(&self) -> u64 {
        self.killed
    }

    /// When the tree must be read again.
    pub fn next_deadline(&self, now: Instant) -> Option<Instant> {
        if self.procs.is_empty() {
            return None;
        }
        let soonest = self.procs.values().filter_map(|l| match l.state {
            LeftoverState::Draining { deadline } => Some(deadline),
            LeftoverState::Killed => None,
        });
        Some(soonest.chain([now + RESCAN]).min().unwrap_or(now + RESCAN))
    }

    /// Takes over what the worker `owner` (pid `owner_pid`, exited but not yet reaped, so
    /// that its process group id cannot be reused) leaves behind. `live` are the workers
    /// still running: what is below them, or names one of them as its LISTEN_PID, is theirs.
    pub fn worker_ended(
        &mut self,
        owner: String,
        owner_pid: i32,
        ending: Ending,
        live: &HashSet<i32>,
        now: Instant,
    ) -> Vec<String> {
        let deadline = match ending {
            Ending::Stopping { since, grace } => since + grace.unwrap_or(self.grace),
            Ending::Killed | Ending::Unasked => now + self.grace,
        };
        let tree = read_tree();
        let mut lines = Vec::new();
        for (pid, p) in self.untracked_leftovers(&tree, live) {
            let (name, in_group) = match (p.pgid == owner_pid, listen_pid(pid)) {
                (true, _) => (owner.clone(), true),
                (false, Some(l)) if l == owner_pid => (owner.clone(), false),
                (false, Some(l)) => match self.procs.values().find(|t| t.owner_pid == l) {
                    Some(t) => (t.owner.clone(), false), // left by an earlier worker
                    None => (owner.clone(), false),
                },
                (false, None) => (owner.clone(), false),
            };
            let state = match ending {
                Ending::Killed => LeftoverState::Killed,
                _ => LeftoverState::Draining { deadline },
            };
            self.adopt(pid, &p, name, owner_pid, state, in_group, ending);
        }
        if let Some(n) = (!self.procs.is_empty()).then(|| self.count_of(owner_pid)) {
            if n > 0 {
                lines.push(match ending {
                    Ending::Killed => format!("{owner}: {n} of its processes outlived it; SIGKILLed"),
                    _ => format!(
                        "{owner}: {n} of its processes outlived it; they get the rest of the grace ({}) to finish",
                        ms(deadline.saturating_duration_since(now))
                    ),
                });
            }
        }
        lines
    }

    /// Reads the tree again: forgets leftovers that ended, takes in processes orphaned
    /// since (a leftover's children, once it exits), SIGKILLs what is past its grace.
    pub fn advance(&mut self, live: &HashSet<i32>, now: Instant) -> Vec<String> {
        let mut lines = Vec::new();
        if self.procs.is_empty() && !live.is_empty() {
            return lines; // nothing to follow; orphans show up when their worker is reaped
        }
        let tree = read_tree();
        self.procs.retain(|pid, l| {
            tree.get(pid)
                .is_some_and(|p| p.start == l.start && !p.zombie)
        });
        let orphans = self.untracked_leftovers(&tree, live);
        for (pid, p) in orphans {
            let owner = listen_pid(pid)
                .and_then(|l| self.procs.values().find(|t| t.owner_pid == l))
                .or_else(|| self.procs.values().find(|t| t.owner_pid == p.pgid))
                .cloned();
            let (name, owner_pid, state) = match owner {
                Some(t) => (t.owner, t.owner_pid, t.state),
                None => (
                    "a worker that exited".to_string(),
                    0,
                    LeftoverState::Draining {
                        deadline: now + self.grace,
                    },
                ),
            };
            let ending = match state {
                LeftoverState::Killed => Ending::Killed,
                LeftoverState::Draining { .. } => Ending::Unasked,
            };
            self.adopt(pid, &p, name, owner_pid, state, false, ending);
        }
        let overdue: Vec<i32> = self
            .procs
            .iter()
            .filter(
                |(_, l)| matches!(l.state, LeftoverState::Draining { deadline } if now >= deadline),
            )
            .map(|(pid, _)| *pid)
            .collect();
        for pid in overdue {
            if let Some(l) = self.procs.get_mut(&pid) {
                lines.push(format!(
                    "{}: its process {pid} still runs at the end of the grace; sending SIGKILL",
                    l.owner
                ));
                l.state = LeftoverState::Killed;
                self.killed += 1;
                for p in subtree(&tree, pid) {
                    let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
                }
            }
        }
        lines
    }

    fn count_of(&self, owner_pid: i32) -> usize {
        self.procs
            .values()
            .filter(|l| l.owner_pid == owner_pid)
            .count()
    }

    /// Starts following `pid`; signals it as `ending` asks (a process of the worker's group
    /// already had the group's stop signal).
    #[allow(clippy::too_many_arguments)]
    fn adopt(
        &mut self,
        pid: i32,
        p: &Proc,
        owner: String,
        owner_pid: i32,
        state: LeftoverState,
        in_group: bool,
        ending: Ending,
    ) {
        let target = Pid::from_raw(pid);
        match ending {
            Ending::Killed => {
                let _ = kill(target, Signal::SIGKILL);
            }
            Ending::Stopping { .. } if in_group => {}
            _ => {
                let _ = kill(target, self.stop_signal);
                let _ = kill(target, Signal::SIGCONT);
            }
        }
        crate::debug!("{owner}: following its leftover process {pid}");
        self.procs.insert(
            pid,
            Leftover {
                start: p.start,
                owner,
                owner_pid,
                state,
            },
        );
    }

    /// Processes of the master's tree that are not workers, not below a live worker, not
    /// below a followed leftover, not followed yet and not zombies.
    fn untracked_leftovers(
        &self,
        tree: &HashMap<i32, Proc>,
        live: &HashSet<i32>,
    ) -> Vec<(i32, Proc)> {
        let mut found = Vec::new();
        for (&pid, p) in tree {
            if p.zombie
                || pid == self.master
                || live.contains(&pid)
                || self.procs.contains_key(&pid)
            {
                continue;
            }
            // Walk up: the first interesting ancestor decides.
            let mut up = p.ppid;
            let mut steps = 0;
            let mine = loop {
                steps += 1;
                if up == self.master {
                    break true;
                }
                if up <= 1 || steps > 4096 || live.contains(&up) || self.procs.contains_key(&up) {
                    break false;
                }
                match tree.get(&up) {
                    Some(parent) => up = parent.ppid,
                    None => break false,
                }
            };
            if mine {
                found.push((pid, p.clone()));
            }
        }
        found.sort_by_key(|(pid, _)| *pid);
        found
    }
}

/// Every process on the machine, by pid.
fn read_tree() -> HashMap<i32, Proc> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return HashMap::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| Some((pid, parse_stat(&read_stat(pid)?)?)))
        .collect()
}

/// The fields of /proc/PID/stat after the command name, the state first: the name is in
/// parentheses and may hold anything, so they are counted from its closing one. After the
/// name: state(0) ppid(1) pgrp(2) … utime(11) stime(12) … starttime(19).
pub fn stat_fields(stat: &str) -> Option<Vec<&str>> {
    Some(
        stat.get(stat.rfind(')')? + 1..)?
            .split_whitespace()
            .collect(),
    )
}

/// /proc/PID/stat of `pid`.
pub fn read_stat(pid: impl std::fmt::Display) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()
}

/// Whether every thread of `pid` is stopped (job-control or tracing stop) or the process
/// is gone: nothing of it can run a system call until it is continued.
pub fn stopped(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return true;
    };
    tasks.flatten().all(|t| {
        std::fs::read_to_string(t.path().join("stat"))
            .ok()
            .and_then(|s| Some(stat_fields(&s)?.first()?.to_string()))
            .is_none_or(|state| matches!(state.as_str(), "T" | "t" | "Z" | "X"))
    })
}

/// One process's place in the tree, from its /proc/PID/stat.
fn parse_stat(stat: &str) -> Option<Proc> {
    let fields = stat_fields(stat)?;
    Some(Proc {
        zombie: matches!(*fields.first()?, "Z" | "X"),
        ppid: fields.get(1)?.parse().ok()?,
        pgid: fields.get(2)?.parse().ok()?,
        start: fields.get(19)?.parse().ok()?,
    })
}

/// The LISTEN_PID a process inherited: the worker it descends from (an app may have
/// unset it; then it is not known).
fn listen_pid(pid: i32) -> Option<i32> {
    let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    env.split(|b| *b == 0)
        .find_map(|kv| kv.strip_prefix(b"LISTEN_PID="))
        .and_then(|v| std::str::from_utf8(v).ok()?.parse().ok())
}

/// `pid` and every process below it, through /proc/PID/task/TID/children (cheaper than
/// reading the whole tree; just `pid` when it is gone).
pub fn family(pid: u32) -> Vec<u32> {
    let mut out = vec![pid];
    let mut i = 0;
    // Bounded: a fork bomb must not make the master read forever.
    while i < out.len() && out.len() < 4096 {
        let p = out[i];
        i += 1;
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            let path = task.path().join("children");
            if let Ok(children) = std::fs::read_to_string(path) {
                out.extend(
                    children
                        .split_whitespace()
                        .filter_map(|c| c.parse::<u32>().ok()),
                );
            }
        }
    }
    out
}

/// `root` and every process below it.
fn subtree(tree: &HashMap<i32, Proc>, root: i32) -> Vec<i32> {
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        let parent = out[i];
        out.extend(
            tree.iter()
                .filter(|(_, p)| p.ppid == parent && !p.zombie)
                .map(|(pid, _)| *pid),
        );
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_parse_whatever_the_command_name() {
        let line = "4312 (sh -c (x) y) S 4300 4312 4312 0 -1 4194560 100 0 0 0 0 0 0 0 20 0 1 0 98765 1000 10";
        assert_eq!(
            parse_stat(line),
            Some(Proc {
                ppid: 4300,
                pgid: 4312,
                start: 98765,
                zombie: false
            })
        );
        let zombie = "7 (a) Z 1 7 7 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 5 0 0";
        assert!(parse_stat(zombie).unwrap().zombie);
    }

    #[test]
    fn a_family_holds_the_children_of_every_thread() {
        let mut child = std::process::Command::new("sleep")
            .arg("100")
            .spawn()
            .unwrap();
        let me = std::process::id();
        let family = family(me);
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(family[0], me);
        assert!(family.contains(&child.id()), "{family:?}");
    }

    #[test]
    fn own_process_tree_is_read() {
        let tree = read_tree();
        let me = std::process::id() as i32;
        assert!(tree.contains_key(&me));
        assert_eq!(subtree(&tree, me)[0], me);
    }
}
