//! Worker recycling: `--max-memory`, `--max-lifetime`, `--hung-after`.
//!
//! The master looks at each serving worker now and then and, when one should go, asks the
//! supervisor for a recycle: a surge replacement of that one slot through the rolling-restart
//! machinery (the successor inherits the slot's socket, so what is queued there is served by
//! it; the old worker is stopped once the successor is ready).
//!
//! What is read, and why:
//! - **Memory** is the worker's whole process tree (the worker, and what it started: a
//!   pre-fork server's children), as the sum of each process's PSS (`/proc/PID/smaps_rollup`).
//!   RSS would count the pages a pre-forked tree shares once per process and recycle a
//!   healthy gunicorn; PSS splits shared pages between their users, so the sum is what the
//!   tree really costs. (A per-worker cgroup's memory.current would also count page cache.)
//!   Read every [`MEMORY_INTERVAL`]; a worker is recycled when two readings in a row are
//!   above the limit, so a short spike is not enough.
//! - **Lifetime**: a worker older than the limit plus its own random 0-10 % (so that slots
//!   started together do not all recycle together).
//! - **Hung**: the slot's socket has connections queued, the queue has not shrunk once, and
//!   for `--hung-after` the worker's tree used (almost) no CPU time or was stopped (SIGSTOP,
//!   a debugger). That is a worker that accepts nothing. A busy or overloaded worker still
//!   accepts (its queue shrinks now and then) or burns CPU, and is never recycled as hung:
//!   replacing it would make overload worse. A worker spinning without accepting is, by
//!   these signs, busy: it is not detected.
//!
//! Everything here is decided from [`Observation`]s, so the rules are unit-tested without
//! processes; [`observe_tree`] reads /proc.

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, Instant};

use nix::unistd::Pid;

/// How often memory is read.
pub const MEMORY_INTERVAL: Duration = Duration::from_secs(2);
/// A hung worker gets this long to exit after the stop signal (it will most likely not
/// answer it), unless `--grace` is shorter.
pub const HUNG_GRACE: Duration = Duration::from_secs(2);
/// CPU time below this share of the stall counts as none: a runtime's timer and GC threads
/// tick now and then even in a process that accepts nothing, while a worker that accepts,
/// even one that sleeps 50 ms per request, spends more than that on its requests. Read in
/// ns from each thread's schedstat, not in 10 ms clock ticks.
const IDLE_CPU_SHARE: f64 = 0.001;

/// When workers are recycled.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RecyclePolicy {
    /// `--max-memory`, bytes.
    pub max_memory: Option<u64>,
    /// `--max-lifetime`.
    pub max_lifetime: Option<Duration>,
    /// `--hung-after`.
    pub hung_after: Option<Duration>,
}

impl RecyclePolicy {
    /// Whether any rule is on.
    pub fn any(&self) -> bool {
        self.max_memory.is_some() || self.max_lifetime.is_some() || self.hung_after.is_some()
    }

    /// How often queues and CPU are sampled for `--hung-after`: five looks per period, at
    /// least every 500 ms, at most every 50 ms.
    fn hung_interval(&self) -> Option<Duration> {
        self.hung_after
            .map(|h| (h / 5).clamp(Duration::from_millis(50), Duration::from_millis(500)))
    }
}

/// Why a worker is recycled.
#[derive(Debug, Clone, PartialEq)]
pub enum Reason {
    /// Its memory stayed above the limit.
    Memory {
        /// The last reading.
        bytes: u64,
        /// `--max-memory`.
        limit: u64,
    },
    /// It is older than its lifetime.
    Lifetime {
        /// Its age.
        age: Duration,
        /// Its own lifetime (with jitter).
        limit: Duration,
    },
    /// It accepted nothing for this long with connections queued.
    Hung {
        /// How long.
        stalled: Duration,
        /// Connections queued at the last look.
        queued: u32,
        /// Whether it was stopped (SIGSTOP), rather than merely idle.
        stopped: bool,
    },
}

