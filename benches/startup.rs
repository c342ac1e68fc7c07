//! What the launcher itself costs in time: start-up to N workers serving, and the gap
//! between a worker's SIGKILL and its replacement serving. The demo app, on 127.0.0.1.
//!
//! Run: `cargo bench --bench startup` (or `-- 1 8 64 --runs 5`). Prints a markdown table
//! of medians (min-max) over the runs; BENCHMARKS.md holds the latest one.

#[path = "../tests/integration/support.rs"]
mod support;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use support::*;

/// Listening sockets on `port`.
fn listening(port: u16) -> usize {
    listening_inodes(port).len()
}

/// Sends new-connection requests until every one of `n` slots has answered.
fn until_all_answer(addr: SocketAddr, n: usize, timeout: Duration) -> bool {
    let mut seen = HashSet::new();
    wait_until(timeout, || {
        for _ in 0..64 {
            if let Ok(r) = get(addr) {
                seen.insert(r.worker());
            }
        }
        seen.len() == n
    })
}

struct Sample {
    listening: Duration,
    answering: Duration,
}

fn start_up(n: usize) -> Sample {
    let workers = n.to_string();
    let t0 = Instant::now();
    let c = Cluster::spawn(&["--workers", &workers, "--bind", "127.0.0.1:0"], &[]);
    let port = c.addr().port();
    assert!(
        wait_until(TIMEOUT, || listening(port) == n),
        "{n} sockets listening"
    );
    let listening = t0.elapsed();
    assert!(
        until_all_answer(c.addr(), n, TIMEOUT),
        "all {n} workers answered"
    );
    Sample {
        listening,
        answering: t0.elapsed(),
    }
}

fn replacement() -> Sample {
    let mut c = Cluster::start(&["--workers", "2", "--bind", "127.0.0.1:0"]);
    let port = c.addr().port();
    let old = c.workers()[&0];
    let t0 = Instant::now();
    signal(old, Signal::SIGKILL);
    assert!(
        wait_until(TIMEOUT, || listening(port) == 1),
        "old socket closed"
    );
    assert!(
        wait_until(TIMEOUT, || listening(port) == 2),
        "replacement listening"
    );
    let listening = t0.elapsed();
    let pid = format!("pid {}", old);
    assert!(wait_until(TIMEOUT, || get(c.addr())
        .is_ok_and(|r| r.worker() == 0 && !r.body.contains(&pid))));
    Sample {
        listening,
        answering: t0.elapsed(),
    }
}

fn summary(samples: &[Duration]) -> String {
    let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
    ms.sort_by(|a, b| a.total_cmp(b));
    format!(
        "{:.1} ms ({:.1}-{:.1})",
        ms[ms.len() / 2],
        ms[0],
        ms[ms.len() - 1]
    )
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let mut runs = 5;
    let mut sizes = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--runs" => runs = it.next().and_then(|r| r.parse().ok()).expect("--runs N"),
            n => sizes.extend(n.parse::<usize>().ok()),
        }
    }
    if sizes.is_empty() {
        sizes = vec![1, 8, 64];
    }
    println!("| measurement | all sockets listening | all workers answered |");
    println!("|---|---|---|");
    for &n in &sizes {
        let samples: Vec<Sample> = (0..runs).map(|_| start_up(n)).collect();
        println!(
            "| start-up, {n} workers | {} | {} |",
            summary(&samples.iter().map(|s| s.listening).collect::<Vec<_>>()),
            summary(&samples.iter().map(|s| s.answering).collect::<Vec<_>>())
        );
    }
    let samples: Vec<Sample> = (0..runs).map(|_| replacement()).collect();
    println!(
        "| SIGKILL of a worker to its replacement (includes the 100 ms first backoff) | {} | {} |",
        summary(&samples.iter().map(|s| s.listening).collect::<Vec<_>>()),
        summary(&samples.iter().map(|s| s.answering).collect::<Vec<_>>())
    );
    println!("\nmedian (min-max) of {runs} runs; demo app; 127.0.0.1");
}
