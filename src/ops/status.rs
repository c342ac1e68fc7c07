//! What `reuseport-cluster status` shows: the cluster, and each worker with the kernel's
//! accept-queue depth of each of its listening sockets, so that a stuck or overloaded worker
//! stands out (its queue grows while the others stay near 0).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::config::Config;
use crate::master::supervisor::{RolloutResult, Supervisor};
use crate::master::worker::{ms, SlotState};
use crate::sockets::slots::{Rotation, SlotSockets};

/// The whole cluster.
#[derive(Debug, Serialize)]
pub struct ClusterStatus {
    /// The cluster's name (`--name`).
    pub name: String,
    /// The master's pid.
    pub master_pid: u32,
    /// Seconds since the master started.
    pub uptime_s: f64,
    /// The newest generation started (by a rolling restart that may have failed).
    pub generation: u64,
    /// The generations the slots' current workers run, oldest first: one, or two after a
    /// rolling restart that failed half-way.
    pub serving_generations: Vec<u64>,
    /// The last rolling restart attempted, and its result.
    pub last_rollout: Option<RolloutRecord>,
    /// Slots configured.
    pub workers_configured: usize,
    /// Slots whose worker is ready.
    pub workers_ready: usize,
    /// Why the cluster is degraded (slots crash-looping), if it is.
    pub degraded: Option<String>,
    /// Workers that died without being asked to, by cause: exit, signal, oom_killer,
    /// other_process (a SIGKILL not from the master nor the OOM killer), unknown.
    pub worker_deaths: std::collections::BTreeMap<String, u64>,
    /// The listening sockets, in fd order.
    pub binds: Vec<BindStatus>,
    /// `--ready`.
    pub ready_mode: String,
    /// net.ipv4.tcp_migrate_req and `--migrate`.
    pub migrate: String,
    /// The rolling restart under way, if any.
    pub rolling_restart: Option<RollingStatus>,
    /// Rolling restarts begun since the master started.
    pub rolling_restarts_total: u64,
    /// Rolling restarts that failed (and were stopped).
    pub rolling_restarts_failed: u64,
    /// The slot being recycled now, if any.
    pub recycling: Option<usize>,
    /// Workers recycled (--max-memory, --max-lifetime, --hung-after), by reason.
    pub recycles: std::collections::BTreeMap<String, u64>,
    /// Every live worker process (a slot has two during its rolling restart).
    pub workers: Vec<WorkerStatus>,
    /// Whether the master holds each slot's sockets for its next workers (socket takeover).
    pub socket_takeover: bool,
    /// The sockets the master holds, per slot.
    pub held_sockets: Vec<HeldSocketsStatus>,
    /// Who picks a new connection's worker: `bpf`, or `hash (why)`.
    pub steering: String,
    /// Whether Node workers get the preload that maps listen(PORT) to their socket, and why.
    pub node_preload: String,
    /// Under bpf steering, every entry of the program's socket map (first bind), with the
    /// cookie of the socket the master holds for that slot: equal when the map is right.
    pub steering_map: Vec<MapEntryStatus>,
    /// Under bpf steering: stalled workers' accept queues moved to the others so far.
    pub queues_moved: u64,
    /// The connections those moves took.
    pub connections_moved: u64,
    /// The slowest listen(2) of those moves, in ms: it grows with the sockets bound to the
    /// port, and the moves are spaced by it (see sockets/slots.rs, EVACUATION_LISTEN_SHARE).
    pub queue_move_listen_max_ms: f64,
    /// Under bpf steering: whether the master keeps a parking socket, where new connections
    /// wait while every worker is behind or at its cap.
    pub parking: bool,
    /// Connections waiting in it now.
    pub parked: u32,
    /// Times parked connections were handed on to workers with room, and how many.
    pub parked_handed_on: u64,
    pub parked_connections_handed_on: u64,
    /// Parking sockets closed after waiting 100 ms for handshakes that never completed (SYNs
    /// dropped, clients gone).
    pub parking_sockets_closed_unfinished: u64,
}

