//! Steering (issue 13): the scenarios where the kernel's SO_REUSEPORT hash is weak, run
//! against four ways of spreading connections over 4 workers of one Node app
//! (benches/node/steer_app.js):
//! - `hash`: reuseport-cluster `--steer hash` (each worker its own socket, the kernel hashes);
//! - `bpf`: reuseport-cluster `--steer bpf` with `REUSEPORT_CLUSTER_PARK=1` (parking, the default;
//!   the SK_REUSEPORT program: round robin over the
//!   workers that accept, under pressure each capped at a couple of samples' worth of what
//!   the fastest takes, 3 while workers stall; what finds every worker at its cap waits in the master's parking
//!   socket for the first with room, handed on every 0.5 ms; a stalled worker's queue moves
//!   there after 10-50 ms);
//! - `bpf no park`: the same with `REUSEPORT_CLUSTER_PARK=0` (no caps, no parking socket; a
//!   stalled worker's queue moves to the others after 50 ms);
//! - `cluster rr`: Node's cluster module, round robin (the primary accepts every connection);
//! - `cluster shared`: Node's cluster module, SCHED_NONE (every worker accepts from one
//!   shared socket).
//!
//! Scenarios (wrk, workers and wrk share the machine's CPUs):
//! 1. stall: wrk -c64 `Connection: close` `--timeout 2s` for 7 s; one worker SIGSTOPped
//!    from second 2 to second 5, 3 rounds with the launchers taking turns: timeouts and
//!    req/s (medians); `-- stall [ROUNDS] [LAUNCHER...]` runs this scenario alone;
//! 2. slow: 1 % of requests block their worker 200 ms, wrk -c64 `Connection: close`, 10 s,
//!    5 rounds with the launchers taking turns: req/s, p99, max, the share of the time
//!    the workers were free with no connection (see `idle_share`), and the CPU time of the
//!    launcher's own process (the master, Node's primary) over the 10 s (medians);
//!    `-- slow [ROUNDS] [LAUNCHER...]` runs this scenario alone;
//! 3. spread: 8 keep-alive clients (wrk -t2 -c8, 4 s) on 4 workers, 3 runs: requests
//!    max/min per worker (∞: a worker got nothing);
//! 4. uniform: wrk -c64 `Connection: close`, 10 s: req/s; and the master's CPU time over
//!    3 idle seconds. Then hash and bpf alone, alternately, 5 rounds each: the median ratio
//!    bpf / hash (a single pair swings with the machine's other load); and what steering
//!    costs, measured directly: the program's run time per connection (kernel.bpf_stats_enabled,
//!    bpftool) and the master's CPU time, as a share of the machine's.
//!
//! One run; the figures also go to docs/steering.png. Run: `scripts/install-load-tools.sh --no-oha && cargo bench --bench steering`
//! (as root, for bpf).

#[path = "../tests/integration/support.rs"]
mod support;

// Its unit test is compiled here without a test harness to run it.
#[path = "../src/master/event_waits.rs"]
#[allow(unused_imports)]
mod event_waits;

use std::collections::HashMap;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use support::{children, free_port, get, wait_until, Signal};

const LAUNCHERS: [&str; 5] = ["hash", "bpf", "bpf no park", "cluster rr", "cluster shared"];
const WORKERS: usize = 4;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

struct Running {
    child: Child,
    port: u16,
}

