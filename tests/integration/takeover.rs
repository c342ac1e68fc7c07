//! Socket takeover: a slot's listening socket outlives its workers, so that restarts lose
//! nothing where net.ipv4.tcp_migrate_req is 0 (containers, kernels before 5.14).
//!
//! The zero-loss tests run in a network namespace of their own, where tcp_migrate_req is 0,
//! with `--migrate off`; each has a control case with takeover off
//! (REUSEPORT_CLUSTER_TAKEOVER=0: every worker opens its own socket) that loses requests.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use crate::support::*;

const TAKEOVER_OFF: (&str, &str) = ("REUSEPORT_CLUSTER_TAKEOVER", "0");

/// The inodes the master holds per slot, from `status --json`.
fn held(c: &Cluster) -> Vec<(u64, Vec<u64>)> {
    c.status()["held_sockets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            let inodes = h["inodes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| i.as_u64().unwrap())
                .collect();
            (h["slot"].as_u64().unwrap(), inodes)
        })
        .collect()
}

/// Socket inodes a process has at `fd`.
fn socket_inode(pid: u32, fd: i32) -> u64 {
    let target = fd_target(pid, fd);
    target
        .strip_prefix("socket:[")
        .and_then(|t| t.strip_suffix(']'))
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("fd {fd} of {pid} is {target}"))
}

fn zero_loss_with_and_without_takeover(cmd: &[&str]) {
    let _load = load_lock();
    if !enter_fresh_netns() {
        return;
    }
    assert_eq!(
        migrate_req().as_deref(),
        Some("0"),
        "a new netns starts at 0"
    );
    let with = rolls_under_load(cmd, &[], 3);
    let without = rolls_under_load(cmd, &[TAKEOVER_OFF], 3);
    println!(
        "3 rolling restarts, tcp_migrate_req=0: takeover {} failed of {}; without takeover {} failed of {} ({:?})",
        with.failed,
        with.ok + with.failed,
        without.failed,
        without.ok + without.failed,
        without.errors.first()
    );
    assert!(with.ok > 200, "the load ran: {with:?}");
    assert_eq!(with.failed, 0, "with takeover: {:?}", with.errors);
    assert!(
        without.failed > 0,
        "control: without takeover, the queues of closing sockets are reset ({without:?})"
    );
}

#[test]
fn load_takeover_rolling_restarts_of_a_node_app_lose_nothing_without_tcp_migrate_req() {
    if std::process::Command::new("node")
        .arg("--version")
        .output()
        .is_err()
    {
        return eprintln!("skipped: node is not installed (scripts/install-test-deps.sh)");
    }
    let app = script("close_app.js", NODE_CLOSE_APP);
    zero_loss_with_and_without_takeover(&["node", app.to_str().unwrap()]);
}

#[test]
fn load_takeover_rolling_restarts_of_a_python_app_lose_nothing_without_tcp_migrate_req() {
    let app = script("close_app.py", PYTHON_CLOSE_APP);
    zero_loss_with_and_without_takeover(&[app.to_str().unwrap()]);
}

/// SIGKILLs worker 0 under new-connection load; what the clients saw.
fn kill_under_load(env: &[(&str, &str)]) -> (LoadStats, u64) {
    let app = script("close_app.py", PYTHON_CLOSE_APP);
    let mut env = env.to_vec();
    // One request at a time, 20 ms each: connections queue on each socket, and the killed
    // process has at most one of them in hand.
    env.extend([("INLINE", "1"), ("DELAY_MS", "20")]);
    let mut c = Cluster::spawn(
        &[
            "--workers",
            "2",
            "--bind",
            "127.0.0.1:0",
            "--ready",
            "listening",
            "--migrate",
            "off",
            "--",
            app.to_str().unwrap(),
        ],
        &env,
    );
    c.expect_log("workers ready");
    let victim = c.workers()[&0];
    let load = Load::start_with(c.addr(), 16, Duration::from_secs(60), true);
    assert!(
        wait_until(TIMEOUT, || load.ok_so_far() > 30),
        "the load runs"
    );
    let queued = accept_queue_depth(socket_inode(victim, 3));
    signal(victim, Signal::SIGKILL);
    c.expect_log("exited (signal SIGKILL)");
    assert!(wait_until(TIMEOUT, || c
        .workers()
        .get(&0)
        .is_some_and(|p| *p != victim)));
    let ok = load.ok_so_far();
    assert!(wait_until(TIMEOUT, || load.ok_so_far() > ok + 30));
    (load.finish(), queued)
}