/// One entry of the steering program's socket map.
#[derive(Debug, Serialize)]
pub struct MapEntryStatus {
    /// The slot (the map's key).
    pub slot: usize,
    /// The socket cookie in the map.
    pub in_map: Option<u64>,
    /// The cookie of the socket the master holds for the slot.
    pub held: Option<u64>,
}

/// The sockets the master holds for one slot: they outlive its workers.
#[derive(Debug, Serialize)]
pub struct HeldSocketsStatus {
    /// The slot.
    pub slot: usize,
    /// Each socket's inode, in fd order (fd 3, 4, …).
    pub inodes: Vec<u64>,
    /// Seconds since the master took hold of them.
    pub held_s: f64,
    /// When that was, in seconds since the Unix epoch.
    pub held_since_unix_s: u64,
    /// Workers of the slot started with these sockets so far.
    pub workers_served: u32,
}

/// One `--bind`.
#[derive(Debug, Serialize)]
pub struct BindStatus {
    /// Its fd in every worker.
    pub fd: i32,
    /// Its LISTEN_FDNAMES name.
    pub name: String,
    /// Its address.
    pub addr: String,
}

/// A rolling restart in progress.
#[derive(Debug, Serialize)]
pub struct RollingStatus {
    /// The generation it brings in.
    pub generation: u64,
    /// Slots replaced so far.
    pub done: usize,
    /// Slots in the pass.
    pub total: usize,
}

/// The last rolling restart attempted.
#[derive(Debug, Serialize)]
pub struct RolloutRecord {
    /// The generation it brings (or brought) in.
    pub generation: u64,
    /// under way, done, rolled back or abandoned.
    pub result: &'static str,
    /// Why it was rolled back.
    pub reason: Option<String>,
    /// Seconds since it began.
    pub started_s_ago: f64,
    /// Seconds it took, once over.
    pub took_s: Option<f64>,
}

/// One worker process, or a slot waiting to restart its crashed worker (state `backoff`,
/// no pid).
#[derive(Debug, Serialize)]
pub struct WorkerStatus {
    /// Its slot.
    pub slot: usize,
    /// Its pid; none for a slot in backoff.
    pub pid: Option<i32>,
    /// The CPU it is pinned to.
    pub cpu: Option<usize>,
    /// Its generation.
    pub generation: u64,
    /// starting, ready, stopping, or backoff (crashed; restarts after `next_start_in_s`).
    pub state: &'static str,
    /// Whether it is its slot's current worker (not a surge's new one, nor an old one).
    pub serving: bool,
    /// Seconds since exec.
    pub uptime_s: f64,
    /// Restarts of its slot after crashes.
    pub restarts: u32,
    /// How the slot's previous worker ended.
    pub last_exit: Option<String>,
    /// Who killed it, for a SIGKILL the master did not send (`killed by the OOM killer`).
    pub last_exit_cause: Option<String>,
    /// For a slot in backoff: seconds until its next worker starts.
    pub next_start_in_s: Option<f64>,
    /// The app's last sd_notify STATUS=.
    pub app_status: Option<String>,
    /// Memory of its whole process tree (the sum of PSS), bytes.
    pub memory_bytes: u64,
    /// Why its slot's previous worker was recycled, if one was.
    pub last_recycle: Option<String>,
    /// Accept queue of each listening socket.
    pub queues: Vec<QueueStatus>,
    /// Under bpf steering: `in` when new connections may go to it, else `out: why`.
    pub rotation: Option<String>,
}

/// The accept queue of one listening socket.
#[derive(Debug, Serialize)]
pub struct QueueStatus {
    /// The socket's fd in the worker.
    pub fd: i32,
    /// Connections waiting to be accepted.
    pub depth: u32,
    /// The queue's limit (the effective backlog).
    pub backlog: u32,
}

