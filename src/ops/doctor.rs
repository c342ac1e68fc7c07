//! `reuseport-cluster doctor`: checks this host for what the launcher needs, one line each
//! (ok / warn / fail) with what to do about it; exits non-zero on any fail.

use std::net::SocketAddr;

use nix::sys::resource::{getrlimit, Resource};

use crate::config::{format_cpu_list, parse_bind_addr};
use crate::sockets::listen::{self, ListenSpec};

/// What `doctor` checks against.
pub struct Plan {
    /// `--bind` addresses.
    pub binds: Vec<String>,
    /// `--workers`.
    pub workers: Option<usize>,
    /// `--backlog`.
    pub backlog: u32,
    /// Connections the cluster should hold at once.
    pub connections: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Verdict {
    Ok,
    Warn,
    Fail,
}

/// Runs every check, prints one line each, and returns whether none failed.
pub fn run(plan: &Plan) -> bool {
    let mut worst = Verdict::Ok;
    let mut say = |v: Verdict, line: String| {
        let tag = match v {
            Verdict::Ok => "ok  ",
            Verdict::Warn => "warn",
            Verdict::Fail => "fail",
        };
        println!("{tag}  {line}");
        worst = worst.max(v);
    };

    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    let version: Vec<u32> = release
        .split(|c: char| !c.is_ascii_digit())
        .take(2)
        .filter_map(|n| n.parse().ok())
        .collect();
    let at_least = |major: u32, minor: u32| version.as_slice() >= [major, minor].as_slice();
    match (at_least(3, 9), at_least(5, 14)) {
        (true, true) => say(Verdict::Ok, format!("kernel {release}: SO_REUSEPORT groups (3.9+) and tcp_migrate_req (5.14+)")),
        (true, false) => say(Verdict::Warn, format!("kernel {release}: no tcp_migrate_req (5.14+): restarts lose nothing (socket takeover), but a scale-down or a crash-looping slot resets the connections queued on the socket it closes")),
        (false, _) => say(Verdict::Fail, format!("kernel {release}: SO_REUSEPORT load balancing needs Linux 3.9+")),
    }
    match reuseport_works() {
        Ok(()) => say(
            Verdict::Ok,
            "two SO_REUSEPORT sockets share a port here".into(),
        ),
        Err(e) => say(
            Verdict::Fail,
            format!("SO_REUSEPORT does not work here: {e}"),
        ),
    }

    match listen::migrate_req() {
        Some(v) if v == "1" => say(Verdict::Ok, "net.ipv4.tcp_migrate_req=1: connections queued on a closing socket (scale-down, crash loop) move to the other workers".into()),
        Some(v) => say(Verdict::Warn, format!("net.ipv4.tcp_migrate_req={v}: restarts lose nothing (socket takeover), but a scale-down or a crash-looping slot resets the connections queued on the socket it closes; run: sysctl -w net.ipv4.tcp_migrate_req=1 (a root master with --migrate auto does it)")),
        None => say(Verdict::Warn, "net.ipv4.tcp_migrate_req is missing (Linux 5.14+)".into()),
    }

    match crate::sockets::bpf::probe() {
        Ok(()) => {
            say(Verdict::Ok, "steering: bpf: an SK_REUSEPORT program loads and attaches here, so --steer auto uses it (connections go round robin to the workers that accept; a worker's socket drains before it stops)".into());
            match crate::sockets::bpf::moved_connections_wake_waiters() {
                Ok(true) => say(Verdict::Ok, "steering: a connection moved off a stopping socket wakes the worker it moves to, so connections that find every worker busy wait in a parking socket for the first one free".into()),
                Ok(false) => say(Verdict::Warn, "steering: this kernel does not wake a worker for a connection moved to its socket (fixed in the stable kernels of May 2026: \"tcp: call sk_data_ready() after listener migration\"), so nothing parks, and a queue moved off a stalled or stopping worker waits for the others' next new connection; update the kernel".into()),
                Err(e) => say(Verdict::Warn, format!("steering: testing whether a moved connection wakes a worker failed ({e}); nothing parks")),
            }
        }
        Err(e) => say(Verdict::Warn, format!("steering: hash: --steer auto falls back to the kernel's SO_REUSEPORT hash here ({e}); run the master as root or with CAP_BPF and CAP_NET_ADMIN on Linux 5.14+")),
    }

    match listen::somaxconn() {
        Some(max) if max >= plan.backlog => say(Verdict::Ok, format!("net.core.somaxconn={max} >= --backlog {}", plan.backlog)),
        Some(max) => say(Verdict::Warn, format!("net.core.somaxconn={max} caps --backlog {} silently; run: sysctl -w net.core.somaxconn={}", plan.backlog, plan.backlog)),
        None => say(Verdict::Warn, "net.core.somaxconn is unreadable".into()),
    }

    let workers = plan.workers.unwrap_or_else(num_cpus::get).max(1) as u64;
    let per_worker = plan.connections.div_ceil(workers) + 64;
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft >= per_worker => say(Verdict::Ok, format!("open files limit {soft} (hard {hard}) >= {per_worker} per worker for {} connections", plan.connections)),
        Ok((soft, hard)) => say(Verdict::Warn, format!("open files limit {soft} (hard {hard}) < {per_worker} per worker for {} connections; raise it (ulimit -n, LimitNOFILE=)", plan.connections)),
        Err(e) => say(Verdict::Warn, format!("open files limit unreadable: {e}")),
    }

