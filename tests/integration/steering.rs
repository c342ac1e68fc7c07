//! `--steer`: the SK_REUSEPORT program that places new connections (bpf), its fallback to
//! the kernel's hash, drain before stop, and load-aware rotation. Each behaviour is checked
//! against `--steer hash` as the control case.

use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support::*;

/// Whether this host lets the test load BPF programs; prints why the test skips if not.
fn bpf_possible() -> bool {
    let (possible, why) = bpf_steering();
    if !possible {
        eprintln!("skipped: no BPF steering here: {why}");
    }
    possible
}

/// `workers` workers of the eager app (tests/integration/apps/eager_app.py) on 127.0.0.1,
/// ready when listening, with `extra` options, once all are ready.
fn eager_cluster(workers: usize, extra: &[&str], env: &[(&str, &str)]) -> Cluster {
    app_cluster(
        &script("eager_app.py", PYTHON_EAGER_APP),
        workers,
        extra,
        env,
    )
}

/// The workers blocked in a handler's sleep (`GET /sleep/MS`), as (slot, pid) by slot.
fn sleeping_workers(c: &mut Cluster) -> Vec<(usize, u32)> {
    let mut found: Vec<(usize, u32)> = c
        .workers()
        .into_iter()
        .filter(|(_, pid)| {
            std::fs::read_to_string(format!("/proc/{pid}/wchan"))
                .is_ok_and(|w| w.contains("nanosleep"))
        })
        .collect();
    found.sort_unstable();
    found
}

fn workers_rotation(c: &Cluster) -> Vec<(u64, String)> {
    c.status()["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| {
            (
                w["slot"].as_u64().unwrap(),
                w["rotation"].as_str().unwrap_or("-").to_string(),
            )
        })
        .collect()
}

/// The program's map as (slot, in map, held) cookies.
fn steering_map(c: &Cluster) -> Vec<(u64, Option<u64>, Option<u64>)> {
    c.status()["steering_map"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["slot"].as_u64().unwrap(),
                e["in_map"].as_u64(),
                e["held"].as_u64(),
            )
        })
        .collect()
}

#[test]
fn steering_bpf_refuses_to_start_without_support_and_auto_falls_back_with_one_line() {
    // No capabilities at all (an empty bounding set): bpf(2) is refused.
    if std::process::Command::new("setpriv")
        .arg("--version")
        .output()
        .is_err()
    {
        return eprintln!("skipped: setpriv (util-linux) is not installed");
    }
    let drop_caps = ["setpriv", "--bounding-set", "-all", "--inh-caps", "-all"];
    let mut c = Cluster::spawn_wrapped(
        &drop_caps,
        &["--workers", "1", "--bind", "127.0.0.1:0", "--steer", "bpf"],
        &[],
    );
    assert_eq!(c.wait_exit(TIMEOUT), Some(1));
    let line = c
        .log()
        .into_iter()
        .find(|l| l.contains("--steer bpf"))
        .expect("an error line");
    assert!(line.contains("Operation not permitted"), "{line}");

    let mut c = Cluster::spawn_wrapped(
        &drop_caps,
        &[
            "--workers",
            "1",
            "--bind",
            "127.0.0.1:0",
            "--migrate",
            "off",
        ],
        &[],
    );
    c.expect_log("workers ready");
    let fallback: Vec<String> = c
        .log()
        .into_iter()
        .filter(|l| l.contains("steering:"))
        .collect();
    assert_eq!(fallback.len(), 1, "one line: {fallback:?}");
    assert!(
        fallback[0].contains("SO_REUSEPORT hash") && fallback[0].contains("not permitted"),
        "{fallback:?}"
    );
    let status = c.status();
    assert!(status["steering"].as_str().unwrap().starts_with("hash"));
    assert!(status["workers"][0]["rotation"].is_null());
    assert_eq!(get(c.addr()).unwrap().status, 200, "it runs as before");

    // Takeover off: nothing to steer with, whatever the privileges.
    let mut c = Cluster::spawn(
        &["--workers", "1", "--bind", "127.0.0.1:0", "--steer", "bpf"],
        &[("REUSEPORT_CLUSTER_TAKEOVER", "0")],
    );
    assert_eq!(c.wait_exit(TIMEOUT), Some(1));
    assert!(c.log_contains("--steer bpf: socket takeover is off"));
}

