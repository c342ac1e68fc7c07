//! What killed a worker: [`Cause`], and [`OomWitness`], which tells an OOM kill from
//! another SIGKILL the master did not send.
//!
//! A SIGKILL carries no sender the master could read (waitid reports only the signal), so
//! the kernel's own records decide, read at the death (the worker is still a zombie):
//! - `/dev/kmsg`: the OOM killer's line names its victim (`Killed process 4312 (node)`);
//!   read where the master may (root, or `kernel.dmesg_restrict=0`), from its start on;
//! - the `oom_kill` counter of the worker's memory cgroup, noted when it became ready (a
//!   zombie is out of its cgroup already): `memory.events` (cgroup v2, which also counts the
//!   cgroups below) or `memory.oom_control` (v1), and the same for the master's cgroup;
//! - `/proc/vmstat` `oom_kill`, the host's count, moving since the last death or start.
//!
//! One of these moving with the death makes it the OOM killer's; none moving, another
//! process (kill -9, a supervisor, a cgroup kill); none readable, unknown. The counters
//! are host or cgroup wide: an OOM kill of another process between two looks is counted
//! with the next SIGKILL, which is why the victim's pid in the kernel's line comes first.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

use nix::unistd::Pid;

use crate::master::worker::ExitReason;

/// Why a worker ended when the master had not asked it to: the `cause` label of
/// `reuseport_cluster_worker_deaths_total`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cause {
    /// It exited by itself, with a status.
    Exit,
    /// A signal other than SIGKILL (SIGSEGV, SIGABRT, a stray SIGTERM, …).
    Signal,
    /// SIGKILL by the kernel's OOM killer; its log line, where readable.
    OomKiller {
        /// The kernel's line about it (`Memory cgroup out of memory: Killed process …`).
        kernel: Option<String>,
    },
    /// SIGKILL by another process: not the master, and no OOM counter moved.
    OtherProcess,
    /// SIGKILL, not the master's, and no OOM record could be read to tell more.
    Unknown,
}

impl Cause {
    /// The cause of an exit the master did not ask for: what `killer` found for a SIGKILL.
    pub fn of(reason: ExitReason, killer: Option<Cause>) -> Cause {
        match (reason, killer) {
            (ExitReason::Code(_), _) => Cause::Exit,
            (ExitReason::Signal(nix::libc::SIGKILL), Some(k)) => k,
            (ExitReason::Signal(nix::libc::SIGKILL), None) => Cause::Unknown,
            (ExitReason::Signal(_), _) => Cause::Signal,
        }
    }

    /// Every label, in the order metrics list them.
    pub const LABELS: [&'static str; 5] =
        ["exit", "signal", "oom_killer", "other_process", "unknown"];

    /// Its metric label.
    pub fn label(&self) -> &'static str {
        match self {
            Cause::Exit => "exit",
            Cause::Signal => "signal",
            Cause::OomKiller { .. } => "oom_killer",
            Cause::OtherProcess => "other_process",
            Cause::Unknown => "unknown",
        }
    }

    /// What to say about a SIGKILL, if anything (an exit status or another signal says
    /// enough by itself).
    pub fn describe(&self) -> Option<String> {
        match self {
            Cause::Exit | Cause::Signal => None,
            Cause::OomKiller { kernel: None } => Some("killed by the OOM killer".into()),
            Cause::OomKiller { kernel: Some(line) } => {
                Some(format!("killed by the OOM killer (kernel: {line})"))
            }
            Cause::OtherProcess => {
                Some("killed by another process (not the master, not the OOM killer)".into())
            }
            Cause::Unknown => {
                Some("killed by SIGKILL from outside the master, by whom unknown (no OOM record readable)".into())
            }
        }
    }
}

/// The kernel's records of OOM kills, and where they stood at the last look.
#[derive(Debug)]
pub struct OomWitness {
    /// /dev/kmsg, non-blocking, read from where it stood when the master started.
    kmsg: Option<File>,
    /// Victims named by the kernel's lines read so far and not yet claimed, with the line.
    victims: VecDeque<(i32, String)>,
    /// /proc/vmstat (another file in the tests).
    vmstat_file: PathBuf,
    /// Its oom_kill at the last look.
    vmstat: Option<u64>,
    /// Each memory cgroup counter file looked at, with its value at the last look.
    counters: HashMap<PathBuf, u64>,
    /// The counter file of each worker's memory cgroup (if readable), noted when it became
    /// ready.
    workers: HashMap<Pid, Option<PathBuf>>,
}

/// Kernel lines about OOM victims kept until a death claims them.
const VICTIMS_KEPT: usize = 64;