impl ClusterStatus {
    /// Gathers the status now.
    pub fn collect(
        config: &Config,
        supervisor: &Supervisor,
        sockets: &SlotSockets,
        name: &str,
        started: Instant,
        now: Instant,
    ) -> ClusterStatus {
        let queues = accept_queues();
        let mut workers: Vec<WorkerStatus> = supervisor
            .workers()
            .map(|w| {
                let slot = supervisor.slots().get(w.slot);
                WorkerStatus {
                    slot: w.slot,
                    pid: Some(w.pid.as_raw()),
                    cpu: w.cpu,
                    generation: w.generation,
                    state: w.state.name(),
                    serving: slot.and_then(|s| s.pid()) == Some(w.pid),
                    uptime_s: w.uptime(now).as_secs_f64(),
                    restarts: slot.map_or(0, |s| s.restarts),
                    last_exit: slot.and_then(|s| s.last_exit).map(|e| e.to_string()),
                    last_exit_cause: slot.and_then(|s| s.last_cause.clone()),
                    next_start_in_s: None,
                    app_status: w.status.clone(),
                    memory_bytes: crate::master::recycle::tree_memory(w.pid),
                    last_recycle: slot.and_then(|s| s.last_recycle.clone()),
                    rotation: sockets.rotation(w.slot, w.pid, now).map(|r| match r {
                        Rotation::In => "in".to_string(),
                        Rotation::Out(why) => format!("out: {why}"),
                    }),
                    queues: w
                        .sockets
                        .iter()
                        .enumerate()
                        .map(|(i, inode)| {
                            let (depth, backlog) = queues.get(inode).copied().unwrap_or_default();
                            QueueStatus {
                                fd: 3 + i as i32,
                                depth,
                                backlog,
                            }
                        })
                        .collect(),
                }
            })
            .collect();
        // A crash-looping slot has no process most of the time; it must not vanish.
        for slot in supervisor.slots() {
            if let SlotState::Waiting { at } = slot.state {
                workers.push(WorkerStatus {
                    slot: slot.index,
                    pid: None,
                    cpu: slot.cpu,
                    generation: slot.generation,
                    state: "backoff",
                    serving: false,
                    uptime_s: 0.0,
                    restarts: slot.restarts,
                    last_exit: slot.last_exit.map(|e| e.to_string()),
                    last_exit_cause: slot.last_cause.clone(),
                    next_start_in_s: Some(at.saturating_duration_since(now).as_secs_f64()),
                    memory_bytes: 0,
                    last_recycle: slot.last_recycle.clone(),
                    app_status: None,
                    queues: Vec::new(),
                    rotation: None,
                });
            }
        }
        workers.sort_by_key(|w| (w.slot, w.generation, w.pid));
        let workers_ready = supervisor.ready_count();
        let (rolling_restarts_total, rolling_restarts_failed) = supervisor.rolling_counts();
        let evacuations = sockets.evacuations();
        let parking = sockets.parking();
        ClusterStatus {
            name: name.to_string(),
            master_pid: std::process::id(),
            uptime_s: now.saturating_duration_since(started).as_secs_f64(),
            generation: supervisor.generation(),
            serving_generations: supervisor.serving_generations(),
            last_rollout: supervisor.last_rollout().map(|r| RolloutRecord {
                generation: r.generation,
                result: r.result.name(),
                reason: match &r.result {
                    RolloutResult::RolledBack { why, .. } => Some(why.clone()),
                    _ => None,
                },
                started_s_ago: now.saturating_duration_since(r.started).as_secs_f64(),
                took_s: r
                    .result
                    .ended()
                    .map(|end| end.saturating_duration_since(r.started).as_secs_f64()),
            }),
            workers_configured: supervisor.slots().len(),
            workers_ready,
            degraded: supervisor.degraded(),
            worker_deaths: supervisor
                .deaths()
                .iter()
                .map(|(k, v)| (k.to_string(), *v))
                .collect(),
            binds: config
                .binds
                .iter()
                .enumerate()
                .map(|(i, b)| BindStatus {
                    fd: 3 + i as i32,
                    name: b.name.clone(),
                    addr: b.addr.to_string(),
                })
                .collect(),
            ready_mode: config.ready.to_string(),
            migrate: migrate_setting(config),
            rolling_restart: supervisor
                .rolling()
                .map(|(generation, done, total)| RollingStatus {
                    generation,
                    done,
                    total,
                }),
            rolling_restarts_total,
            rolling_restarts_failed,
            recycling: supervisor.recycling(),
            recycles: supervisor
                .recycles()
                .iter()
                .map(|(k, v)| (k.to_string(), *v))
                .collect(),
            workers,
            socket_takeover: sockets.enabled(),
            steering: sockets.mode(),
            node_preload: config.node.to_string(),
            queues_moved: evacuations.moves,
            connections_moved: evacuations.moved,
            queue_move_listen_max_ms: evacuations.slowest_listen.as_secs_f64() * 1000.0,
            parking: parking.on,
            parked: parking.parked,
            parked_handed_on: parking.hand_ons,
            parked_connections_handed_on: parking.handed_on,
            parking_sockets_closed_unfinished: parking.closed_unfinished,
            steering_map: {
                let size = supervisor.slots().len();
                let max = sockets.slots().last().map_or(0, |s| s + 1).max(size) + 8;
                sockets
                    .mapped_slots(max)
                    .into_iter()
                    .chain(sockets.slots())
                    .collect::<std::collections::BTreeSet<usize>>()
                    .into_iter()
                    .filter_map(|slot| {
                        let (in_map, held) = sockets.map_entry(slot)?;
                        Some(MapEntryStatus { slot, in_map, held })
                    })
                    .collect()
            },
            held_sockets: sockets
                .slots()
                .into_iter()
                .filter_map(|slot| {
                    let v = sockets.view(slot, now)?;
                    Some(HeldSocketsStatus {
                        slot,
                        inodes: v.inodes,
                        held_s: v.held_for.as_secs_f64(),
                        held_since_unix_s: v.since_unix_s,
                        workers_served: v.workers,
                    })
                })
                .collect(),
        }
    }