#[test]
fn steering_doctor_and_status_say_which_mode_runs() {
    if !bpf_possible() {
        return;
    }
    let c = Cluster::start(&["--workers", "2", "--bind", "127.0.0.1:0"]);
    assert!(
        !c.log_contains("steering:"),
        "auto with support: no fallback line"
    );
    let status = c.status();
    assert_eq!(status["steering"], "bpf");
    assert_eq!(
        workers_rotation(&c),
        vec![(0, "in".to_string()), (1, "in".to_string())]
    );
    let (_, text, _) = c.ctl(&["status"]);
    assert!(text.contains("steering: bpf"), "{text}");
    assert!(text.contains("ROTATION"), "{text}");

    let c = Cluster::start(&["--workers", "2", "--bind", "127.0.0.1:0", "--steer", "hash"]);
    assert_eq!(c.status()["steering"], "hash (--steer hash)");
    assert!(c.status()["steering_map"].as_array().unwrap().is_empty());
}

#[test]
fn steering_round_robin_without_parking_and_a_crashed_worker_leaves_no_lost_or_stale_map_entry() {
    crashed_worker_round_robin(&[("REUSEPORT_CLUSTER_PARK", "0")]);
}

/// The same with the parking socket (the default): its caps must not turn sequential traffic,
/// which never queues, away from a worker (they did: 12, 7 and 11 of 30 requests, the
/// replacement getting 7, in 10 of 40 runs; caps grew from each worker's own rate, smoothed up
/// from 0, and held while the master did not sample).
#[test]
fn steering_round_robin_with_parking_and_a_crashed_worker_leaves_no_lost_or_stale_map_entry() {
    crashed_worker_round_robin(&[]);
}

/// 3 workers under bpf steering (with `env`): 30 sequential requests spread 10 each, and
/// still after a worker is killed and replaced (3 times), after a rolling restart and a
/// scale-down; the program's socket map follows.
fn crashed_worker_round_robin(env: &[(&str, &str)]) {
    if !bpf_possible() {
        return;
    }
    let mut c = Cluster::spawn(
        &["--workers", "3", "--bind", "127.0.0.1:0", "--steer", "bpf"],
        env,
    );
    c.expect_log("workers ready");
    let map_is_right = |c: &Cluster, slots: u64| {
        let map = steering_map(c);
        map.len() as u64 == slots
            && map.iter().enumerate().all(|(i, (slot, in_map, held))| {
                *slot == i as u64 && in_map.is_some() && in_map == held
            })
    };
    assert!(map_is_right(&c, 3), "{:?}", steering_map(&c));
    let mut served = [0u32; 3];
    for _ in 0..30 {
        served[get(c.addr()).unwrap().worker()] += 1;
    }
    // Round robin (among the fewest outstanding), not a hash: 10 each, give or take what
    // a sample taken meanwhile shifts.
    assert!(served.iter().all(|n| *n >= 8), "{served:?}");

    for round in 0..3 {
        let before = c.workers();
        let victim = before[&1];
        signal(victim, Signal::SIGKILL);
        assert!(wait_until(TIMEOUT, || {
            c.workers().get(&1).is_some_and(|p| *p != victim)
                && workers_rotation(&c).iter().all(|(_, r)| r == "in")
        }));
        assert!(map_is_right(&c, 3), "round {round}: {:?}", steering_map(&c));
        let mut served = [0u32; 3];
        for _ in 0..30 {
            served[get(c.addr()).unwrap().worker()] += 1;
        }
        // Round robin among the fewest outstanding: the replacement's first few may
        // differ by one or two.
        assert!(served.iter().all(|n| *n >= 8), "round {round}: {served:?}");
    }

    // After a rolling restart with no traffic during it (every slot on a fresh socket),
    // every new worker gets its turn.
    c.signal(Signal::SIGHUP);
    c.expect_log("rolling restart to generation 2 done");
    let mut served = [0u32; 3];
    for _ in 0..30 {
        served[get(c.addr()).unwrap().worker()] += 1;
    }
    assert!(
        served.iter().all(|n| *n >= 8),
        "after a rolling restart: {served:?}"
    );

    // Scaled away: its entry goes with it.
    c.ctl(&["scale", "2"]);
    assert!(
        wait_until(TIMEOUT, || map_is_right(&c, 2)),
        "{:?}",
        steering_map(&c)
    );
    for _ in 0..20 {
        assert!(get(c.addr()).unwrap().worker() < 2);
    }
}