impl Drop for Running {
    /// Nothing outlives the bench, also when it panics.
    fn drop(&mut self) {
        let group = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::killpg(group, Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

fn start(launcher: &str, env: &[(&str, String)]) -> Running {
    let port = free_port();
    let app = root().join("benches/node/steer_app.js");
    let bin = env!("CARGO_BIN_EXE_reuseport-cluster");
    let mut cmd = match launcher {
        "hash" | "bpf" | "bpf no park" => {
            let mut c = Command::new(bin);
            c.env(
                "REUSEPORT_CLUSTER_PARK",
                if launcher == "bpf" { "1" } else { "0" },
            );
            let control = std::env::temp_dir().join(format!("steering-{port}.sock"));
            c.args([
                "--bind",
                &format!("127.0.0.1:{port}"),
                "--workers",
                &WORKERS.to_string(),
                "--steer",
                launcher.split(' ').next().unwrap(),
                "--grace",
                "2s",
            ])
            .arg("--control")
            .arg(control)
            .args(["--", "node", app.to_str().unwrap()]);
            c
        }
        _ => {
            let mut c = Command::new("node");
            c.arg(root().join("benches/node/cluster.js"))
                .env("WORKERS", WORKERS.to_string())
                .env("APP", &app);
            if launcher == "cluster shared" {
                c.env("NODE_CLUSTER_SCHED_POLICY", "none");
            }
            c
        }
    };
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.env("PORT", port.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0);
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("starting {launcher}: {e}"));
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let pid = child.id();
    assert!(
        wait_until(Duration::from_secs(30), || get(addr).is_ok()
            && children(pid).len() >= WORKERS),
        "{launcher} did not answer"
    );
    if let "hash" | "bpf" | "bpf no park" = launcher {
        // Every worker ready (under bpf only ready workers are in the rotation).
        let control = std::env::temp_dir().join(format!("steering-{port}.sock"));
        let ready = format!("{WORKERS}/{WORKERS} workers ready");
        let all_ready = wait_until(Duration::from_secs(30), || {
            Command::new(bin)
                .arg("status")
                .arg("--control")
                .arg(&control)
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(&ready))
        });
        assert!(all_ready, "{launcher}: not all workers ready");
    }
    // Every worker listening (Node cluster workers start one by one).
    std::thread::sleep(Duration::from_millis(500));
    Running { child, port }
}

fn stop(mut r: Running) {
    let group = r.child.id();
    support::signal(group, Signal::SIGTERM);
    let gone = wait_until(Duration::from_secs(10), || {
        r.child.try_wait().ok().flatten().is_some()
    });
    if !gone {
        support::kill_group(group);
    }
    let _ = r.child.wait();
}

fn duration_ms(s: &str) -> f64 {
    let (num, unit) = s.split_at(s.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(s.len()));
    let v: f64 = num.parse().unwrap_or(f64::NAN);
    match unit {
        "us" => v / 1000.0,
        "ms" => v,
        "s" => v * 1000.0,
        _ => f64::NAN,
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct Wrk {
    rps: f64,
    p99_ms: f64,
    max_ms: f64,
    timeouts: u64,
    errors: u64,
    /// Slow scenario: the share of samples of the workers' main threads that found them
    /// waiting for events (an idle event loop, see [`idle_share`]).
    idle: f64,
    /// Slow scenario: the CPU seconds the launcher's own process (the master, Node's primary)
    /// took during the load.
    master_cpu: f64,
}

fn wrk(port: u16, args: &[&str]) -> Wrk {
    let out = Command::new("wrk")
        .args(["--latency"])
        .args(args)
        .arg(format!("http://127.0.0.1:{port}/"))
        .output()
        .expect("running wrk (scripts/install-load-tools.sh installs it)");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut w = Wrk::default();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        match f.as_slice() {
            ["Requests/sec:", v] => w.rps = v.parse().unwrap_or(0.0),
            ["99%", v] => w.p99_ms = duration_ms(v),
            ["Latency", _avg, _stdev, max, ..] => w.max_ms = duration_ms(max),
            ["Socket", "errors:", rest @ ..] => {
                // connect N, read N, write N, timeout N
                let nums: Vec<u64> = rest
                    .iter()
                    .filter_map(|x| x.trim_end_matches(',').parse().ok())
                    .collect();
                w.errors += nums.iter().take(3).sum::<u64>();
                w.timeouts += nums.get(3).copied().unwrap_or(0);
            }
            ["Non-2xx", "or", "3xx", "responses:", v] => w.errors += v.parse::<u64>().unwrap_or(0),
            _ => {}
        }
    }
    w
}

fn close() -> [&'static str; 2] {
    ["-H", "Connection: close"]
}

fn stall(launcher: &str) -> Wrk {
    let r = start(launcher, &[]);
    let victim = *children(r.child.id()).iter().min().unwrap();
    let port = r.port;
    let load = std::thread::spawn(move || {
        let [h, v] = close();
        wrk(port, &["-t2", "-c64", "-d7s", "--timeout", "2s", h, v])
    });
    std::thread::sleep(Duration::from_secs(2));
    support::signal(victim, Signal::SIGSTOP);
    std::thread::sleep(Duration::from_secs(3));
    support::signal(victim, Signal::SIGCONT);
    let w = load.join().unwrap();
    stop(r);
    w
}

fn slow(launcher: &str) -> Wrk {
    let r = start(
        launcher,
        &[("SLOW_PERMILLE", "10".into()), ("SLOW_MS", "200".into())],
    );
    let workers = children(r.child.id());
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let done = done.clone();
        std::thread::spawn(move || idle_share(&workers, &done))
    };
    let [h, v] = close();
    let c0 = support::cpu_seconds(r.child.id());
    let mut w = wrk(r.port, &["-t2", "-c64", "-d10s", "--timeout", "5s", h, v]);
    w.master_cpu = support::cpu_seconds(r.child.id()) - c0;
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    w.idle = sampler.join().unwrap();
    stop(r);
    w
}

/// Until `done`, every 5 ms: whether each worker's main thread is waiting for events
/// (epoll_wait, poll, select, accept in /proc/PID/syscall), as opposed to blocked in its slow
/// handler (futex; restart_syscall after an evacuation's stop) or running. In the slow
/// scenario every worker is blocked most of the time and there are always clients waiting:
/// a worker waiting for events then is a free worker not given a connection, the capacity a
/// launcher loses (requests/s there are bounded by how much of the time workers are blocked).
fn idle_share(workers: &[u32], done: &std::sync::atomic::AtomicBool) -> f64 {
    let (mut idle, mut all) = (0u64, 0u64);
    while !done.load(std::sync::atomic::Ordering::Relaxed) {
        for pid in workers {
            if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                continue;
            }
            all += 1;
            idle += u64::from(event_waits::waiting_for_events(*pid));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    idle as f64 / all.max(1) as f64
}

/// max/min requests per worker, and the counts.
fn spread(launcher: &str) -> (f64, Vec<u64>) {
    let dir = std::env::temp_dir().join(format!("steering-counts-{}", free_port()));
    std::fs::create_dir_all(&dir).unwrap();
    let r = start(launcher, &[("COUNT_DIR", dir.display().to_string())]);
    let pids = children(r.child.id());
    // The warm-up request of start() was counted: start from the files as they are now.
    std::thread::sleep(Duration::from_millis(400));
    // The app rewrites its file every 200 ms: a read may catch it truncated; read again.
    let read = |pid: &u32| -> u64 {
        for _ in 0..50 {
            let n = std::fs::read_to_string(dir.join(pid.to_string()))
                .ok()
                .and_then(|s| s.trim().parse().ok());
            if let Some(n) = n {
                return n;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        0
    };
    let before: HashMap<u32, u64> = pids.iter().map(|p| (*p, read(p))).collect();
    let w = wrk(r.port, &["-t2", "-c8", "-d4s"]);
    std::thread::sleep(Duration::from_millis(400));
    let mut counts: Vec<u64> = pids
        .iter()
        .map(|p| read(p).saturating_sub(before[p]))
        .collect();
    eprintln!(
        "{launcher}: spread {counts:?} ({:.0} req/s, {} errors)",
        w.rps, w.errors
    );
    stop(r);
    let _ = std::fs::remove_dir_all(&dir);
    counts.sort_unstable();
    let ratio = match (counts.first(), counts.last()) {
        (Some(&min), Some(&max)) if min > 0 => max as f64 / min as f64,
        _ => f64::INFINITY,
    };
    (ratio, counts)
}

/// The median of `f` over `runs` (of an even count, the mean of the two in the middle).
fn median(runs: &[Wrk], f: fn(&Wrk) -> f64) -> f64 {
    let mut v: Vec<f64> = runs.iter().map(f).collect();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    (v[(n - 1) / 2] + v[n / 2]) / 2.0
}

/// `rounds` of `scenario`, the launchers taking turns in each: a single run moves as much as
/// the launchers differ (what the stopped worker had accepted when it stopped: 0-3
/// connections under bpf, up to 20 under the shared socket; p99 by 20-30 ms). Each
/// launcher's runs, in `launchers`' order.
fn take_turns(launchers: &[&str], rounds: usize, scenario: fn(&str) -> Wrk) -> Vec<Vec<Wrk>> {
    let mut runs: Vec<Vec<Wrk>> = launchers.iter().map(|_| Vec::new()).collect();
    for _ in 0..rounds {
        for (runs, l) in runs.iter_mut().zip(launchers) {
            runs.push(scenario(l));
        }
    }
    runs
}

/// Rounds of the stalled-worker scenario, every launcher in turn.
const STALL_ROUNDS: usize = 3;

/// Alternating hash/bpf rounds of the uniform scenario.
const ROUNDS: usize = 5;

/// Rounds of the 1 % slow scenario, every launcher in turn: one round's p99 moves by 20-30
/// ms, as much as the launchers differ, and the median of 3 still moved by 10.
const SLOW_ROUNDS: usize = 5;

/// What steering costs, measured rather than read off throughput that swings ±15 % on a
/// 2-CPU machine: with kernel.bpf_stats_enabled, the program's run time per new connection
/// (bpftool), and the master's CPU time, during 10 s of the uniform load under bpf; as a
/// share of the machine's CPU time over those 10 s.
fn steering_cost() -> Result<String, String> {
    let bpftool = ["/usr/sbin/bpftool", "/usr/bin/bpftool"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .ok_or("no bpftool: scripts/install-load-tools.sh installs it")?;
    let stats = "/proc/sys/kernel/bpf_stats_enabled";
    let before = std::fs::read_to_string(stats).map_err(|e| format!("{stats}: {e}"))?;
    std::fs::write(stats, "1").map_err(|e| format!("enabling {stats}: {e}"))?;
    let prog = || -> Result<(u64, u64), String> {
        let out = Command::new(bpftool)
            .args(["prog", "show", "-j"])
            .output()
            .map_err(|e| e.to_string())?;
        let all: serde_json::Value =
            serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
        let mut sum = (0, 0);
        for p in all.as_array().into_iter().flatten() {
            if p["name"] == "rc_steer" {
                sum.0 += p["run_time_ns"].as_u64().unwrap_or(0);
                sum.1 += p["run_cnt"].as_u64().unwrap_or(0);
            }
        }
        Ok(sum)
    };
    let r = start("bpf", &[]);
    let master = r.child.id();
    let (t0, n0) = prog()?;
    let c0 = support::cpu_seconds(master);
    let [h, v] = close();
    let w = wrk(r.port, &["-t2", "-c64", "-d10s", h, v]);
    let c1 = support::cpu_seconds(master);
    let (t1, n1) = prog()?;
    stop(r);
    let _ = std::fs::write(stats, before.trim());
    let runs = n1.saturating_sub(n0);
    if runs == 0 {
        return Err("the program did not run".into());
    }
    let prog_s = t1.saturating_sub(t0) as f64 / 1e9;
    let master_s = c1 - c0;
    let machine_s = 10.0 * num_cpus() as f64;
    Ok(format!(
        "steering cost under uniform load ({:.0} req/s): the program {:.0} ns per new \
         connection ({runs} runs, {prog_s:.3} s), the master {master_s:.2} s of CPU; together \
         {:.2} % of the machine's {machine_s:.0} CPU-seconds",
        w.rps,
        prog_s * 1e9 / runs as f64,
        (prog_s + master_s) / machine_s * 100.0
    ))
}

/// req/s with uniform load, the master's CPU seconds during it, and over 3 idle seconds.
fn uniform(launcher: &str) -> (Wrk, f64, f64) {
    let r = start(launcher, &[]);
    let master = r.child.id();
    let c0 = support::cpu_seconds(master);
    let [h, v] = close();
    let w = wrk(r.port, &["-t2", "-c64", "-d10s", h, v]);
    let c1 = support::cpu_seconds(master);
    std::thread::sleep(Duration::from_secs(3));
    let c2 = support::cpu_seconds(master);
    stop(r);
    (w, c1 - c0, c2 - c1)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo bench -- --list`, `cargo test --benches`: nothing to list
    }
    let load: f64 = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    println!(
        "steering bench: {} CPUs, load average {load:.2} at the start; 4 workers of benches/node/steer_app.js; one run\n",
        num_cpus()
    );

    // `cargo bench --bench steering -- slow|stall [ROUNDS] [LAUNCHER...]`: one scenario's
    // rounds alone (no chart), to compare changes that matter there: the 1 % slow scenario
    // (5 rounds of the 5 launchers: 6 min), e.g. `-- slow 8 bpf "cluster shared"`, or the
    // stalled worker (3 rounds of the 5: 3 min), e.g. `-- stall 5 bpf "bpf no park"`.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let only = args.first().map(String::as_str);
    let slow_only = only == Some("slow");
    let stall_only = only == Some("stall");
    if let Some(other) = only.filter(|_| !slow_only && !stall_only) {
        eprintln!("steering bench: no scenario {other:?}; `slow` or `stall`, or none for all");
        std::process::exit(2)
    }
    let rounds = args.get(1).map(|n| {
        n.parse()
            .ok()
            .filter(|&r: &usize| r > 0)
            .unwrap_or_else(|| {
                eprintln!(
                    "steering bench: `{} {n}`: the rounds must be a number above 0",
                    args[0]
                );
                std::process::exit(2)
            })
    });
    let launchers: Vec<&str> = match args.get(2..) {
        Some(names) if !names.is_empty() => names
            .iter()
            .map(|n| {
                LAUNCHERS.into_iter().find(|l| l == n).unwrap_or_else(|| {
                    eprintln!("steering bench: no launcher {n:?}; one of {LAUNCHERS:?}");
                    std::process::exit(2)
                })
            })
            .collect(),
        _ => LAUNCHERS.to_vec(),
    };
    println!("| scenario | {} |", launchers.join(" | "));
    println!("|---|{}", "---|".repeat(launchers.len()));

    let mut stall_runs: Vec<Vec<Wrk>> = launchers.iter().map(|_| Vec::new()).collect();
    if !slow_only {
        let rounds = rounds.unwrap_or(STALL_ROUNDS);
        stall_runs = take_turns(&launchers, rounds, stall);
        let cells: Vec<String> = stall_runs
            .iter()
            .map(|runs| {
                let each: Vec<String> = runs.iter().map(|w| w.timeouts.to_string()).collect();
                format!(
                    "**{}** ({}), {:.0} req/s",
                    median(runs, |w| w.timeouts as f64),
                    each.join(", "),
                    median(runs, |w| w.rps)
                )
            })
            .collect();
        println!(
            "| 1 worker SIGSTOPped 3 s, `--timeout 2s`, `Connection: close`, {rounds} alternating rounds: timeouts (each round's), req/s (medians) | {} |",
            cells.join(" | ")
        );
    }
    if stall_only {
        return;
    }
    let rounds = rounds.unwrap_or(SLOW_ROUNDS);

    let slow_runs = take_turns(&launchers, rounds, slow);
    let slows: Vec<Wrk> = slow_runs
        .iter()
        .map(|runs| Wrk {
            rps: median(runs, |w| w.rps),
            p99_ms: median(runs, |w| w.p99_ms),
            max_ms: median(runs, |w| w.max_ms),
            timeouts: 0,
            errors: runs.iter().map(|w| w.errors).sum(),
            idle: median(runs, |w| w.idle),
            master_cpu: median(runs, |w| w.master_cpu),
        })
        .collect();
    let cells: Vec<String> = slows
        .iter()
        .zip(&slow_runs)
        .map(|(w, runs)| {
            let p99s: Vec<String> = runs.iter().map(|r| format!("{:.0}", r.p99_ms)).collect();
            format!(
                "{:.0}, **{:.0} ms** ({}), {:.0} ms, {:.1} %, {:.2} s",
                w.rps,
                w.p99_ms,
                p99s.join(", "),
                w.max_ms,
                w.idle * 100.0,
                w.master_cpu
            )
        })
        .collect();
    println!(
        "| 1 % of requests block their worker 200 ms, `Connection: close`, {rounds} alternating rounds: req/s, p99 (each round's), max, workers idle, the master's (primary's) CPU over the 10 s (medians) | {} |",
        cells.join(" | ")
    );
    if slow_only {
        return;
    }

    // Per launcher, the 3 runs' max/min ratios; the chart shows their median.
    let spread_runs: Vec<Vec<f64>> = LAUNCHERS
        .iter()
        .map(|l| (0..3).map(|_| spread(l).0).collect())
        .collect();
    let cells: Vec<String> = spread_runs
        .iter()
        .map(|runs| {
            let shown: Vec<String> = runs
                .iter()
                .map(|r| match r.is_finite() {
                    true => format!("{r:.1}"),
                    false => "∞".into(),
                })
                .collect();
            shown.join(", ")
        })
        .collect();
    let spreads: Vec<f64> = spread_runs
        .iter()
        .map(|runs| {
            let mut r = runs.clone();
            r.sort_by(f64::total_cmp);
            r[1]
        })
        .collect();
    println!(
        "| 8 keep-alive clients on 4 workers: requests max/min per worker (3 runs) | {} |",
        cells.join(" | ")
    );

    let results: Vec<(Wrk, f64, f64)> = LAUNCHERS.iter().map(|l| uniform(l)).collect();
    let cells: Vec<String> = results
        .iter()
        .map(|(w, busy, idle)| {
            format!(
                "{:.0} req/s, {} errors; master CPU {busy:.2} s busy, {idle:.2} s idle",
                w.rps, w.errors
            )
        })
        .collect();
    println!(
        "| uniform, `Connection: close`, 10 s: req/s; master CPU during it and over 3 idle s | {} |",
        cells.join(" | ")
    );

    // hash and bpf alone, alternately: one pair's ratio is mostly the machine's noise.
    let mut ratios = Vec::new();
    for round in 1..=ROUNDS {
        let hash = uniform("hash").0.rps;
        let bpf = uniform("bpf").0.rps;
        println!(
            "uniform round {round}: hash {hash:.0} req/s, bpf {bpf:.0} req/s, bpf / hash {:.3}",
            bpf / hash
        );
        ratios.push(bpf / hash);
    }
    ratios.sort_by(f64::total_cmp);
    println!(
        "\nuniform load, bpf / hash, median of {ROUNDS} alternating rounds: {:.3} (range {:.3}-{:.3})",
        ratios[ROUNDS / 2],
        ratios[0],
        ratios[ROUNDS - 1]
    );
    match steering_cost() {
        Ok(line) => println!("{line}"),
        Err(why) => println!("steering cost: not measured ({why})"),
    }

    chart(
        &[
            (
                "1 worker stopped 3 s: timeouts",
                stall_runs
                    .iter()
                    .map(|runs| median(runs, |w| w.timeouts as f64))
                    .collect(),
            ),
            (
                "1 % slow requests: p99 (ms)",
                slows.iter().map(|w| w.p99_ms).collect(),
            ),
            ("8 keep-alive clients: max/min per worker", spreads),
            (
                "uniform: requests/s",
                results.iter().map(|r| r.0.rps).collect(),
            ),
        ],
        &root().join("docs/steering.png"),
    );
}

/// One panel per scenario, a bar per launcher (lower is better but for requests/s; an
/// infinite spread, a worker that got nothing, is drawn above the panel's top as "∞"). The
/// launchers are named once, in a legend above the panels: under each bar their names ran
/// into each other.
fn chart(panels: &[(&str, Vec<f64>)], path: &std::path::Path) {
    use plotters::prelude::*;
    support::register_chart_font();
    let root = BitMapBackend::new(path, (1400, 450)).into_drawing_area();
    root.fill(&WHITE).unwrap();
    let colors = [
        RED.mix(0.7),
        BLUE.mix(0.7),
        GREEN.mix(0.7),
        MAGENTA.mix(0.7),
        CYAN.mix(0.7),
    ];
    let (legend, body) = root.split_vertically(36);
    for (i, name) in LAUNCHERS.iter().enumerate() {
        let x = 60 + 200 * i as i32;
        legend
            .draw(&Rectangle::new(
                [(x, 12), (x + 16, 28)],
                colors[i % colors.len()].filled(),
            ))
            .unwrap();
        legend
            .draw(&Text::new(
                *name,
                (x + 24, 12),
                ("sans-serif", 15).into_font().color(&BLACK),
            ))
            .unwrap();
    }
    let areas = body.split_evenly((1, panels.len()));
    for (area, (title, values)) in areas.iter().zip(panels) {
        let finite = values
            .iter()
            .copied()
            .filter(|v| v.is_finite())
            .fold(0.0, f64::max);
        let top = (finite * 1.2).max(1.0);
        let mut chart = ChartBuilder::on(area)
            .caption(*title, ("sans-serif", 16))
            .margin(10)
            .x_label_area_size(10)
            .y_label_area_size(55)
            .build_cartesian_2d(0.0..LAUNCHERS.len() as f64, 0.0..top)
            .unwrap();
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(0)
            .y_label_formatter(&|y| match top < 10.0 {
                true => format!("{y:.1}"),
                false => format!("{y:.0}"),
            })
            .label_style(("sans-serif", 12))
            .draw()
            .unwrap();
        for (i, v) in values.iter().enumerate() {
            let height = if v.is_finite() { *v } else { top };
            chart
                .draw_series([Rectangle::new(
                    [(i as f64 + 0.15, 0.0), (i as f64 + 0.85, height)],
                    colors[i % colors.len()].filled(),
                )])
                .unwrap();
            let label = match v.is_finite() {
                true if v.fract() == 0.0 || *v >= 100.0 => format!("{v:.0}"),
                true => format!("{v:.1}"),
                false => "∞".to_string(),
            };
            chart
                .draw_series([Text::new(
                    label,
                    (i as f64 + 0.3, height * 0.97),
                    ("sans-serif", 13).into_font().color(&BLACK),
                )])
                .unwrap();
        }
    }
    root.present().unwrap();
    println!("\nchart: {}", path.display());
}

fn num_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