    /// The text `status` prints.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let binds: Vec<String> = self
            .binds
            .iter()
            .map(|b| format!("fd {} {}={}", b.fd, b.name, b.addr))
            .collect();
        let serving: Vec<String> = self
            .serving_generations
            .iter()
            .map(|g| g.to_string())
            .collect();
        let serving = match serving.len() {
            0 => "no generation serving".to_string(),
            1 => format!("generation {} serving", serving[0]),
            _ => format!("generations {} serving", serving.join(" and ")),
        };
        let _ = writeln!(
            out,
            "cluster {}: master pid {}, up {}, {serving}, {}/{} workers ready",
            self.name,
            self.master_pid,
            ms(Duration::from_secs_f64(self.uptime_s)),
            self.workers_ready,
            self.workers_configured
        );
        match &self.degraded {
            Some(why) => {
                let _ = writeln!(out, "health: degraded: {why}");
            }
            None => out.push_str("health: ok\n"),
        }
        if !self.worker_deaths.is_empty() {
            let deaths: Vec<String> = self
                .worker_deaths
                .iter()
                .map(|(cause, n)| format!("{cause} {n}"))
                .collect();
            let _ = writeln!(out, "worker deaths: {}", deaths.join(", "));
        }
        let _ = writeln!(out, "sockets: {}", binds.join(", "));
        let _ = writeln!(out, "ready: {}; migrate: {}", self.ready_mode, self.migrate);
        let mut steering = self.steering.clone();
        if self.queues_moved > 0 {
            let _ = write!(
                steering,
                "; stalled workers' queues moved: {} ({} connections; slowest listen {:.2} ms)",
                self.queues_moved, self.connections_moved, self.queue_move_listen_max_ms
            );
        }
        if self.parking {
            let _ = write!(
                steering,
                "; parked now: {}, handed on: {} ({} connections)",
                self.parked, self.parked_handed_on, self.parked_connections_handed_on
            );
            if self.parking_sockets_closed_unfinished > 0 {
                let _ = write!(
                    steering,
                    ", parking sockets closed with handshakes unfinished: {}",
                    self.parking_sockets_closed_unfinished
                );
            }
        }
        let _ = writeln!(out, "steering: {steering}");
        if !self
            .node_preload
            .starts_with("off (the program is not Node")
        {
            let _ = writeln!(out, "node preload: {}", self.node_preload);
        }
        let held: Vec<String> = self
            .held_sockets
            .iter()
            .map(|h| {
                let inodes: Vec<String> = h.inodes.iter().map(|i| i.to_string()).collect();
                format!(
                    "slot {} inode {} for {} ({} workers)",
                    h.slot,
                    inodes.join("+"),
                    ms(Duration::from_secs_f64(h.held_s)),
                    h.workers_served
                )
            })
            .collect();
        match (self.socket_takeover, held.is_empty()) {
            (false, _) => out.push_str("held sockets: takeover off\n"),
            (true, true) => out.push_str("held sockets: none\n"),
            (true, false) => {
                let _ = writeln!(out, "held sockets: {}", held.join(", "));
            }
        }
        match &self.rolling_restart {
            Some(r) => {
                let _ = writeln!(
                    out,
                    "rolling restart: to generation {}, {} of {} slots done",
                    r.generation, r.done, r.total
                );
            }
            None => out.push_str("rolling restart: none under way\n"),
        }
        match &self.last_rollout {
            Some(r) => {
                let ago = ms(Duration::from_secs_f64(r.started_s_ago));
                let took = r
                    .took_s
                    .map(|t| format!(" in {}", ms(Duration::from_secs_f64(t))))
                    .unwrap_or_default();
                let why = r
                    .reason
                    .as_deref()
                    .map(|w| format!(": {w}"))
                    .unwrap_or_default();
                let _ = writeln!(
                    out,
                    "last rollout: to generation {}, begun {ago} ago, {}{took}{why}",
                    r.generation, r.result
                );
            }
            None => out.push_str("last rollout: none\n"),
        }
        if let Some(slot) = self.recycling {
            let _ = writeln!(out, "recycle: slot {slot} under way");
        }
        let _ = writeln!(
            out,
            "{:<5} {:<8} {:<4} {:<4} {:<9} {:<11} {:<8} {:<18} {:<16} {:<8} {:<10} STATUS",
            "SLOT",
            "PID",
            "CPU",
            "GEN",
            "STATE",
            "UPTIME",
            "RESTARTS",
            "LAST EXIT",
            "QUEUE",
            "MEMORY",
            "ROTATION"
        );
        let uptime = |w: &WorkerStatus| match w.next_start_in_s {
            Some(next) => format!("next {}", ms(Duration::from_secs_f64(next))),
            None => ms(Duration::from_secs_f64(w.uptime_s)),
        };
        for w in &self.workers {
            let queues: Vec<String> = w
                .queues
                .iter()
                .map(|q| format!("{}/{}", q.depth, q.backlog))
                .collect();
            let _ = writeln!(
                out,
                "{:<5} {:<8} {:<4} {:<4} {:<9} {:<11} {:<8} {:<18} {:<16} {:<8} {:<10} {}",
                w.slot,
                w.pid.map_or("-".into(), |p| p.to_string()),
                w.cpu.map_or("-".into(), |c| c.to_string()),
                w.generation,
                w.state,
                uptime(w),
                w.restarts,
                w.last_exit.as_deref().unwrap_or("-"),
                queues.join(" "),
                match w.pid {
                    Some(_) => crate::master::recycle::mib(w.memory_bytes).replace(" MiB", "M"),
                    None => "-".into(),
                },
                w.rotation.as_deref().unwrap_or("-"),
                w.app_status.as_deref().unwrap_or("-")
            );
            if let Some(why) = w.last_recycle.as_deref().filter(|_| w.serving) {
                let _ = writeln!(out, "      slot {} last recycled: {why}", w.slot);
            }
            if let Some(cause) = w
                .last_exit_cause
                .as_deref()
                .filter(|_| w.pid.is_none() || w.serving)
            {
                let _ = writeln!(out, "      slot {} last exit: {cause}", w.slot);
            }
        }
        out
    }
}