/// How [`stall`] stalls a worker.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Stalled {
    /// Worker 0 of the demo app is SIGSTOPped.
    Stopped,
    /// A worker of the eager app blocks in a 3 s synchronous handler (GET /sleep/3000).
    Sleeping,
}

/// 32 closed-loop clients (a new connection per request) on 4 workers, one of them stalled
/// as `how` says. `evacuate: false`: with REUSEPORT_CLUSTER_EVACUATE=0.
fn stall(steer: &str, evacuate: bool, how: Stalled) -> Stall {
    let mut env: Vec<(&str, &str)> = Vec::new();
    if !evacuate {
        env.push(("REUSEPORT_CLUSTER_EVACUATE", "0"));
    }
    let mut args = vec!["--workers", "4", "--bind", "127.0.0.1:0", "--steer", steer];
    let app = (how == Stalled::Sleeping).then(|| script("eager_app.py", PYTHON_EAGER_APP));
    if let Some(app) = &app {
        args.extend(["--ready", "listening", "--", app.to_str().unwrap()]);
    }
    let mut c = Cluster::spawn(&args, &env);
    c.expect_log("workers ready");
    let addr = c.addr();
    let t0 = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    // Per client: when its current request began (ms since t0 + 1), 0 between requests.
    let began: Arc<Vec<AtomicU64>> = Arc::new((0..32).map(|_| AtomicU64::new(0)).collect());
    let clients: Vec<_> = (0..32)
        .map(|i| {
            let (stop, ok, began) = (stop.clone(), ok.clone(), began.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    began[i].store(t0.elapsed().as_millis() as u64 + 1, Ordering::Relaxed);
                    if get(addr).is_ok_and(|r| r.status == 200) {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    began[i].store(0, Ordering::Relaxed);
                }
            })
        })
        .collect();
    assert!(wait_until(TIMEOUT, || ok.load(Ordering::Relaxed) > 500));
    let (slot, stalled) = match how {
        Stalled::Stopped => {
            let pid = c.workers()[&0];
            signal(pid, Signal::SIGSTOP);
            (0, pid)
        }
        Stalled::Sleeping => {
            std::thread::spawn(move || {
                let mut s = std::net::TcpStream::connect(addr).unwrap();
                let _ = s.write_all(b"GET /sleep/3000 HTTP/1.1\r\nHost: x\r\n\r\n");
                let _ = s.read(&mut [0u8; 512]);
            });
            // The sleeping worker is the one in nanosleep.
            let mut sleeping = None;
            wait_until(TIMEOUT, || {
                sleeping = sleeping_workers(&mut c).first().copied();
                sleeping.is_some()
            });
            let (slot, pid) = sleeping.expect("a worker sleeps");
            (slot as u64, pid)
        }
    };
    let stopped_at = Instant::now();
    let at_stop = ok.load(Ordering::Relaxed);
    // Until a second and a half has passed and either 1000 more requests were answered or
    // nothing moves any more (every client waits on the stopped worker).
    let mut last = (at_stop, Instant::now());
    wait_until(Duration::from_secs(10), || {
        let now = ok.load(Ordering::Relaxed);
        if now != last.0 {
            last = (now, Instant::now());
        }
        stopped_at.elapsed() > Duration::from_millis(1500)
            && (now - at_stop >= 1000 || last.1.elapsed() > Duration::from_millis(1000))
    });
    let answered = ok.load(Ordering::Relaxed) - at_stop;
    let now_ms = t0.elapsed().as_millis() as u64;
    let stuck = began
        .iter()
        .map(|b| b.load(Ordering::Relaxed))
        .filter(|b| *b != 0 && now_ms.saturating_sub(*b) > 1000)
        .count();
    let status = c.status();
    let w0 = status["workers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["slot"] == slot)
        .unwrap()
        .clone();
    let rotation = w0["rotation"].as_str().unwrap_or("-").to_string();
    let moved = (
        status["queues_moved"].as_u64().unwrap(),
        status["connections_moved"].as_u64().unwrap(),
    );
    let listen_max_ms = status["queue_move_listen_max_ms"].as_f64().unwrap();
    let queued = w0["queues"][0]["depth"].as_u64().unwrap();
    // Still stopped: the freeze of an evacuation never continues a worker it found stopped.
    let still_stopped = proc_state(stalled) == Some('T');
    let held = accepted_connections(stalled);
    if how == Stalled::Stopped {
        signal(stalled, Signal::SIGCONT);
    }
    if steer == "bpf" {
        assert!(
            wait_until(TIMEOUT, || workers_rotation(&c)
                .iter()
                .all(|(_, r)| r == "in")),
            "worker 0 returns once it drained: {:?}",
            workers_rotation(&c)
        );
    }
    stop.store(true, Ordering::Relaxed);
    for t in clients {
        t.join().unwrap();
    }
    // The stalled worker serves on: it was neither killed nor replaced.
    let same_worker = c.workers().get(&(slot as usize)) == Some(&stalled)
        && wait_until(TIMEOUT, || {
            get(addr).is_ok_and(|r| r.status == 200) && proc_state(stalled) != Some('T')
        });
    c.signal(Signal::SIGTERM);
    c.wait_exit(TIMEOUT);
    Stall {
        same_worker,
        stuck,
        held,
        queued,
        answered,
        rotation,
        still_stopped,
        moved,
        listen_max_ms,
    }
}

