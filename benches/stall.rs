//! One stalled worker: 4 workers of the Node hello app (benches/node/app.js), wrk with a new
//! connection per request and a 2 s timeout, one worker SIGSTOPped for 3 s in the middle.
//! Counts what the clients lose under each launcher, in one run:
//! - reuseport-cluster as it is by default (kernel hashing keeps feeding the stopped worker);
//! - reuseport-cluster `--hung-after 1s` (the stopped worker is replaced; its successor
//!   inherits the slot's socket and serves what was queued);
//! - Node's cluster module, round robin (the primary accepts and hands out connections);
//! - Node's cluster module, shared socket (the workers accept from one queue).
//!
//! Run: `scripts/install-load-tools.sh --no-oha && cargo bench --bench stall`
//! (`-- --seconds 15 --rounds 1`).

#[path = "../tests/integration/support.rs"]
mod support;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::{children, env_of, free_port, get, wait_until, Signal};

const WORKERS: usize = 4;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

struct Running {
    child: Child,
}

fn start(launcher: &str, port: u16) -> Running {
    let app = root().join("benches/node/app.js");
    let cluster = root().join("benches/node/cluster.js");
    let bind = format!("127.0.0.1:{port}");
    let n = WORKERS.to_string();
    let mut cmd = match launcher {
        "reuseport-cluster" | "reuseport-cluster --hung-after 1s" => {
            let mut c = Command::new(support::bin());
            c.args(["--bind", &bind, "--workers", &n, "--ready", "listening"]);
            c.args(["--control", &format!("/tmp/rc-stall-{port}.sock")]);
            if launcher.ends_with("1s") {
                c.args(["--hung-after", "1s"]);
            }
            c.args(["--", "node", app.to_str().unwrap()]);
            c
        }
        "node cluster, round robin" | "node cluster, shared socket" => {
            let mut c = Command::new("node");
            c.arg(&cluster)
                .env("WORKERS", &n)
                .env("PORT", port.to_string());
            if launcher.ends_with("shared socket") {
                c.env("NODE_CLUSTER_SCHED_POLICY", "none");
            }
            c
        }
        other => panic!("unknown launcher {other}"),
    };
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting the launcher");
    let addr = ([127, 0, 0, 1], port).into();
    assert!(
        wait_until(Duration::from_secs(30), || get(addr).is_ok()),
        "{launcher} answers"
    );
    // Every worker up: N children answering (the cluster primary forks them one by one).
    assert!(wait_until(Duration::from_secs(30), || workers(&child)
        .len()
        == WORKERS));
    std::thread::sleep(Duration::from_millis(500));
    Running { child }
}

/// The worker processes of a launcher.
fn workers(child: &Child) -> Vec<u32> {
    children(child.id())
        .into_iter()
        .filter(|p| {
            let env = env_of(*p);
            env.contains_key("REUSEPORT_CLUSTER_WORKER") || env.contains_key("NODE_UNIQUE_ID")
        })
        .collect()
}

fn stop(mut r: Running) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(r.child.id() as i32),
        Signal::SIGTERM,
    );
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(10) {
        if let Ok(Some(_)) = r.child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = r.child.kill();
    let _ = r.child.wait();
}

/// Requests/s, timeouts and other errors wrk saw.
struct Outcome {
    requests: u64,
    timeouts: u64,
    errors: u64,
}

fn run(launcher: &str, seconds: u64) -> Outcome {
    let port = free_port();
    let r = start(launcher, port);
    let victim = workers(&r.child)[0];
    let wrk = Command::new("wrk")
        .args(["-t1", "-c64", &format!("-d{seconds}s"), "--timeout", "2s"])
        .args(["-H", "Connection: close"])
        .arg(format!("http://127.0.0.1:{port}/"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("wrk (scripts/install-load-tools.sh)");
    std::thread::sleep(Duration::from_secs(seconds / 3));
    let pid = nix::unistd::Pid::from_raw(victim as i32);
    let _ = nix::sys::signal::kill(pid, Signal::SIGSTOP);
    std::thread::sleep(Duration::from_secs(3));
    let _ = nix::sys::signal::kill(pid, Signal::SIGCONT);
    let out = wrk.wait_with_output().expect("wrk output");
    stop(r);
    let text = String::from_utf8_lossy(&out.stdout);
    let number = |after: &str| -> u64 {
        text.split(after)
            .nth(1)
            .and_then(|t| {
                t.trim_start()
                    .split(|c: char| !c.is_ascii_digit())
                    .next()?
                    .parse()
                    .ok()
            })
            .unwrap_or(0)
    };
    let requests = text
        .lines()
        .find(|l| l.contains("requests in"))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let timeouts = number("timeout ");
    let errors = number("connect ")
        + number("read ")
        + number("write ")
        + number("Non-2xx or 3xx responses:");
    Outcome {
        requests,
        timeouts,
        errors,
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let seconds = args
        .iter()
        .position(|a| a == "--seconds")
        .and_then(|i| args.get(i + 1)?.parse().ok())
        .unwrap_or(15);
    if Command::new("wrk").arg("--version").output().is_err()
        || Command::new("node").arg("--version").output().is_err()
    {
        return eprintln!("skipped: needs wrk and node (scripts/install-load-tools.sh --no-oha)");
    }
    println!(
        "| launcher, {WORKERS} workers of benches/node/app.js | requests | timeouts (2 s) | other errors |"
    );
    println!("|---|---|---|---|");
    for launcher in [
        "reuseport-cluster",
        "reuseport-cluster --hung-after 1s",
        "node cluster, round robin",
        "node cluster, shared socket",
    ] {
        let o = run(launcher, seconds);
        println!(
            "| {launcher} | {} | {} | {} |",
            o.requests, o.timeouts, o.errors
        );
    }
    println!(
        "\nwrk -t1 -c64 -d{seconds}s --timeout 2s -H 'Connection: close'; one worker SIGSTOPped \
         for 3 s starting at {} s",
        seconds / 3
    );
}