impl OomWitness {
    /// Opens the records the master may read, and notes where they stand.
    pub fn new() -> OomWitness {
        let kmsg = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_NONBLOCK)
            .open("/dev/kmsg")
            .ok()
            .and_then(|mut f| f.seek(SeekFrom::End(0)).ok().map(|_| f));
        let mut witness = OomWitness::reading(kmsg, PathBuf::from("/proc/vmstat"));
        if let Some(own) = memory_cgroup_counter("self") {
            witness.look(&own);
        }
        witness
    }

    /// A witness reading `kmsg` and the host's OOM kills from `vmstat_file`.
    fn reading(kmsg: Option<File>, vmstat_file: PathBuf) -> OomWitness {
        OomWitness {
            kmsg,
            victims: VecDeque::new(),
            vmstat: oom_kills(&vmstat_file),
            vmstat_file,
            counters: HashMap::new(),
            workers: HashMap::new(),
        }
    }

    /// Whether anything can be read to attribute a SIGKILL.
    pub fn can_tell(&self) -> bool {
        self.kmsg.is_some() || self.vmstat.is_some() || !self.counters.is_empty()
    }

    /// Notes the memory cgroup of each ready worker not seen yet, and where its counters
    /// stand (a worker may have moved itself to a cgroup of its own before it was ready).
    pub fn note_ready(&mut self, ready: impl Iterator<Item = Pid>) {
        for pid in ready {
            if self.workers.contains_key(&pid) {
                continue;
            }
            let file = memory_cgroup_counter(&pid.to_string());
            if let Some(file) = &file {
                self.look(file);
            }
            self.workers.insert(pid, file);
        }
    }

    /// Forgets worker `pid` (it ended in a way that needs no attribution).
    pub fn forget(&mut self, pid: Pid) {
        self.workers.remove(&pid);
    }

    /// Who sent the SIGKILL that ended worker `pid`, which the master did not send.
    pub fn sigkill_cause(&mut self, pid: Pid) -> Cause {
        self.read_kmsg();
        let named = self
            .victims
            .iter()
            .position(|(victim, _)| *victim == pid.as_raw())
            .and_then(|i| self.victims.remove(i));
        let worker_cgroup = self.workers.remove(&pid).flatten();
        // Every counter is looked at (and its new value kept) whatever decides.
        let mut moved = false;
        let files: Vec<PathBuf> = self.counters.keys().cloned().chain(worker_cgroup).collect();
        for file in files {
            moved |= self.look(&file);
        }
        let now = oom_kills(&self.vmstat_file);
        moved |= matches!((self.vmstat, now), (Some(before), Some(now)) if now > before);
        if now.is_some() {
            self.vmstat = now;
        }
        match (named, moved) {
            (Some((_, line)), _) => Cause::OomKiller { kernel: Some(line) },
            (None, true) => Cause::OomKiller { kernel: None },
            (None, false) if self.can_tell() => Cause::OtherProcess,
            (None, false) => Cause::Unknown,
        }
    }

    /// Reads `file`'s oom_kill count; whether it moved since the last look.
    fn look(&mut self, file: &PathBuf) -> bool {
        let Some(now) = oom_kills(file) else {
            return false;
        };
        let before = self.counters.insert(file.clone(), now);
        before.is_some_and(|b| now > b)
    }

    /// Takes every kernel record written since the last read; keeps the OOM killer's.
    fn read_kmsg(&mut self) {
        let Some(kmsg) = self.kmsg.as_mut() else {
            return;
        };
        let mut record = [0u8; 8192];
        loop {
            match kmsg.read(&mut record) {
                Ok(0) => break,
                Ok(n) => {
                    let text = String::from_utf8_lossy(&record[..n]);
                    if let Some(victim) = oom_victim(&text) {
                        if self.victims.len() == VICTIMS_KEPT {
                            self.victims.pop_front();
                        }
                        self.victims.push_back(victim);
                    }
                }
                // EPIPE: records were overwritten before we read them; the read goes on
                // from the oldest one left.
                Err(e) if e.raw_os_error() == Some(nix::libc::EPIPE) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => break, // EAGAIN: nothing more
            }
        }
    }
}

/// The victim of one /dev/kmsg record, if it is the OOM killer's: its pid and the line
/// (`6,1234,5678,-;Memory cgroup out of memory: Killed process 4312 (node) total-vm:…`).
fn oom_victim(record: &str) -> Option<(i32, String)> {
    let message = record.split_once(';').map_or(record, |(_, m)| m);
    let message = message.lines().next()?.trim();
    let (_, after) = message.split_once("Killed process ")?;
    let pid = after.split_whitespace().next()?.parse().ok()?;
    // The line goes on with memory figures: the first of them is enough for the log.
    let short = match message.find(", anon-rss:") {
        Some(end) => &message[..end],
        None => message,
    };
    Some((pid, short.to_string()))
}

/// The file that counts OOM kills in the memory cgroup of `/proc/<who>`: cgroup v2's
/// memory.events, or v1's memory.oom_control; None when neither can be read.
fn memory_cgroup_counter(who: &str) -> Option<PathBuf> {
    let text = std::fs::read_to_string(format!("/proc/{who}/cgroup")).ok()?;
    let mut candidates = Vec::new();
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (id, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let path = path.trim_start_matches('/');
        if id == "0" && controllers.is_empty() {
            for root in ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"] {
                candidates.push(PathBuf::from(root).join(path).join("memory.events"));
            }
        } else if controllers.split(',').any(|c| c == "memory") {
            candidates.push(
                PathBuf::from("/sys/fs/cgroup/memory")
                    .join(path)
                    .join("memory.oom_control"),
            );
        }
    }
    candidates.into_iter().find(|f| oom_kills(f).is_some())
}