impl Reason {
    /// The `reason` label of `reuseport_cluster_recycles_total`.
    pub fn kind(&self) -> &'static str {
        match self {
            Reason::Memory { .. } => "memory",
            Reason::Lifetime { .. } => "lifetime",
            Reason::Hung { .. } => "hung",
        }
    }

    /// Whether the worker will most likely not answer its stop signal.
    pub fn is_hung(&self) -> bool {
        matches!(self, Reason::Hung { .. })
    }

    /// Which of several due recycles goes first (one runs at a time; the others wait for
    /// the next look): a hung worker serves nobody, memory threatens the host, and among
    /// lifetimes the one furthest past its own goes first. Without that, a slot whose
    /// replacement came due again as the last recycle ended could take every turn, and a
    /// third slot would never be recycled (slot order decided before).
    pub fn precedes(&self, other: &Reason) -> std::cmp::Ordering {
        let rank = |r: &Reason| match r {
            Reason::Hung { .. } => (0, 0.0),
            Reason::Memory { .. } => (1, 0.0),
            Reason::Lifetime { age, limit } => {
                (2, -(age.as_secs_f64() / limit.as_secs_f64().max(1e-9)))
            }
        };
        let (a, b) = (rank(self), rank(other));
        a.0.cmp(&b.0).then(a.1.total_cmp(&b.1))
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Memory { bytes, limit } => {
                write!(f, "memory {} > {}", mib(*bytes), mib(*limit))
            }
            Reason::Lifetime { age, limit } => write!(
                f,
                "up {:.2} s > its lifetime {:.2} s",
                age.as_secs_f64(),
                limit.as_secs_f64()
            ),
            Reason::Hung {
                stalled,
                queued,
                stopped,
            } => write!(
                f,
                "hung: accepted none of {queued} queued connections for {:.1} s ({})",
                stalled.as_secs_f64(),
                if *stopped { "stopped" } else { "using no CPU" }
            ),
        }
    }
}

/// `612 MiB`.
pub fn mib(bytes: u64) -> String {
    format!("{} MiB", bytes / (1024 * 1024))
}

/// One look at a worker.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Observation {
    /// Its tree's memory (PSS), when read this time.
    pub memory: Option<u64>,
    /// CPU time its tree has used, in ns.
    pub cpu_ns: u64,
    /// Whether a process of its tree is stopped (state T).
    pub stopped: bool,
    /// Connections queued on its sockets (the deepest).
    pub queued: u32,
}

/// A stall in progress: queued connections and a queue that does not shrink.
#[derive(Debug, Clone, Copy)]
struct Stall {
    since: Instant,
    cpu_ns: u64,
}

#[derive(Debug, Clone)]
struct Tracked {
    started: Instant,
    lifetime: Option<Duration>,
    above_limit: u32,
    last_memory: Option<u64>,
    last_queued: u32,
    stall: Option<Stall>,
}

/// The rules, and what they remember of each worker.
#[derive(Debug)]
pub struct Recycler {
    policy: RecyclePolicy,
    tracked: BTreeMap<Pid, Tracked>,
    next_look: Option<Instant>,
    next_memory: Option<Instant>,
}

impl Recycler {
    /// Looks start at `now` when any rule is on.
    pub fn new(policy: RecyclePolicy, now: Instant) -> Recycler {
        Recycler {
            policy,
            tracked: BTreeMap::new(),
            next_look: policy.any().then_some(now),
            next_memory: policy.max_memory.map(|_| now),
        }
    }

    /// The policy.
    pub fn policy(&self) -> RecyclePolicy {
        self.policy
    }

    /// When the master should look next (None: never).
    pub fn next_deadline(&self) -> Option<Instant> {
        self.next_look
    }

    /// Whether it is time to look; if so, plans the next look and says whether memory is
    /// to be read this time.
    pub fn begin_look(&mut self, now: Instant) -> Option<bool> {
        let due = self.next_look.filter(|t| *t <= now)?;
        let interval = self
            .policy
            .hung_interval()
            .unwrap_or(Duration::from_secs(1))
            .min(MEMORY_INTERVAL);
        // From the due time, not from now: a late wake does not shift every later look.
        self.next_look = Some((due + interval).max(now));
        let memory = self.next_memory.is_some_and(|t| t <= now);
        if memory {
            self.next_memory = Some(now + MEMORY_INTERVAL);
        }
        Some(memory)
    }

    /// Forgets workers that are gone.
    pub fn retain(&mut self, alive: impl Fn(Pid) -> bool) {
        self.tracked.retain(|pid, _| alive(*pid));
    }