/// The accept-queue depth of the listening socket `inode`.
fn accept_queue_depth(inode: u64) -> u64 {
    tcp_listeners()
        .into_iter()
        .find(|l| l.1 == inode)
        .map_or(0, |l| l.2)
}

#[test]
fn load_takeover_a_killed_workers_queued_connections_are_served_by_its_replacement() {
    let _load = load_lock();
    if !enter_fresh_netns() {
        return;
    }
    let (with, queued) = kill_under_load(&[]);
    let (without, queued_without) = kill_under_load(&[TAKEOVER_OFF]);
    println!(
        "SIGKILL of 1 of 2 workers, tcp_migrate_req=0: takeover {} failed of {} ({queued} queued at the kill); \
         without takeover {} failed of {} ({queued_without} queued)",
        with.failed,
        with.ok + with.failed,
        without.failed,
        without.ok + without.failed,
    );
    // Only the request the killed process was serving (one at a time) may fail.
    assert!(with.failed <= 1, "with takeover: {:?}", with.errors);
    assert!(
        without.failed > 1,
        "control: without takeover, the killed socket's queue is reset ({without:?})"
    );
}

#[test]
fn takeover_the_slots_socket_survives_restarts_and_generations_and_status_shows_it() {
    let port = free_port().to_string();
    let second = format!("127.0.0.1:{port}");
    let first = format!("127.0.0.1:{}", free_port());
    // With --steer bpf a rolling restart's new worker opens fresh sockets (to drain the old
    // ones): the hold across generations is the hash's behaviour.
    let mut c = Cluster::start(&[
        "--steer",
        "hash",
        "--workers",
        "2",
        "--bind",
        &first,
        "--bind",
        &second,
        "--ready",
        "delay:1ms",
        "--",
        "sleep",
        "1000",
    ]);
    let before = held(&c);
    assert_eq!(before.len(), 2, "one entry per slot: {before:?}");
    assert!(
        before.iter().all(|(_, i)| i.len() == 2),
        "one socket per bind"
    );
    let w0 = c.workers()[&0];
    assert_eq!(
        fds(w0),
        vec![0, 1, 2, 3, 4],
        "a worker has exactly 0, 1, 2 and its sockets"
    );
    assert_eq!(
        [socket_inode(w0, 3), socket_inode(w0, 4)].to_vec(),
        before[0].1
    );
    // A crash, then two generations.
    signal(w0, Signal::SIGKILL);
    assert!(wait_until(TIMEOUT, || c
        .workers()
        .get(&0)
        .is_some_and(|p| *p != w0)));
    for g in 2..4 {
        c.signal(Signal::SIGHUP);
        c.expect_log(&format!("rolling restart to generation {g} done"));
    }
    assert_eq!(
        held(&c),
        before,
        "the same sockets after a crash and 2 generations"
    );
    for (slot, pid) in c.workers() {
        assert_eq!(fds(pid), vec![0, 1, 2, 3, 4], "slot {slot}");
        assert_eq!(
            vec![socket_inode(pid, 3), socket_inode(pid, 4)],
            before[slot].1,
            "slot {slot}: the new worker has the slot's sockets"
        );
    }
    let status = c.status();
    assert_eq!(status["held_sockets"][0]["workers_served"], 4, "{status}");
    let (_, text, _) = c.ctl(&["status"]);
    assert!(
        text.contains(&format!(
            "slot 0 inode {}+{}",
            before[0].1[0], before[0].1[1]
        )),
        "{text}"
    );
}