/// Sockets `pid` has open besides its listener at fd 3: what it accepted.
fn accepted_connections(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|fds| {
            fds.flatten()
                .filter(|e| e.file_name() != "3")
                .filter(|e| {
                    std::fs::read_link(e.path())
                        .is_ok_and(|t| t.to_string_lossy().starts_with("socket:["))
                })
                .count()
        })
        .unwrap_or(0)
}

/// What [`stall`] saw.
#[derive(Debug)]
struct Stall {
    /// Clients whose request has waited for over a second.
    stuck: usize,
    /// Connections the stalled worker had accepted and not answered (its socket fds but
    /// the listener at fd 3): no launcher can move those, and a worker of either app may
    /// hold a dozen of them when it stops.
    held: usize,
    /// Connections waiting in the stopped worker's accept queue (the rest of the stuck
    /// ones were accepted before it stopped).
    queued: u64,
    /// Requests answered by the others meanwhile.
    answered: u64,
    /// The stopped worker's rotation, from `status`.
    rotation: String,
    /// Whether it was still stopped at the end (nothing continued it).
    still_stopped: bool,
    /// Whether the same process still served the slot afterwards.
    same_worker: bool,
    /// `status`'s queues moved and connections moved.
    moved: (u64, u64),
    /// `status`'s slowest listen(2) of those moves.
    listen_max_ms: f64,
}