    /// The last memory reading of `pid`.
    #[cfg(test)]
    pub fn memory_of(&self, pid: Pid) -> Option<u64> {
        self.tracked.get(&pid).and_then(|t| t.last_memory)
    }

    /// Takes one look at the serving worker `pid` (exec'd at `started`); a reason when it
    /// should be recycled now.
    pub fn observe(
        &mut self,
        pid: Pid,
        started: Instant,
        look: Observation,
        now: Instant,
    ) -> Option<Reason> {
        let policy = self.policy;
        let t = self.tracked.entry(pid).or_insert_with(|| Tracked {
            started,
            lifetime: policy
                .max_lifetime
                .map(|l| l.mul_f64(1.0 + 0.1 * jitter(pid, started))),
            above_limit: 0,
            last_memory: None,
            last_queued: 0,
            stall: None,
        });

        if let (Some(limit), Some(bytes)) = (policy.max_memory, look.memory) {
            t.last_memory = Some(bytes);
            t.above_limit = if bytes > limit { t.above_limit + 1 } else { 0 };
            if t.above_limit >= 2 {
                return Some(Reason::Memory { bytes, limit });
            }
        }
        if let Some(limit) = t.lifetime {
            let age = now.saturating_duration_since(t.started);
            if age > limit {
                return Some(Reason::Lifetime { age, limit });
            }
        }
        let hung_after = policy.hung_after?;
        let shrank = look.queued < t.last_queued;
        t.last_queued = look.queued;
        if look.queued == 0 || shrank {
            t.stall = None;
            return None;
        }
        let stall = *t.stall.get_or_insert(Stall {
            since: now,
            cpu_ns: look.cpu_ns,
        });
        let stalled = now.saturating_duration_since(stall.since);
        if stalled < hung_after {
            return None;
        }
        let cpu = Duration::from_nanos(look.cpu_ns.saturating_sub(stall.cpu_ns));
        let idle = cpu.as_secs_f64() < stalled.as_secs_f64() * IDLE_CPU_SHARE;
        (look.stopped || idle).then_some(Reason::Hung {
            stalled,
            queued: look.queued,
            stopped: look.stopped,
        })
    }
}

/// A number in [0, 1) that differs from worker to worker.
fn jitter(pid: Pid, started: Instant) -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_i32(pid.as_raw());
    h.write_u64(started.elapsed().as_nanos() as u64);
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// Reads one [`Observation`] of the process tree under `pid` from /proc: CPU time and
/// state of every process, and with `memory` the sum of their PSS.
pub fn observe_tree(pid: Pid, memory: bool, queued: u32) -> Observation {
    let mut look = Observation {
        queued,
        ..Observation::default()
    };
    let mut total_memory = 0;
    for p in crate::master::procs::family(pid.as_raw() as u32) {
        if let Some((state, cpu_ticks)) = stat(p) {
            look.stopped |= state == 'T' || state == 't';
            look.cpu_ns += cpu_ns(p).unwrap_or(cpu_ticks * 1_000_000_000 / ticks_per_second());
        }
        if memory {
            total_memory += pss(p).unwrap_or(0);
        }
    }
    look.memory = memory.then_some(total_memory);
    look
}

/// The memory (PSS) of the process tree under `pid`, for `status` and metrics.
pub fn tree_memory(pid: Pid) -> u64 {
    crate::master::procs::family(pid.as_raw() as u32)
        .into_iter()
        .filter_map(pss)
        .sum()
}

/// State and utime+stime (clock ticks) from /proc/PID/stat.
fn stat(pid: u32) -> Option<(char, u64)> {
    let text = crate::master::procs::read_stat(pid)?;
    let fields = crate::master::procs::stat_fields(&text)?;
    let state = fields.first()?.chars().next()?;
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((state, utime + stime))
}

/// CPU time of every thread of `pid`, in ns (/proc/PID/task/TID/schedstat, first field).
fn cpu_ns(pid: u32) -> Option<u64> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut total = 0;
    for task in tasks.flatten() {
        let text = std::fs::read_to_string(task.path().join("schedstat")).ok()?;
        total += text.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(total)
}