fn migrate_setting(config: &Config) -> String {
    let value = crate::sockets::listen::migrate_req().unwrap_or_else(|| "unsupported".into());
    format!(
        "net.ipv4.tcp_migrate_req={value} (--migrate {:?})",
        config.migrate
    )
    .to_lowercase()
}

/// Accept-queue depth and limit of every listening TCP socket, by inode: from the kernel's
/// sock_diag (what `ss -lnt` shows as Recv-Q/Send-Q), else depth only from /proc/net/tcp.
pub fn accept_queues() -> HashMap<u64, (u32, u32)> {
    let mut queues = HashMap::new();
    match crate::sockets::diag::listeners() {
        Ok(found) => queues.extend(found.iter().map(|s| (s.inode, (s.rqueue, s.wqueue)))),
        Err(_) => proc_net_tcp_listeners(&mut queues),
    }
    queues
}

/// Depths of listening sockets from /proc/net/tcp{,6} (rx_queue); no limits there.
fn proc_net_tcp_listeners(queues: &mut HashMap<u64, (u32, u32)>) {
    for l in proc_listeners() {
        queues.insert(l.inode, (l.depth, 0));
    }
}

/// A TCP socket in LISTEN state, as /proc/net/tcp{,6} lists it.
pub struct ProcListener {
    /// Its local address.
    pub ip: std::net::IpAddr,
    /// Its local port.
    pub port: u16,
    /// Its inode.
    pub inode: u64,
    /// Its accept queue (rx_queue).
    pub depth: u32,
}

