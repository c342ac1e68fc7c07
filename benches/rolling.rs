//! Rolling restarts of the demo app: how long one takes for N workers, and the requests/s
//! a client gets during it against just before it, in the same run.
//!
//! Run: `cargo bench --bench rolling` (or `-- 2 8 32 --passes 5`). Load: 16 client threads
//! on 127.0.0.1, half keep-alive, half a new connection per request; the client shares the
//! 2 cores with the workers, so the absolute figures are the machine's, the ratio is ours.
//!
//! A second table (as root; skipped otherwise) counts failed requests over rolling restarts
//! in a network namespace of its own, with net.ipv4.tcp_migrate_req 1 and 0 (as in a
//! container), socket takeover on and off (REUSEPORT_CLUSTER_TAKEOVER=0), for the demo app
//! and for a python app that closes its listener on SIGTERM without draining it. There the
//! keep-alive clients retry once on a connection the server closed, as HTTP clients do.
//! `-- --takeover-only` runs only that table.

#[path = "../tests/integration/support.rs"]
mod support;

use std::time::{Duration, Instant};

use support::*;

struct Row {
    workers: usize,
    pass_ms: Vec<f64>,
    rps_before: f64,
    rps_during: f64,
    failed: u64,
    requests: u64,
}

fn measure(workers: usize, passes: u64) -> Row {
    let n = workers.to_string();
    let c = Cluster::start(&[
        "--workers",
        &n,
        "--bind",
        "127.0.0.1:0",
        "--ready",
        "listening",
    ]);
    let load = Load::start(c.addr(), 16, Duration::from_secs(300));
    std::thread::sleep(Duration::from_millis(500)); // warm up
    let (a, ta) = (load.ok_so_far(), Instant::now());
    std::thread::sleep(Duration::from_secs(2));
    let (b, tb) = (load.ok_so_far(), Instant::now());
    let rps_before = (b - a) as f64 / (tb - ta).as_secs_f64();

    let mut pass_ms = Vec::new();
    let (b, tb) = (load.ok_so_far(), Instant::now());
    for g in 2..2 + passes {
        let t0 = Instant::now();
        c.signal(Signal::SIGHUP);
        let done = format!("rolling restart to generation {g} done");
        assert!(wait_until(TIMEOUT, || c.log_contains(&done)), "{done}");
        pass_ms.push(t0.elapsed().as_secs_f64() * 1000.0);
    }
    let (d, td) = (load.ok_so_far(), Instant::now());
    let rps_during = (d - b) as f64 / (td - tb).as_secs_f64();
    let stats = load.finish();
    Row {
        workers,
        pass_ms,
        rps_before,
        rps_during,
        failed: stats.failed,
        requests: stats.ok + stats.failed,
    }
}

/// Failed requests over `passes` rolling restarts of 2 workers of `cmd` (empty: the demo).
fn takeover_row(cmd: &[&str], env: &[(&str, &str)], passes: u64) -> (u64, u64) {
    let stats = rolls_under_load(cmd, env, passes);
    (stats.failed, stats.ok + stats.failed)
}

fn takeover_table(passes: u64) {
    if !enter_fresh_netns() {
        return;
    }
    let app = script("close_app.py", PYTHON_CLOSE_APP);
    let python = [app.to_str().unwrap()];
    println!("\n| app | tcp_migrate_req | socket takeover | failed requests over {passes} rolling restarts of 2 workers |");
    println!("|---|---|---|---|");
    for migrate in ["1", "0"] {
        std::fs::write("/proc/sys/net/ipv4/tcp_migrate_req", migrate)
            .expect("setting tcp_migrate_req in the bench's own netns");
        for (name, cmd) in [
            ("demo app", &[][..]),
            ("python, closes its listener", &python[..]),
        ] {
            for (takeover, env) in [
                ("on", &[][..]),
                ("off", &[("REUSEPORT_CLUSTER_TAKEOVER", "0")][..]),
            ] {
                let (failed, total) = takeover_row(cmd, env, passes);
                println!("| {name} | {migrate} | {takeover} | {failed} of {total} |");
            }
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let mut passes = 5;
    let mut sizes = Vec::new();
    if args.iter().any(|a| a == "--takeover-only") {
        return takeover_table(passes);
    }
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--passes" => passes = it.next().and_then(|p| p.parse().ok()).expect("--passes N"),
            n => sizes.extend(n.parse::<usize>().ok()),
        }
    }
    if sizes.is_empty() {
        sizes = vec![2, 8, 32];
    }
    println!("| workers | one rolling restart (median, min-max of {passes}) | requests/s before | requests/s during | during / before | failed requests |");
    println!("|---|---|---|---|---|---|");
    for n in sizes {
        let mut r = measure(n, passes);
        r.pass_ms.sort_by(|a, b| a.total_cmp(b));
        println!(
            "| {} | {:.0} ms ({:.0}-{:.0}) | {:.0} | {:.0} | {:.2} | {} of {} |",
            r.workers,
            r.pass_ms[r.pass_ms.len() / 2],
            r.pass_ms[0],
            r.pass_ms[r.pass_ms.len() - 1],
            r.rps_before,
            r.rps_during,
            r.rps_during / r.rps_before,
            r.failed,
            r.requests
        );
    }
    println!("\ndemo app, --ready listening, tcp_migrate_req as the master leaves it (auto: 1)");
    takeover_table(passes);
}