#[test]
fn load_steering_a_stalled_worker_leaves_the_rotation_and_its_queue_moves_to_the_others() {
    if !bpf_possible() {
        return;
    }
    let _load = load_lock();
    let bpf = stall("bpf", true, Stalled::Stopped);
    let kept = stall("bpf", false, Stalled::Stopped);
    let hash = stall("hash", true, Stalled::Stopped);
    println!(
        "one of 4 workers SIGSTOPped, 32 clients: bpf {bpf:?}; bpf without evacuation \
         {kept:?}; hash {hash:?}"
    );
    assert!(bpf.rotation.starts_with("out: not accepting"), "{bpf:?}");
    assert!(bpf.rotation.contains("moved to the others"), "{bpf:?}");
    assert!(bpf.answered >= 1000, "the others serve on: {bpf:?}");
    assert!(bpf.still_stopped, "the evacuation left it stopped: {bpf:?}");
    // Its queue moved: only what it had accepted before it stopped still waits over a
    // second (what reaches it in the few ms before it is noticed again after each hold-out
    // is moved 50 ms later; `queued` is whatever status caught of that).
    // (`held` is an upper bound: it also counts answered connections whose close the
    // stopped worker had not seen; the 2 are the probation's, see below.)
    assert!(bpf.stuck <= bpf.held + 2, "{bpf:?}");
    assert!(
        kept.queued >= 4 && kept.stuck > kept.held + 2,
        "control: without evacuation its queue waits for it ({kept:?})"
    );
    assert!(kept.rotation.starts_with("out: not accepting"), "{kept:?}");
    assert!(
        hash.stuck >= 28 && hash.answered < bpf.answered / 10,
        "control: with the hash every client ends up waiting on it ({hash:?})"
    );
    assert!(hash.queued > bpf.queued, "control: {hash:?}");
    assert!(bpf.same_worker && kept.same_worker, "{bpf:?} {kept:?}");
    assert!(
        bpf.moved.0 >= 1 && bpf.moved.1 >= 1,
        "status counts the moves: {bpf:?}"
    );
    assert!(
        bpf.listen_max_ms > 0.0 && kept.listen_max_ms == 0.0,
        "status shows what the moves' listen(2) took: {bpf:?} {kept:?}"
    );
    // Back in rotation after a move, the stopped worker is capped at 2 connections until it
    // accepts: the first move takes at most the 32 clients, each later one at most 2 (before
    // the cap a 5 ms share came back each time: 126 moved in 5 moves).
    assert!(
        bpf.moved.1 <= 32 + 2 * (bpf.moved.0 - 1),
        "a worker back after a move gets only the probation's 2: {bpf:?}"
    );
    assert_eq!(kept.moved, (0, 0), "{kept:?}");
}

/// A worker blocked in a synchronous handler is running, not stopped: moving its queue
/// stops it for a moment (an accept(2) between the master's shutdown and listen would
/// fail, and Python, like Node, treats that as fatal) and continues it. The queue moves,
/// the sleep goes on, and the same worker serves again afterwards, neither killed nor
/// left stopped.
#[test]
fn load_steering_the_queue_of_a_worker_blocked_in_a_handler_moves_and_the_worker_lives_on() {
    if !bpf_possible() {
        return;
    }
    let _load = load_lock();
    let bpf = stall("bpf", true, Stalled::Sleeping);
    let kept = stall("bpf", false, Stalled::Sleeping);
    println!(
        "one of 4 eager workers sleeps 3 s, 32 clients: bpf {bpf:?}; without evacuation {kept:?}"
    );
    assert!(bpf.rotation.contains("moved to the others"), "{bpf:?}");
    assert!(!bpf.still_stopped, "an evacuation left it stopped: {bpf:?}");
    assert!(bpf.same_worker, "it serves on: {bpf:?}");
    assert!(bpf.stuck <= bpf.held + 2 && bpf.answered >= 1000, "{bpf:?}");
    assert!(
        kept.queued >= 4 && kept.stuck > kept.held + 2,
        "control: without evacuation its queue waits for it ({kept:?})"
    );
}

/// 16 closed-loop new-connection clients on `workers` workers of the eager app while
/// `act` runs (it is shown the failures so far); (answered, failed).
fn eager_app_under_load(
    steer: &str,
    workers: usize,
    act: impl FnOnce(&mut Cluster, &AtomicU64),
) -> (u64, u64) {
    slow_eager_app_under_load(steer, workers, 5, act)
}