/// Proportional set size in bytes, from /proc/PID/smaps_rollup (Linux 4.14+), else RSS.
fn pss(pid: u32) -> Option<u64> {
    if let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")) {
        return text
            .lines()
            .find_map(|l| l.strip_prefix("Pss:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kb| kb * 1024);
    }
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

fn ticks_per_second() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .map_or(100, |t| t as u64)
}

/// Parses `--max-memory`: `512M`, `2G`, `64MiB`, `1048576` (bytes).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("{s:?}: expected a size such as 512M or 2G"))?;
    let scale: u64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" | "KB" | "KIB" => 1 << 10,
        "M" | "MB" | "MIB" => 1 << 20,
        "G" | "GB" | "GIB" => 1 << 30,
        "T" | "TB" | "TIB" => 1 << 40,
        _ => {
            return Err(format!(
                "{s:?}: unknown unit; use K, M, G or T (powers of 1024)"
            ))
        }
    };
    let bytes = number * scale as f64;
    if !(1.0..1e18).contains(&bytes) {
        return Err(format!("{s:?}: must be at least 1 byte"));
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: u64 = 1 << 20;

    fn look(queued: u32, cpu_ms: u64) -> Observation {
        Observation {
            memory: None,
            cpu_ns: cpu_ms * 1_000_000,
            stopped: false,
            queued,
        }
    }

    fn hung_only(after_ms: u64) -> (Recycler, Instant) {
        let t0 = Instant::now();
        let policy = RecyclePolicy {
            hung_after: Some(Duration::from_millis(after_ms)),
            ..RecyclePolicy::default()
        };
        (Recycler::new(policy, t0), t0)
    }

    #[test]
    fn sizes_parse_in_powers_of_1024_and_bad_ones_say_why() {
        assert_eq!(parse_size("512M"), Ok(512 * MB));
        assert_eq!(parse_size("2G"), Ok(2048 * MB));
        assert_eq!(parse_size("64MiB"), Ok(64 * MB));
        assert_eq!(parse_size("1.5G"), Ok(1536 * MB));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("lots").unwrap_err().contains("512M"));
        assert!(parse_size("5X").unwrap_err().contains("unknown unit"));
        assert!(parse_size("0").is_err());
    }

    #[test]
    fn memory_must_stay_above_the_limit_for_two_readings() {
        let t0 = Instant::now();
        let policy = RecyclePolicy {
            max_memory: Some(64 * MB),
            ..RecyclePolicy::default()
        };
        let mut r = Recycler::new(policy, t0);
        let p = Pid::from_raw(7);
        let m = |bytes| Observation {
            memory: Some(bytes),
            ..Observation::default()
        };
        assert_eq!(r.observe(p, t0, m(80 * MB), t0), None, "one spike");
        assert_eq!(r.observe(p, t0, m(30 * MB), t0), None, "back under");
        assert_eq!(r.observe(p, t0, m(70 * MB), t0), None);
        // A look without a memory reading changes nothing.
        assert_eq!(r.observe(p, t0, Observation::default(), t0), None);
        let reason = r.observe(p, t0, m(612 * MB), t0).unwrap();
        assert_eq!(reason.to_string(), "memory 612 MiB > 64 MiB");
        assert_eq!((reason.kind(), r.memory_of(p)), ("memory", Some(612 * MB)));
    }

    #[test]
    fn of_due_recycles_hung_goes_first_then_memory_then_the_longest_past_its_lifetime() {
        let secs = Duration::from_secs;
        let lifetime = |age, limit| Reason::Lifetime {
            age: secs(age),
            limit: secs(limit),
        };
        // The failure this prevents: slot 0's replacement just past its 3 s lifetime took
        // the turn from slot 2, up 8 s, because slot 0 came first.
        let mut due = [
            (0, lifetime(4, 3)),
            (1, lifetime(8, 3)),
            (
                2,
                Reason::Memory {
                    bytes: 2 * MB,
                    limit: MB,
                },
            ),
            (
                3,
                Reason::Hung {
                    stalled: secs(1),
                    queued: 4,
                    stopped: true,
                },
            ),
            (4, lifetime(7, 6)),
        ];
        due.sort_by(|a, b| a.1.precedes(&b.1));
        let order: Vec<i32> = due.iter().map(|d| d.0).collect();
        assert_eq!(order, [3, 2, 1, 0, 4]);
    }

    #[test]
    fn lifetime_has_up_to_ten_percent_of_jitter_per_worker() {
        let t0 = Instant::now();
        let policy = RecyclePolicy {
            max_lifetime: Some(Duration::from_secs(100)),
            ..RecyclePolicy::default()
        };
        let mut r = Recycler::new(policy, t0);
        let mut limits = Vec::new();
        for p in 1..=20 {
            let pid = Pid::from_raw(p);
            assert_eq!(
                r.observe(pid, t0, look(0, 0), t0 + Duration::from_secs(99)),
                None
            );
            match r.observe(pid, t0, look(0, 0), t0 + Duration::from_secs(111)) {
                Some(Reason::Lifetime { limit, .. }) => limits.push(limit),
                other => panic!("{other:?}"),
            }
        }
        assert!(limits.iter().all(|l| *l >= Duration::from_secs(100)));
        assert!(limits.iter().all(|l| *l < Duration::from_secs(110)));
        limits.dedup();
        assert!(limits.len() > 1, "workers get different lifetimes");
    }

    #[test]
    fn a_stopped_worker_with_a_queue_that_never_shrinks_is_hung() {
        let (mut r, t0) = hung_only(1000);
        let p = Pid::from_raw(7);
        let stopped = |queued| Observation {
            stopped: true,
            ..look(queued, 50)
        };
        let mut t = t0;
        for q in [3, 5, 9, 9, 12] {
            assert_eq!(r.observe(p, t0, stopped(q), t), None);
            t += Duration::from_millis(200);
        }
        let reason = r.observe(p, t0, stopped(12), t).unwrap();
        assert!(reason.is_hung());
        assert!(
            reason.to_string().contains("for 1.0 s (stopped)"),
            "{reason}"
        );
    }

    #[test]
    fn an_idle_process_that_accepts_nothing_is_hung_and_a_busy_one_is_not() {
        let (mut r, t0) = hung_only(1000);
        let (idle, busy) = (Pid::from_raw(1), Pid::from_raw(2));
        let mut t = t0;
        for i in 0..=6u64 {
            let stuck = r.observe(idle, t0, look(8, 100), t); // no CPU
            let working = r.observe(busy, t0, look(8, 100 + i * 150), t); // 75 % of a CPU
            if i < 5 {
                assert_eq!(stuck, None);
            }
            assert_eq!(working, None, "burning CPU: busy, not hung");
            t += Duration::from_millis(200);
        }
        assert!(r.observe(idle, t0, look(8, 100), t).is_some());
    }

    #[test]
    fn a_slow_worker_that_still_accepts_is_never_hung() {
        // Overloaded: the queue is never empty, but it shrinks now and then, and each request
        // sleeps 50 ms (almost no CPU).
        let (mut r, t0) = hung_only(1000);
        let p = Pid::from_raw(7);
        let mut t = t0;
        for i in 0..100u32 {
            let queued = 20 + (i % 4); // 20, 21, 22, 23, 20, …
            assert_eq!(r.observe(p, t0, look(queued, 1), t), None, "look {i}");
            t += Duration::from_millis(200);
        }
    }

    #[test]
    fn an_empty_queue_is_never_a_stall() {
        let (mut r, t0) = hung_only(100);
        let p = Pid::from_raw(7);
        let stopped = Observation {
            stopped: true,
            ..look(0, 0)
        };
        for s in 0..20 {
            assert_eq!(
                r.observe(p, t0, stopped, t0 + Duration::from_secs(s)),
                None,
                "a stopped worker nobody waits for is left alone"
            );
        }
    }

    #[test]
    fn looks_are_scheduled_from_the_loop_and_memory_less_often() {
        let (mut r, t0) = hung_only(1000);
        assert_eq!(r.next_deadline(), Some(t0));
        assert_eq!(r.begin_look(t0), Some(false), "no memory rule: no reading");
        assert_eq!(r.next_deadline(), Some(t0 + Duration::from_millis(200)));
        assert_eq!(
            r.begin_look(t0 + Duration::from_millis(100)),
            None,
            "not due"
        );
        let off = Recycler::new(RecyclePolicy::default(), t0);
        assert_eq!(
            off.next_deadline(),
            None,
            "no rule: the master never wakes for it"
        );
    }

    #[test]
    fn this_process_tree_can_be_observed() {
        let look = observe_tree(nix::unistd::getpid(), true, 0);
        assert!(look.memory.unwrap() > 0);
        assert!(!look.stopped);
        assert!(stat(std::process::id()).is_some());
    }
}
