//! Worker recycling (--max-memory, --max-lifetime) and hung-worker replacement
//! (--hung-after), under load, with no failed request.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use crate::support::*;

/// `workers` workers of the close app, `--migrate off`, then `extra`.
fn python_cluster(extra: &[&str], env: &[(&str, &str)], workers: &str) -> Cluster {
    let app = script("close_app.py", PYTHON_CLOSE_APP);
    let args = [&["--migrate", "off"], extra].concat();
    app_cluster(&app, workers.parse().unwrap(), &args, env)
}

#[test]
fn load_a_leaky_worker_is_recycled_above_max_memory_and_nothing_fails() {
    let _load = load_lock();
    let mut c = python_cluster(&["--max-memory", "64M"], &[("LEAK_MB", "2")], "2");
    let load = Load::start_with(c.addr(), 8, Duration::from_secs(60), true);
    let line = c.expect_log("recycled: memory");
    c.expect_log("recycle done");
    let ok = load.ok_so_far();
    assert!(wait_until(TIMEOUT, || load.ok_so_far() > ok + 100));
    let stats = load.finish();
    println!("{line}; load: {} ok, {} failed", stats.ok, stats.failed);
    assert!(line.contains("> 64 MiB"), "{line}");
    assert_eq!(stats.failed, 0, "{:?}", stats.errors);
    let status = c.status();
    assert!(
        status["recycles"]["memory"].as_u64().unwrap() >= 1,
        "{status}"
    );
    let (_, metrics_text, _) = c.ctl(&["status"]);
    assert!(
        metrics_text.contains("last recycled: memory"),
        "{metrics_text}"
    );
}

#[test]
fn load_max_lifetime_recycles_every_slot_one_at_a_time_never_below_n_ready() {
    let _load = load_lock();
    let mut c = python_cluster(&["--max-lifetime", "3s"], &[], "3");
    let first = c.workers();
    let load = Load::start_with(c.addr(), 8, Duration::from_secs(60), true);
    let t0 = Instant::now();
    let mut min_ready = u64::MAX;
    let mut most_at_once = 0;
    // Until every slot was recycled (at least 12 s): under load a replacement can take
    // seconds to show ready, so a fixed window bets on the machine's speed.
    let all_recycled = |c: &mut Cluster| {
        let now = c.workers();
        (0..3).all(|slot| now.get(&slot).is_some_and(|p| *p != first[&slot]))
    };
    while t0.elapsed() < Duration::from_secs(12)
        || (!all_recycled(&mut c) && t0.elapsed() < Duration::from_secs(45))
    {
        let s = c.status();
        min_ready = min_ready.min(s["workers_ready"].as_u64().unwrap());
        let starting = s["workers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|w| w["state"] == "starting")
            .count();
        most_at_once = most_at_once.max(starting);
        std::thread::sleep(Duration::from_millis(20)); // sampling period, not a wait
    }
    let stats = load.finish();
    let now = c.workers();
    let recycled = c.status()["recycles"]["lifetime"].as_u64().unwrap_or(0);
    println!(
        "{:.1} s, --max-lifetime 3s, 3 workers: {recycled} recycles, fewest ready {min_ready}, \
         load {} ok / {} failed",
        t0.elapsed().as_secs_f64(),
        stats.ok,
        stats.failed
    );
    for slot in 0..3 {
        assert_ne!(first[&slot], now[&slot], "slot {slot} was recycled");
    }
    assert_eq!(min_ready, 3, "never fewer than 3 ready workers");
    assert!(most_at_once <= 1, "one recycle at a time");
    assert_eq!(stats.failed, 0, "{:?}", stats.errors);
}

/// New-connection clients (5 s timeout) while worker 0 is SIGSTOPped: (failed, ok, whether
/// it was replaced, how long after the stop).
fn stopped_worker(extra: &[&str], env: &[(&str, &str)]) -> (LoadStats, Option<Duration>) {
    let mut c = python_cluster(extra, env, "2");
    let victim = c.workers()[&0];
    let load = Load::start_new_connections(c.addr(), 16, Duration::from_secs(60));
    assert!(wait_until(TIMEOUT, || load.ok_so_far() > 50));
    signal(victim, Signal::SIGSTOP);
    let t0 = Instant::now();
    let replaced = wait_until(Duration::from_secs(6), || {
        c.workers().get(&0).is_some_and(|p| *p != victim)
    })
    .then(|| t0.elapsed());
    std::thread::sleep(Duration::from_secs(1)); // the measured span, not a wait
                                                // Gone when it was replaced (the master continues it after the stop signal).
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(victim as i32), Signal::SIGCONT);
    let ok = load.ok_so_far();
    assert!(wait_until(TIMEOUT, || load.ok_so_far() > ok + 50));
    (load.finish(), replaced)
}

#[test]
fn load_a_stopped_worker_is_replaced_and_its_queue_served_with_hung_after() {
    let _load = load_lock();
    let (with, replaced) = stopped_worker(&["--hung-after", "1s"], &[]);
    let (without, not_replaced) = stopped_worker(&[], &[]);
    println!(
        "SIGSTOP of 1 of 2 workers: --hung-after 1s: replaced after {replaced:?}, {} failed of {}; \
         without: {} failed of {}",
        with.failed,
        with.ok + with.failed,
        without.failed,
        without.ok + without.failed
    );
    let replaced = replaced.expect("the stopped worker was replaced");
    assert!(replaced < Duration::from_secs(3), "{replaced:?}");
    assert_eq!(with.failed, 0, "{:?}", with.errors);
    assert_eq!(not_replaced, None, "control: without --hung-after it stays");
}

#[test]
fn load_a_slow_worker_that_still_accepts_is_never_recycled_as_hung() {
    let _load = load_lock();
    // One request at a time, 50 ms each: 20 requests/s, under 32 clients' load.
    let mut c = python_cluster(
        &["--hung-after", "1s"],
        &[("INLINE", "1"), ("DELAY_MS", "50")],
        "1",
    );
    let first: HashSet<u32> = c.workers().into_values().collect();
    let load = Load::start_new_connections(c.addr(), 32, Duration::from_secs(60));
    let t0 = Instant::now();
    let mut deepest = 0;
    while t0.elapsed() < Duration::from_secs(5) {
        let s = c.status();
        if let Some(d) = s["workers"][0]["queues"][0]["depth"].as_u64() {
            deepest = deepest.max(d);
        }
        std::thread::sleep(Duration::from_millis(100)); // sampling period
    }
    let stats = load.finish();
    println!(
        "slow worker: {} answered in 5 s, accept queue up to {deepest}",
        stats.ok
    );
    assert!(deepest >= 10, "the load kept its queue full: {deepest}");
    assert!(!c.log_contains("recycled"), "a slow worker is not hung");
    assert_eq!(c.workers().into_values().collect::<HashSet<_>>(), first);
}