/// The oom_kill count of /proc/vmstat (the host's, Linux 4.13+), of a memory.events or of
/// a memory.oom_control file.
fn oom_kills(file: &PathBuf) -> Option<u64> {
    counter(&std::fs::read_to_string(file).ok()?, "oom_kill")
}

/// The value of `key` in a `key value` per line file.
fn counter(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oom_killers_line_names_its_victim() {
        let record = "3,1834,2261554188,-;Memory cgroup out of memory: Killed process 4312 \
                      (python3) total-vm:1268756kB, anon-rss:1048576kB, file-rss:0kB, UID:0\n";
        assert_eq!(
            oom_victim(record),
            Some((
                4312,
                "Memory cgroup out of memory: Killed process 4312 (python3) total-vm:1268756kB"
                    .into()
            ))
        );
        let global = "3,9,10,-;Out of memory: Killed process 77 (node) total-vm:1kB, anon-rss:1kB";
        assert_eq!(oom_victim(global).map(|v| v.0), Some(77));
        // Control: other kernel lines, and the OOM killer's other lines, name no victim.
        assert_eq!(
            oom_victim("6,1,2,-;EXT4-fs (vda): mounted filesystem"),
            None
        );
        assert_eq!(
            oom_victim("4,5,6,-;python3 invoked oom-killer: gfp_mask=0xcc0(GFP_KERNEL)"),
            None
        );
    }

    #[test]
    fn counters_are_read_from_v1_and_v2_files_and_vmstat() {
        let v2 = "low 0\nhigh 0\nmax 12\noom 3\noom_kill 2\noom_group_kill 0\n";
        assert_eq!(counter(v2, "oom_kill"), Some(2));
        assert_eq!(counter(v2, "oom"), Some(3), "not oom_kill's prefix");
        let v1 = "oom_kill_disable 0\nunder_oom 0\noom_kill 5\n";
        assert_eq!(counter(v1, "oom_kill"), Some(5));
        assert_eq!(counter("nr_free_pages 1\n", "oom_kill"), None);
    }

    /// A SIGKILL is the OOM killer's when a counter moved with it, another process's when
    /// none did, unknown when none can be read; each death is judged against the last.
    #[test]
    fn a_counter_moving_with_the_death_makes_it_the_oom_killers() {
        let dir = std::env::temp_dir().join(format!("rc-deaths-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (vmstat, cgroup) = (dir.join("vmstat"), dir.join("memory.events"));
        std::fs::write(&vmstat, "pgfault 9\noom_kill 3\n").unwrap();
        std::fs::write(&cgroup, "oom 1\noom_kill 1\n").unwrap();
        let mut w = OomWitness::reading(None, vmstat.clone());
        let (a, b, c) = (Pid::from_raw(10), Pid::from_raw(11), Pid::from_raw(12));
        w.look(&cgroup);
        w.workers.insert(a, Some(cgroup.clone()));
        w.workers.insert(b, Some(cgroup.clone()));
        // Control: nothing moved: someone else's kill -9.
        assert_eq!(w.sigkill_cause(a), Cause::OtherProcess);
        // The worker's cgroup counted an OOM kill: the OOM killer's.
        std::fs::write(&cgroup, "oom 2\noom_kill 2\n").unwrap();
        assert_eq!(w.sigkill_cause(b), Cause::OomKiller { kernel: None });
        // The host's count moving is enough too; and the next death starts from there.
        std::fs::write(&vmstat, "pgfault 9\noom_kill 4\n").unwrap();
        assert_eq!(w.sigkill_cause(c), Cause::OomKiller { kernel: None });
        assert_eq!(w.sigkill_cause(c), Cause::OtherProcess);
        // Nothing readable: unknown.
        let mut blind = OomWitness::reading(None, dir.join("absent"));
        assert_eq!(blind.sigkill_cause(a), Cause::Unknown);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_sigkill_is_attributed_only_when_the_master_did_not_send_it() {
        let kill = ExitReason::Signal(nix::libc::SIGKILL);
        assert_eq!(Cause::of(ExitReason::Code(1), None), Cause::Exit);
        assert_eq!(
            Cause::of(ExitReason::Signal(nix::libc::SIGSEGV), None),
            Cause::Signal
        );
        assert_eq!(
            Cause::of(kill, Some(Cause::OtherProcess)),
            Cause::OtherProcess
        );
        assert_eq!(Cause::of(kill, None), Cause::Unknown);
        assert_eq!(
            Cause::OomKiller { kernel: None }.describe().as_deref(),
            Some("killed by the OOM killer")
        );
        assert_eq!(Cause::Exit.describe(), None);
    }
}