    let cpus: Vec<usize> = core_affinity::get_core_ids()
        .map(|ids| ids.into_iter().map(|c| c.id).collect())
        .unwrap_or_default();
    let quota = cgroup_cpu_quota();
    let usable = num_cpus::get();
    let quota_text = quota.map_or("no cgroup CPU quota".into(), |q| {
        format!("cgroup quota {q:.2} CPUs")
    });
    let line = format!(
        "{} CPUs in the affinity mask ({}), {quota_text}",
        cpus.len(),
        format_cpu_list(&cpus)
    );
    match plan.workers {
        Some(w) if w > usable => say(Verdict::Warn, format!("{line}: --workers {w} is more than the {usable} CPUs usable; workers will share CPUs")),
        Some(w) => say(Verdict::Ok, format!("{line}: --workers {w} fits")),
        None => say(Verdict::Ok, format!("{line}: --workers defaults to {usable}")),
    }

    for bind in &plan.binds {
        match parse_bind_addr(bind) {
            Err(e) => say(Verdict::Fail, format!("--bind {bind}: {e}")),
            Ok(addr) => check_port(addr, &mut say),
        }
    }

    node_preload(&mut say);

    match std::env::var("NOTIFY_SOCKET") {
        Ok(s) if !s.is_empty() => say(Verdict::Ok, format!("NOTIFY_SOCKET={s}: the master will report READY/RELOADING/STOPPING to its supervisor")),
        _ => say(Verdict::Ok, "NOTIFY_SOCKET not set: fine outside systemd Type=notify units".into()),
    }
    worst != Verdict::Fail
}

/// Where Node is installed, whether the preload can be written for its workers.
fn node_preload(say: &mut impl FnMut(Verdict, String)) {
    let Ok(node) = crate::config::resolve_program("node", std::env::var_os("PATH").as_deref())
    else {
        return say(Verdict::Ok, "node: not in PATH (a Node app's workers would get the preload that maps listen(PORT) to their socket)".into());
    };
    let dir = crate::node::dir();
    match crate::node::install(&dir, None) {
        Ok(path) => say(Verdict::Ok, format!("node: {}: a Node app (node, npm start, a #!...node script) needs no change: listen(PORT) serves its worker's socket through the preload {} (--no-node-preload turns it off)", node.display(), path.display())),
        Err(e) => say(Verdict::Warn, format!("node: {}: the preload cannot be written ({e:#}), so a Node app must serve fd 3 itself (server.listen({{fd: 3}})); make {} writable by this user", node.display(), dir.display())),
    }
}

fn check_port(addr: SocketAddr, say: &mut impl FnMut(Verdict, String)) {
    match listen::open(&ListenSpec::new(addr), None) {
        Ok(_) if addr.port() != 0 && listening_on(addr.port()) => say(
            Verdict::Warn,
            format!("{addr}: SO_REUSEPORT sockets of this user already listen there (another cluster?); a new one would share its connections"),
        ),
        Ok(_) => say(Verdict::Ok, format!("{addr}: free")),
        Err((step, e)) => say(Verdict::Fail, listen::explain(step, addr, &e)),
    }
}

/// Whether a TCP socket listens on `port` (any address).
fn listening_on(port: u16) -> bool {
    crate::ops::status::proc_listeners()
        .iter()
        .any(|l| l.port == port)
}

/// Two SO_REUSEPORT listeners on one loopback port.
fn reuseport_works() -> Result<(), String> {
    let first = listen::open(
        &ListenSpec::new(SocketAddr::from(([127, 0, 0, 1], 0))),
        Some(1),
    )
    .map_err(|(step, e)| format!("{step:?}: {e}"))?;
    let addr = first
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .ok_or("no local address")?;
    listen::open(&ListenSpec::new(addr), Some(1))
        .map_err(|(step, e)| format!("second socket, {step:?}: {e}"))?;
    Ok(())
}

/// The cgroup v2 CPU quota of this process, in CPUs.
fn cgroup_cpu_quota() -> Option<f64> {
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = cgroup.lines().find_map(|l| l.strip_prefix("0::"))?;
    let max = std::fs::read_to_string(format!("/sys/fs/cgroup{path}/cpu.max"))
        .or_else(|_| std::fs::read_to_string("/sys/fs/cgroup/cpu.max"))
        .ok()?;
    let mut fields = max.split_whitespace();
    let quota: f64 = fields.next()?.parse().ok()?; // "max" fails here: no quota
    let period: f64 = fields.next()?.parse().ok()?;
    Some(quota / period)
}