#[test]
fn takeover_the_master_holds_no_more_fds_after_hundreds_of_restarts() {
    let mut c = Cluster::start(&[
        "--workers",
        "1",
        "--bind",
        "127.0.0.1:0",
        "--ready",
        "delay:1ms",
        "--",
        "sleep",
        "1000",
    ]);
    let master = c.pid();
    let start = fds(master).len();
    let passes = 300;
    let t0 = Instant::now();
    for g in 2..2 + passes {
        c.signal(Signal::SIGHUP);
        c.expect_log(&format!("rolling restart to generation {g} done"));
    }
    let end = fds(master).len();
    println!(
        "{passes} restarts in {:.1} s: master fds {start} -> {end}",
        t0.elapsed().as_secs_f64()
    );
    assert_eq!(start, end, "no fd growth");
}

#[test]
fn takeover_a_crash_looping_slot_lets_go_of_its_socket_and_the_others_serve() {
    let marker = temp_dir("marker").join("crash");
    let app = script("close_app.py", PYTHON_CLOSE_APP);
    let mut c = Cluster::spawn(
        &[
            "--workers",
            "2",
            "--bind",
            "127.0.0.1:0",
            "--ready",
            "listening",
            "--",
            app.to_str().unwrap(),
        ],
        &[("CRASH_MARKER", marker.to_str().unwrap())],
    );
    c.expect_log("workers ready");
    let victim = c.workers()[&1];
    std::fs::write(&marker, "").unwrap();
    let t0 = Instant::now();
    signal(victim, Signal::SIGKILL);
    let line = c.expect_log("worker 1: let go of its socket");
    let released = t0.elapsed();
    println!(
        "crash loop: socket released {} ms after the first crash",
        released.as_millis()
    );
    // At the fifth crash in a row, the first whose restart is 1 s or more away: 1.5 s of
    // backoff plus five start-ups after the first crash (the time is printed, not bounded:
    // start-ups are slow on a loaded machine).
    assert!(line.contains("next restart in 1.6 s"), "{line}");
    // Every new connection now lands on slot 0's socket and is answered at once.
    let addr = c.addr();
    let mut workers = HashSet::new();
    for _ in 0..40 {
        let r = get(addr).expect("served while slot 1 crash-loops");
        workers.insert(r.worker());
    }
    assert_eq!(workers, HashSet::from([0]));
    assert!(c.status()["held_sockets"]
        .as_array()
        .unwrap()
        .iter()
        .all(|h| h["slot"] == 0));
}

#[test]
fn takeover_an_app_that_shuts_its_listener_down_at_stop_does_not_take_the_slot_down() {
    let app = script("close_app.py", PYTHON_CLOSE_APP);
    // Under --steer hash the old and the new worker share the slot's socket; with bpf the
    // old worker shuts down its own, drained socket, which harms nobody.
    let mut c = Cluster::spawn(
        &[
            "--steer",
            "hash",
            "--workers",
            "2",
            "--bind",
            "127.0.0.1:0",
            "--ready",
            "listening",
            "--",
            app.to_str().unwrap(),
        ],
        &[("SHUTDOWN_ON_STOP", "1")],
    );
    c.expect_log("workers ready");
    let before = held(&c);
    // The old worker's shutdown(2) ends the socket its successor shares; the successor may
    // even crash on it (this app does, on EINVAL from accept) and roll the pass back. What
    // must hold: the master notices and every slot ends up serving on a fresh socket.
    c.signal(Signal::SIGHUP);
    c.expect_log("no longer listens");
    let addr = c.addr();
    assert!(
        wait_until(TIMEOUT, || {
            let now = held(&c);
            now.len() == 2 && now.iter().zip(&before).all(|(a, b)| a.1 != b.1)
        }),
        "fresh sockets: {before:?} -> {:?}",
        held(&c)
    );
    assert!(wait_until(TIMEOUT, || c.status()["workers_ready"] == 2));
    let mut workers = HashSet::new();
    assert!(
        wait_until(TIMEOUT, || {
            if let Ok(r) = get(addr) {
                workers.insert(r.worker());
            }
            workers.len() == 2
        }),
        "both slots serve again: {workers:?}"
    );
}