/// Like [`eager_app_under_load`], with each request taking `delay_ms` (inline: what the app
/// accepted waits that long per request ahead of it).
fn slow_eager_app_under_load(
    steer: &str,
    workers: usize,
    delay_ms: u64,
    act: impl FnOnce(&mut Cluster, &AtomicU64),
) -> (u64, u64) {
    let mut c = eager_cluster(
        workers,
        &["--grace", "10s", "--steer", steer],
        &[("DELAY_MS", &delay_ms.to_string())],
    );
    let addr = c.addr();
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let t0 = Instant::now();
    let clients: Vec<_> = (0..16)
        .map(|_| {
            let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let sent = t0.elapsed();
                    match get(addr) {
                        Ok(r) if r.status == 200 => ok.fetch_add(1, Ordering::Relaxed),
                        other => {
                            // Shown with the cluster's log when a test fails: when, and how.
                            eprintln!(
                                "request sent at {sent:?} failed at {:?}: {:?}",
                                t0.elapsed(),
                                other.map(|r| r.status)
                            );
                            failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                }
            })
        })
        .collect();
    assert!(wait_until(TIMEOUT, || ok.load(Ordering::Relaxed) > 100));
    act(&mut c, &failed);
    let now = ok.load(Ordering::Relaxed);
    assert!(wait_until(TIMEOUT, || ok.load(Ordering::Relaxed) > now + 100));
    stop.store(true, Ordering::Relaxed);
    for t in clients {
        t.join().unwrap();
    }
    (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed))
}

/// Rolling restarts of 2 workers of the eager app under load, `passes` of them, or with
/// `until_a_failure` up to `passes` until a request fails (a control: on a loaded machine a
/// pass may lose nothing by luck); (answered, failed, passes made).
fn rolls_of_an_eager_app(steer: &str, passes: u64, until_a_failure: bool) -> (u64, u64, u64) {
    let mut made = 0;
    let (ok, failed) = eager_app_under_load(steer, 2, |c, failed| {
        for g in 2..2 + passes {
            if until_a_failure && failed.load(Ordering::Relaxed) > 0 {
                break;
            }
            c.signal(Signal::SIGHUP);
            c.expect_log(&format!("rolling restart to generation {g} done"));
            made += 1;
        }
    });
    (ok, failed, made)
}

/// Scales 4 workers of the eager app down to 1, one at a time, under load.
fn scale_downs_of_an_eager_app(steer: &str) -> (u64, u64) {
    eager_app_under_load(steer, 4, |c, _| {
        for n in (1..4).rev() {
            c.ctl(&["scale", &n.to_string()]);
            assert!(wait_until(TIMEOUT, || c.worker_count() == n));
        }
    })
}

#[test]
fn load_steering_scale_downs_of_a_server_that_drops_unread_connections_lose_nothing() {
    if !bpf_possible() {
        return;
    }
    let _load = load_lock();
    let (bpf_ok, bpf_failed) = scale_downs_of_an_eager_app("bpf");
    // The control, again (up to 3 runs) while it loses nothing by luck on a loaded machine.
    let (mut hash_ok, mut hash_failed) = (0, 0);
    for _ in 0..3 {
        let (ok, failed) = scale_downs_of_an_eager_app("hash");
        (hash_ok, hash_failed) = (hash_ok + ok, hash_failed + failed);
        if hash_failed > 0 {
            break;
        }
    }
    println!(
        "4 workers of an eager app scaled down to 1: bpf {bpf_failed} failed of {}, hash \
         {hash_failed} failed of {}",
        bpf_ok + bpf_failed,
        hash_ok + hash_failed
    );
    assert_eq!(bpf_failed, 0, "drained before stop");
    assert!(
        hash_failed > 0,
        "control: with the hash the removed worker is stopped with accepted, unread connections"
    );
}

#[test]
fn load_steering_rolling_restarts_of_a_server_that_drops_unread_connections_lose_nothing() {
    if !bpf_possible() {
        return;
    }
    let _load = load_lock();
    let (bpf_ok, bpf_failed, _) = rolls_of_an_eager_app("bpf", 4, false);
    let (hash_ok, hash_failed, hash_passes) = rolls_of_an_eager_app("hash", 16, true);
    println!(
        "rolling restarts of 2 workers of an eager app: bpf 4 passes, {bpf_failed} failed of {}; \
         hash {hash_passes} passes, {hash_failed} failed of {}",
        bpf_ok + bpf_failed,
        hash_ok + hash_failed
    );
    assert_eq!(bpf_failed, 0, "drained before stop");
    assert!(
        hash_failed > 0,
        "control: with the hash the old worker is stopped with accepted, unread connections"
    );
}