/// Every listening TCP socket of this network namespace, from /proc/net/tcp{,6}.
pub fn proc_listeners() -> Vec<ProcListener> {
    let mut found = Vec::new();
    for file in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        for line in text.lines().skip(1) {
            // sl local_address rem_address st tx_queue:rx_queue tr retrnsmt uid timeout inode
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 || f[3] != "0A" {
                continue;
            }
            let (ip, port) = match f[1].rsplit_once(':') {
                Some((ip, port)) => (parse_proc_ip(ip), u16::from_str_radix(port, 16).ok()),
                None => (None, None),
            };
            let depth = f[4]
                .split_once(':')
                .and_then(|(_, rx)| u32::from_str_radix(rx, 16).ok());
            if let (Some(ip), Some(port), Some(depth), Ok(inode)) =
                (ip, port, depth, f[9].parse::<u64>())
            {
                found.push(ProcListener {
                    ip,
                    port,
                    inode,
                    depth,
                });
            }
        }
    }
    found
}

/// An address as /proc/net/tcp{,6} prints it: the in-memory (network order) words of
/// the address, each printed as a native-endian 32-bit hex number.
fn parse_proc_ip(hex: &str) -> Option<std::net::IpAddr> {
    let word = |i: usize| -> Option<[u8; 4]> {
        let w = u32::from_str_radix(hex.get(i * 8..i * 8 + 8)?, 16).ok()?;
        Some(w.to_ne_bytes())
    };
    match hex.len() {
        8 => Some(std::net::Ipv4Addr::from(word(0)?).into()),
        32 => {
            let mut bytes = [0u8; 16];
            for i in 0..4 {
                bytes[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            Some(std::net::Ipv6Addr::from(bytes).into())
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn a_listeners_queue_grows_with_unaccepted_connections() {
        let socket = crate::sockets::listen::open(
            &crate::sockets::listen::ListenSpec::new("127.0.0.1:0".parse().unwrap()),
            Some(64),
        )
        .unwrap();
        let addr = socket.local_addr().unwrap().as_socket().unwrap();
        let link = std::fs::read_link(format!("/proc/self/fd/{}", socket.as_raw_fd())).unwrap();
        let inode: u64 = link.to_str().unwrap()[8..]
            .trim_end_matches(']')
            .parse()
            .unwrap();
        assert_eq!(accept_queues().get(&inode), Some(&(0, 64)));
        let _clients: Vec<_> = (0..3)
            .map(|_| std::net::TcpStream::connect(addr).unwrap())
            .collect();
        assert_eq!(accept_queues().get(&inode), Some(&(3, 64)));
        let mut from_proc = HashMap::new();
        proc_net_tcp_listeners(&mut from_proc);
        assert_eq!(
            from_proc.get(&inode),
            Some(&(3, 0)),
            "the fallback sees the depth"
        );
    }
}