/// An eager server whose requests take 40 ms has up to 16 × 40 ms of accepted, unread
/// connections when its socket leaves the rotation: its queue is empty long before it has
/// read them. The old worker is stopped only once it has (sockets/diag.rs); stopped after a
/// fixed settle time instead, it closed them unanswered.
#[test]
fn load_steering_a_slow_eager_server_is_stopped_only_once_it_has_read_what_it_accepted() {
    if !bpf_possible() {
        return;
    }
    let _load = load_lock();
    let (ok, failed) = slow_eager_app_under_load("bpf", 2, 40, |c, _| {
        for g in 2..4 {
            c.signal(Signal::SIGHUP);
            c.expect_log(&format!("rolling restart to generation {g} done"));
        }
    });
    println!(
        "2 rolling restarts of 2 workers of an eager app, 40 ms a request: {failed} failed of {}",
        ok + failed
    );
    assert_eq!(failed, 0);
}

/// A worker that does not accept while it drains (Puma with every thread held by a keep-alive
/// client; here an app that stops accepting while 2 connections are open) would keep what is
/// queued on its old socket until the drain's 10 s timeout. It is stopped once its queue has
/// not moved for 500 ms, and the program moves the queue to the new worker when the socket
/// closes: the queued requests are answered within seconds.
#[test]
fn steering_a_worker_that_stops_accepting_while_it_drains_is_stopped_and_its_queue_moves() {
    stuck_drain(&[("MAX_OPEN", "2")], Duration::from_secs(8));
}

/// The same, with an app that keeps its listener open for 6 s after the stop signal (as Puma
/// does until its threads are done): the master shuts the old socket down itself, so the
/// queue moves at once, not when the app closes it.
#[test]
fn steering_a_stuck_drain_moves_the_queue_even_while_the_app_keeps_its_listener_open() {
    stuck_drain(
        &[("MAX_OPEN", "2"), ("LINGER_MS", "6000")],
        Duration::from_secs(4),
    );
}

/// A rolling restart of an app that stopped accepting with 3 requests queued behind 2 idle
/// connections: each request is answered within `within`.
fn stuck_drain(env: &[(&str, &str)], within: Duration) {
    if !bpf_possible() {
        return;
    }
    let mut c = eager_cluster(1, &["--steer", "bpf"], env);
    let addr = c.addr();
    // Two idle connections fill the app; the requests after them wait in its queue.
    let idle: Vec<_> = (0..2)
        .map(|_| std::net::TcpStream::connect(addr).unwrap())
        .collect();
    assert!(wait_until(TIMEOUT, || queue_of(&c, 0) == 0));
    let queued: Vec<_> = (0..3)
        .map(|_| {
            std::thread::spawn(move || {
                let started = Instant::now();
                (get(addr).map(|r| r.status), started.elapsed())
            })
        })
        .collect();
    assert!(
        wait_until(TIMEOUT, || queue_of(&c, 0) == 3),
        "the 3 requests wait in the full worker's queue"
    );
    c.signal(Signal::SIGHUP);
    c.expect_log("rolling restart to generation 2 done");
    for t in queued {
        let (status, took) = t.join().unwrap();
        assert_eq!(status.ok(), Some(200), "answered by the new worker");
        assert!(
            took < within,
            "answered within {within:?}, long before the drain's 10 s timeout: {took:?}"
        );
    }
    c.expect_log("accepts nothing from its old socket");
    drop(idle);
}

/// The accept queue of `slot`'s worker, from `status --json`.
fn queue_of(c: &Cluster, slot: u64) -> u64 {
    c.status()["workers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["slot"] == slot)
        .and_then(|w| w["queues"][0]["depth"].as_u64())
        .unwrap_or(u64::MAX)
}

/// What [`every_worker_blocked`] saw.
#[derive(Debug)]
struct AllBlocked {
    /// The slot of the worker blocked 4 s.
    long_sleeper: usize,
    /// Per connection, the slot that answered and when.
    answers: Vec<(String, Duration)>,
    /// The most `status` showed parked, and the workers' queues then.
    parked: u64,
    queued: u64,
}

/// Both workers of the eager app blocked in a handler, one for 4 s and one for 1 s, then 16
/// new connections. `park`: with the parking socket (`REUSEPORT_CLUSTER_PARK=1`; `0`
/// otherwise, whatever the default).
fn every_worker_blocked(park: bool) -> AllBlocked {
    let env: &[(&str, &str)] = match park {
        true => &[("REUSEPORT_CLUSTER_PARK", "1")],
        false => &[("REUSEPORT_CLUSTER_PARK", "0")],
    };
    let mut c = eager_cluster(2, &["--steer", "bpf"], env);
    let addr = c.addr();
    let sleep = |ms: u64| {
        std::thread::spawn(move || {
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            let request = format!("GET /sleep/{ms} HTTP/1.1\r\nHost: x\r\n\r\n");
            let _ = s.write_all(request.as_bytes());
            let _ = s.read(&mut [0u8; 512]);
        })
    };
    let long = sleep(4000);
    let mut first = Vec::new();
    assert!(wait_until(TIMEOUT, || {
        first = sleeping_workers(&mut c);
        first.len() == 1
    }));
    let long_sleeper = first[0].0;
    let short = sleep(1000);
    assert!(
        wait_until(Duration::from_millis(900), || sleeping_workers(&mut c)
            .len()
            == 2),
        "the second sleep reaches the other worker"
    );
    let t0 = Instant::now();
    let clients: Vec<_> = (0..16)
        .map(|_| {
            std::thread::spawn(move || {
                let r = get_within(addr, Duration::from_secs(10)).expect("an answer");
                let slot = r.headers.get("x-worker").cloned().unwrap_or_default();
                (slot, t0.elapsed())
            })
        })
        .collect();
    // While both still sleep: where do the 16 wait?
    let (mut parked, mut queued) = (0, 0);
    wait_until(Duration::from_millis(700), || {
        let status = c.status();
        let now = status["parked"].as_u64().unwrap();
        if now >= parked {
            parked = now;
            queued = status["workers"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|w| w["queues"][0]["depth"].as_u64())
                .sum();
        }
        parked >= 16
    });
    let answers: Vec<(String, Duration)> = clients.into_iter().map(|t| t.join().unwrap()).collect();
    long.join().unwrap();
    short.join().unwrap();
    // Every handshake here completes: no parking socket waited for one in vain.
    assert_eq!(
        c.status()["parking_sockets_closed_unfinished"].as_u64(),
        Some(0)
    );
    AllBlocked {
        long_sleeper,
        answers,
        parked,
        queued,
    }
}

#[test]
fn load_steering_while_every_worker_is_blocked_new_connections_wait_for_the_first_one_free() {
    if !bpf_possible() {
        return;
    }
    let _load = load_lock();
    let long_waits = |r: &AllBlocked| {
        r.answers
            .iter()
            .filter(|(slot, _)| *slot == r.long_sleeper.to_string())
            .count()
    };
    let parked = every_worker_blocked(true);
    println!("parking: {parked:?}");
    assert_eq!(parked.answers.len(), 16);
    assert_eq!(
        (parked.parked, parked.queued),
        (16, 0),
        "all 16 wait in the parking socket, none on a blocked worker: {parked:?}"
    );
    assert_eq!(
        long_waits(&parked),
        0,
        "none waits for the worker blocked longest: {parked:?}"
    );
    let unparked = every_worker_blocked(false);
    println!("no parking: {unparked:?}");
    assert!(
        unparked.parked == 0 && unparked.queued > 0,
        "control: without the parking socket they wait on the blocked workers' sockets \
         ({unparked:?})"
    );
}
