//! The master never blocks, never loses a process, never dies of a stray signal (issue 9).

use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::*;

/// Runs a client request against the control socket at `control`, giving up after `limit`.
fn ctl_within(control: &Path, args: &[&str], limit: Duration) -> Option<String> {
    let mut child = Command::new(bin())
        .args(args)
        .arg("--control")
        .arg(control)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    if !wait_until(limit, || child.try_wait().unwrap().is_some()) {
        let _ = child.kill();
        let _ = child.wait();
        return None;
    }
    let out = child.wait_with_output().unwrap();
    Some(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// One control request over the socket, with a time limit for the answer.
fn request(control: &Path, line: &str, limit: Duration) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut stream = std::os::unix::net::UnixStream::connect(control)?;
    stream.set_read_timeout(Some(limit))?;
    stream.write_all(format!("{line}\n").as_bytes())?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    Ok(answer)
}

/// Kills a master started by hand, and its workers, however the test ended.
struct Master(Child, Vec<u32>);

impl Drop for Master {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        for pid in &self.1 {
            kill_group(*pid);
        }
    }
}

fn worker_pids(master: u32) -> Vec<u32> {
    children(master)
        .into_iter()
        .filter(|p| env_of(*p).contains_key("REUSEPORT_CLUSTER_WORKER"))
        .collect()
}

/// Issue 9, item 3: stderr is a FIFO whose reader never reads; the master keeps supervising.
#[test]
fn a_log_reader_that_never_reads_does_not_freeze_the_master() {
    let dir = temp_dir("stuck-log");
    let fifo = dir.join("log.fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    // The reader: opened, never read. Opened non-blocking so that the open does not wait.
    let reader: OwnedFd = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags_nonblock()
        .open(&fifo)
        .unwrap()
        .into();
    let writer = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
    // The smallest pipe there is, so that a few lines fill it.
    nix::fcntl::fcntl(&writer, nix::fcntl::FcntlArg::F_SETPIPE_SZ(4096)).unwrap();
    let control = dir.join("c.sock");
    let child = Command::new(bin())
        .args(["--control", control.to_str().unwrap()])
        .args([
            "--bind",
            "127.0.0.1:0",
            "--workers",
            "2",
            "--ready",
            "delay:20ms",
        ])
        .args(["--grace", "2s", "--", "sleep", "1000"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(writer)
        .spawn()
        .unwrap();
    let mut master = Master(child, Vec::new());
    let pid = master.0.id();
    assert!(
        wait_until(TIMEOUT, || worker_pids(pid).len() == 2),
        "two workers start"
    );
    // Hundreds of reloads and scale requests: far more log lines than the pipe holds.
    for i in 0..40 {
        let n = if i % 2 == 0 { 3 } else { 2 };
        let answer = request(&control, &format!("scale {n}"), Duration::from_secs(5));
        assert!(
            answer.as_deref().is_ok_and(|a| a.starts_with("ok")),
            "scale request {i} answered: {answer:?}"
        );
    }
    for _ in 0..500 {
        signal(pid, Signal::SIGHUP);
    }
    let started = Instant::now();
    let status = ctl_within(&control, &["status"], Duration::from_secs(5));
    assert!(
        status.as_deref().is_some_and(|s| s.contains("workers")),
        "status answers while the log pipe is full: {status:?}"
    );
    eprintln!("status answered in {:?}", started.elapsed());
    // A SIGKILLed worker is reaped and replaced (once the reloads are through).
    let settled = wait_until(TIMEOUT, || {
        ctl_within(&control, &["status", "--json"], Duration::from_secs(5))
            .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
            .is_some_and(|s| s["rolling_restart"].is_null() && s["workers_ready"] == 2)
    });
    assert!(settled, "the reloads finish while the log pipe is full");
    let victim = worker_pids(pid)[0];
    master.1.push(victim);
    signal(victim, Signal::SIGKILL);
    assert!(
        wait_until(Duration::from_secs(10), || {
            let now = worker_pids(pid);
            now.len() == 2 && !now.contains(&victim) && !alive(victim)
        }),
        "the killed worker is reaped and replaced"
    );
    master.1.extend(worker_pids(pid));
    signal(pid, Signal::SIGTERM);
    let stopped = wait_until(Duration::from_secs(10), || {
        master.0.try_wait().unwrap().is_some()
    });
    assert!(
        stopped,
        "SIGTERM stops the master while its log pipe is full; it waits in {:?}, children {:?}",
        std::fs::read_to_string(format!("/proc/{pid}/wchan")),
        children(pid)
    );
    drop(reader);
}

trait NonBlock {
    fn custom_flags_nonblock(&mut self) -> &mut Self;
}

impl NonBlock for std::fs::OpenOptions {
    fn custom_flags_nonblock(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.custom_flags(nix::libc::O_NONBLOCK)
    }
}

/// A drain script: on SIGTERM it takes 1.5 s, then writes "drained" to $MARKER.
const DRAIN_SH: &str = r#"#!/bin/sh
trap 'sleep 1.5; echo drained > "$MARKER"; exit 0' TERM
while :; do sleep 0.1; done
"#;

fn npm_installed() -> bool {
    let ok = Command::new("npm")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("skipped: npm is not installed (scripts/install-test-deps.sh installs node)");
    }
    ok
}

/// Issue 9, item 1: the leader of the worker's group (`sh -c`) exits at once on SIGTERM;
/// the drain it started still gets the grace.
#[test]
fn a_wrapper_that_exits_first_does_not_cut_the_drain_short() {
    let dir = temp_dir("wrapper-drain");
    let drain = script("drain.sh", DRAIN_SH);
    let marker = dir.join("marker");
    let cmd = format!("sh -c '{}; echo done'", drain.display());
    let mut c = Cluster::spawn(
        &[
            "--bind",
            "127.0.0.1:0",
            "--workers",
            "1",
            "--ready",
            "delay:100ms",
            "--grace",
            "10s",
            "--cmd",
            &cmd,
        ],
        &[("MARKER", marker.to_str().unwrap())],
    );
    c.expect_log("workers ready");
    let started = Instant::now();
    c.signal(Signal::SIGTERM);
    assert_eq!(c.wait_exit(TIMEOUT), Some(0), "a clean stop");
    let took = started.elapsed();
    assert_eq!(
        std::fs::read_to_string(&marker).ok().as_deref(),
        Some("drained\n"),
        "the drain finished; log:\n{}",
        c.log().join("\n")
    );
    assert!(
        took >= Duration::from_millis(1400),
        "the master waited for the drain: {took:?}"
    );
    eprintln!("stop took {took:?} (drain 1.5 s, grace 10 s)");
}

/// Issue 9, item 1, with `npm start`: npm exits on SIGTERM, node drains.
#[test]
fn npm_start_drains_within_grace() {
    if !npm_installed() {
        return;
    }
    let dir = temp_dir("npm-drain");
    std::fs::write(
        dir.join("package.json"),
        r#"{"name":"drain","version":"1.0.0","scripts":{"start":"node server.js"}}"#,
    )
    .unwrap();
    std::fs::write(
        dir.join("server.js"),
        "process.on('SIGTERM', () => setTimeout(() => {\n\
         require('fs').writeFileSync(process.env.MARKER, 'drained');\n\
         process.exit(0);\n}, 1500));\nsetInterval(() => {}, 1000);\n\
         require('fs').writeFileSync(process.env.MARKER + '.up', 'up');\n",
    )
    .unwrap();
    let marker = dir.join("marker");
    let cmd = format!("sh -c 'cd {} && exec npm start'", dir.display());
    let mut c = Cluster::spawn(
        &[
            "--bind",
            "127.0.0.1:0",
            "--workers",
            "1",
            "--ready",
            "delay:1s",
            "--grace",
            "10s",
            "--cmd",
            &cmd,
        ],
        &[("MARKER", marker.to_str().unwrap())],
    );
    c.expect_log("workers ready");
    // Under load npm may take longer than the 1 s delay to start the app: a SIGTERM before
    // the app's handler is in place kills it at once (Node's default).
    let up = dir.join("marker.up");
    assert!(wait_until(TIMEOUT, || up.exists()), "the app started");
    c.signal(Signal::SIGTERM);
    assert_eq!(c.wait_exit(TIMEOUT), Some(0), "a clean stop");
    assert_eq!(
        std::fs::read_to_string(&marker).ok().as_deref(),
        Some("drained"),
        "node drained; log:\n{}",
        c.log().join("\n")
    );
}

/// Issue 9, item 1: rolling restarts of node behind a launcher script under load lose
/// nothing (node finishes what it accepted after the script is gone). Not `npm start`: npm
/// passes its child only fds 0-2, so an app under npm cannot take the socket at fd 3.
#[test]
fn load_rolling_restarts_behind_a_wrapper_script_lose_no_request() {
    let _load = load_lock();
    if !npm_installed() || !migration_possible() {
        return;
    }
    let dir = temp_dir("wrapper-roll");
    // Answers after 20 ms, so that requests are in flight when the stop signal comes; on
    // SIGTERM it stops listening and exits once every connection is done.
    std::fs::write(
        dir.join("server.js"),
        "const http = require('http');\n\
         const worker = process.env.REUSEPORT_CLUSTER_WORKER;\n\
         const server = http.createServer((q, r) => setTimeout(() => {\n\
           r.setHeader('Connection', 'close'); r.end('worker ' + worker + '\\n'); }, 20));\n\
         server.listen({ fd: 3 });\n\
         process.on('SIGTERM', () => { server.close(() => process.exit(0)); server.closeIdleConnections(); });\n",
    )
    .unwrap();
    // `; exit` keeps sh from exec'ing node: sh leads the group and exits first on SIGTERM.
    let cmd = format!("sh -c 'node {}/server.js; exit'", dir.display());
    let stats = crate::rolling::rolling_restarts_under_load(
        &[
            "--workers",
            "4",
            "--bind",
            "127.0.0.1:0",
            "--ready",
            "listening",
            "--grace",
            "10s",
            "--cmd",
            &cmd,
        ],
        &[],
    );
    assert!(stats.ok > 100, "the load ran: {stats:?}");
    assert_eq!(stats.failed, 0, "failed requests: {:?}", stats.errors);
}

/// Issue 9, item 2: a process that left the worker's group (setsid) is stopped with the
/// worker, and nothing holds the port after the master exits.
#[test]
fn processes_that_leave_the_group_are_stopped_with_their_worker() {
    let tag = unique_tag("setsid");
    let mut c = Cluster::spawn(
        &[
            "--bind",
            "127.0.0.1:0",
            "--workers",
            "1",
            "--ready",
            "delay:100ms",
            "--grace",
            "3s",
            "--cmd",
            "sh -c 'setsid sleep 77 & sleep 1000'",
        ],
        &[("RC_TEST_TAG", &tag)],
    );
    c.expect_log("workers ready");
    let port = c.addr().port();
    let master = c.pid();
    let of_workers = || -> Vec<u32> {
        let mut pids = tagged_processes(&tag);
        pids.retain(|p| *p != master);
        pids
    };
    assert!(
        wait_until(TIMEOUT, || of_workers().len() == 3),
        "sh, sleep 77 and sleep 1000 run: {:?}",
        of_workers()
    );
    let first = of_workers();
    let worker = c.workers()[&0];
    signal(worker, Signal::SIGKILL);
    let gone = wait_until(Duration::from_secs(10), || first.iter().all(|p| !alive(*p)));
    let left: Vec<u32> = first.iter().copied().filter(|p| alive(*p)).collect();
    assert!(
        gone,
        "every process of the killed worker ends, in its group or not; left: {left:?}; log:\n{}",
        c.log().join("\n")
    );
    assert!(
        wait_until(TIMEOUT, || of_workers().len() == 3),
        "the replacement runs"
    );
    c.signal(Signal::SIGTERM);
    assert_eq!(c.wait_exit(TIMEOUT), Some(0));
    assert_eq!(
        tagged_processes(&tag),
        Vec::<u32>::new(),
        "nothing outlives the master"
    );
    assert_eq!(
        listening_inodes(port),
        Vec::<u64>::new(),
        "nothing listens on the port"
    );
}

/// GET /metrics on a fresh connection: the status line, within `limit`.
fn scrape_status(addr: &str, limit: Duration) -> String {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return "connect failed".into();
    };
    s.set_read_timeout(Some(limit)).unwrap();
    let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    answer.lines().next().unwrap_or("no answer").to_string()
}

/// Issue 9, item 8: 64 idle connections do not keep scrapes out (today's limit was 8).
#[test]
fn idle_connections_do_not_blind_the_metrics_endpoint() {
    let addr = format!("127.0.0.1:{}", free_port());
    let mut c = Cluster::start(&[
        "--workers",
        "1",
        "--bind",
        "127.0.0.1:0",
        "--metrics",
        &addr,
        "--ready",
        "delay:10ms",
        "--",
        "sleep",
        "1000",
    ]);
    c.expect_log("metrics at");
    // Control: a scrape is answered.
    assert_eq!(
        scrape_status(&addr, Duration::from_secs(2)),
        "HTTP/1.1 200 OK"
    );
    let idle: Vec<std::net::TcpStream> = (0..64)
        .map(|_| std::net::TcpStream::connect(&addr).unwrap())
        .collect();
    let started = Instant::now();
    for i in 0..5 {
        assert_eq!(
            scrape_status(&addr, Duration::from_secs(2)),
            "HTTP/1.1 200 OK",
            "scrape {i} with {} idle connections open",
            idle.len()
        );
    }
    eprintln!(
        "5 scrapes beside 64 idle connections took {:?}",
        started.elapsed()
    );
}

/// Issue 9, item 9: a request without its newline, then a half-close, is answered.
#[test]
fn a_request_ended_by_a_half_close_is_answered() {
    use std::io::{Read, Write};
    let c = Cluster::start(&[
        "--workers",
        "1",
        "--bind",
        "127.0.0.1:0",
        "--ready",
        "delay:10ms",
        "--",
        "sleep",
        "1000",
    ]);
    let mut s = std::os::unix::net::UnixStream::connect(c.control.as_ref().unwrap()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"status").unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    assert!(answer.contains("workers ready"), "answer: {answer:?}");
}

/// A python3 app that on SIGTERM takes 1 s, then exits 0.
const SLOW_STOP_APP: &str = r#"#!/usr/bin/env python3
import signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: (time.sleep(1), sys.exit(0)))
while True:
    time.sleep(1000)
"#;

/// Issue 9, item 6: `stop`, then the service manager's SIGTERM, is one graceful stop (exit 0,
/// no SIGKILL); a second Ctrl-C still forces it (exit 3).
#[test]
fn a_repeated_stop_request_does_not_escalate_but_a_second_ctrl_c_does() {
    let app = script("slow_stop.py", SLOW_STOP_APP);
    let args = [
        "--workers",
        "2",
        "--bind",
        "127.0.0.1:0",
        "--ready",
        "delay:300ms",
        "--grace",
        "10s",
        "--cmd",
        app.to_str().unwrap(),
    ];
    let mut c = Cluster::start(&args);
    let (code, out, err) = c.ctl(&["stop"]);
    assert_eq!(code, Some(0), "{out}{err}");
    c.signal(Signal::SIGTERM);
    std::thread::sleep(Duration::from_millis(100)); // the SIGTERM must come during the stop
    c.signal(Signal::SIGTERM);
    assert_eq!(
        c.wait_exit(TIMEOUT),
        Some(0),
        "log:\n{}",
        c.log().join("\n")
    );
    assert!(!c.log_contains("SIGKILL"), "log:\n{}", c.log().join("\n"));

    // Control: a deliberate second Ctrl-C escalates.
    let mut c = Cluster::start(&args);
    c.signal(Signal::SIGINT);
    c.expect_log("stopping 2 workers");
    std::thread::sleep(Duration::from_millis(600));
    c.signal(Signal::SIGINT);
    assert_eq!(
        c.wait_exit(TIMEOUT),
        Some(3),
        "log:\n{}",
        c.log().join("\n")
    );
    assert!(c.log_contains("second Ctrl-C"));
}

/// Issue 9, item 7: `--control` never truncates or creates a file it then refuses, and a
/// clean stop removes the lock file.
#[test]
fn control_paths_are_checked_before_any_file_is_touched() {
    let dir = temp_dir("control-path");
    // A typo naming a file of the user's: its sibling `notes.lock` is not ours to truncate.
    let notes = dir.join("notes.txt");
    std::fs::write(dir.join("notes.lock"), "keep me\n").unwrap();
    let mut c = Cluster::start(&[
        "--control",
        notes.to_str().unwrap(),
        "--workers",
        "1",
        "--bind",
        "127.0.0.1:0",
        "--ready",
        "delay:10ms",
        "--",
        "sleep",
        "1000",
    ]);
    assert_eq!(
        std::fs::read_to_string(dir.join("notes.lock")).unwrap(),
        "keep me\n",
        "an unrelated file is left alone"
    );
    assert!(dir.join("notes.txt.lock").exists(), "the lock is PATH.lock");
    c.signal(Signal::SIGTERM);
    assert_eq!(c.wait_exit(TIMEOUT), Some(0));
    assert!(
        !dir.join("notes.txt.lock").exists(),
        "a clean stop removes the lock file"
    );
    assert!(!notes.exists(), "and the socket");

    // A regular file at the path is refused, and no lock file appears next to it.
    let hostname = dir.join("hostname");
    std::fs::write(&hostname, "myhost\n").unwrap();
    let (code, err) = run(&[
        "--control",
        hostname.to_str().unwrap(),
        "--workers",
        "1",
        "--bind",
        "127.0.0.1:0",
        "--",
        "sleep",
        "1000",
    ]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("not a socket"), "{err}");
    assert!(
        !dir.join("hostname.lock").exists(),
        "no lock file for a refused path"
    );
    assert_eq!(std::fs::read_to_string(&hostname).unwrap(), "myhost\n");

    // A file at the lock path that is not a lock file is refused, untouched.
    std::fs::write(dir.join("c.lock"), "precious\n").unwrap();
    let (code, err) = run(&[
        "--control",
        dir.join("c.sock").to_str().unwrap(),
        "--workers",
        "1",
        "--bind",
        "127.0.0.1:0",
        "--",
        "sleep",
        "1000",
    ]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("not a lock file"), "{err}");
    assert_eq!(
        std::fs::read_to_string(dir.join("c.lock")).unwrap(),
        "precious\n"
    );
}

/// Issue 9, item 5: the signals people and tools send by habit leave the cluster running.
#[test]
fn habitual_signals_do_not_take_the_cluster_down() {
    let mut c = Cluster::start(&[
        "--workers",
        "2",
        "--bind",
        "127.0.0.1:0",
        "--ready",
        "delay:10ms",
        "--",
        "sleep",
        "1000",
    ]);
    let before = c.workers();
    for sig in [
        Signal::SIGUSR1,
        Signal::SIGUSR2,
        Signal::SIGWINCH,
        Signal::SIGPIPE,
        Signal::SIGALRM,
    ] {
        c.signal(sig);
        assert!(
            !wait_until(Duration::from_millis(200), || c.exited()),
            "the master survives {sig}; log:\n{}",
            c.log().join("\n")
        );
    }
    c.expect_log("SIGUSR1: nothing to reopen");
    c.expect_log("SIGALRM ignored");
    assert_eq!(c.status()["workers_ready"], 2);
    assert_eq!(
        c.workers(),
        before,
        "the workers were not touched (USR1 is not forwarded)"
    );
}

/// Runs the master as a background job of a terminal with `stty tostop`: its writes to the
/// terminal make the kernel send it SIGTTOU. Prints nothing; the terminal's output is read
/// (and dropped) so that it never fills.
const BACKGROUND_JOB: &str = r#"#!/usr/bin/env python3
import os, pty, sys, termios
pid, fd = pty.fork()
if pid == 0:
    attrs = termios.tcgetattr(1)
    attrs[3] |= termios.TOSTOP
    termios.tcsetattr(1, termios.TCSANOW, attrs)
    job = os.fork()
    if job == 0:
        os.setpgid(0, 0)  # a background process group of this terminal
        os.execv(sys.argv[1], sys.argv[1:])
    os.waitpid(job, 0)
    os._exit(0)
while True:
    try:
        if not os.read(fd, 65536):
            break
    except OSError:
        break
"#;

/// Issue 9, item 5: kernel SIGTTOU (a background write with `tostop`) neither spins the
/// master nor scales it down; SIGTTIN/SIGTTOU sent with kill(2) still scale.
#[test]
fn terminal_job_control_signals_are_not_scale_requests() {
    let dir = temp_dir("tostop");
    let job = script("job.py", BACKGROUND_JOB);
    let control = dir.join("c.sock");
    let child = Command::new(&job)
        .arg(bin())
        .args(["--control", control.to_str().unwrap()])
        .args([
            "--workers",
            "2",
            "--bind",
            "127.0.0.1:0",
            "--ready",
            "delay:10ms",
        ])
        .args(["--", "sleep", "1000"])
        .stdin(Stdio::null())
        .process_group(0)
        .spawn()
        .unwrap();
    let harness = child.id();
    let mut guard = Master(child, vec![harness]);
    assert!(
        wait_until(TIMEOUT, || control.exists()),
        "the master opens its control socket"
    );
    let status = || {
        ctl_within(&control, &["status", "--json"], Duration::from_secs(5))
            .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
    };
    // harness -> session leader -> master (in its own process group, a background job's)
    let master = children(harness)
        .first()
        .and_then(|leader| children(*leader).first().copied())
        .expect("the master runs under the terminal's session leader");
    guard.1.push(master);
    let first = status().expect("status answers while the master writes to its terminal");
    assert_eq!(first["master_pid"], master);
    assert!(
        wait_until(Duration::from_secs(5), || status()
            .is_some_and(|s| s["workers_ready"] == 2)),
        "both workers run"
    );
    let cpu = |pid: u32| -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
        fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
    };
    let before = cpu(master);
    std::thread::sleep(Duration::from_secs(1)); // measuring CPU use over a second
    let used = cpu(master) - before;
    eprintln!("master CPU over 1 s: {used} ticks");
    assert!(
        used < 20,
        "the master does not spin: {used} ticks of 100 in 1 s"
    );
    assert_eq!(
        status().unwrap()["workers_configured"],
        2,
        "the kernel's SIGTTOU is no scale request"
    );
    // Control: the same signal sent with kill(2) is one.
    signal(master, Signal::SIGTTIN);
    assert!(
        wait_until(Duration::from_secs(5), || status()
            .is_some_and(|s| s["workers_configured"] == 3)),
        "kill -TTIN adds a worker"
    );
    signal(master, Signal::SIGTERM);
    assert!(wait_until(TIMEOUT, || !alive(master)), "SIGTERM stops it");
}

/// Issue 9, item 4: 2 000 oversized datagrams from another user to the notify socket do not
/// reach the log.
#[test]
fn a_notify_flood_from_another_user_does_not_reach_the_log() {
    let app = script("http_app.py", PYTHON_HTTP_APP);
    let mut c = Cluster::start(&[
        "--workers",
        "1",
        "--bind",
        "127.0.0.1:0",
        "--ready",
        "notify",
        "--cmd",
        app.to_str().unwrap(),
    ]);
    let worker = c.workers()[&0];
    let socket = env_of(worker)["NOTIFY_SOCKET"].clone();
    let flood = format!(
        "import os, socket\n\
         os.setgid(65534); os.setuid(65534)\n\
         s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\n\
         addr = '\\0' + {:?}[1:]\n\
         sent = 0\n\
         for _ in range(2000):\n\
         \x20   try:\n\
         \x20       s.sendto(b'X' * 5000, addr); sent += 1\n\
         \x20   except BlockingIOError:\n\
         \x20       pass\n\
         print(sent)\n",
        socket
    );
    let out = Command::new("python3")
        .arg("-c")
        .arg(&flood)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!(
        "datagrams sent: {}",
        String::from_utf8_lossy(&out.stdout).trim()
    );
    // The master reads them all (and answers meanwhile).
    assert_eq!(c.status()["workers_ready"], 1);
    std::thread::sleep(Duration::from_millis(300)); // let it drain what is queued
    assert_eq!(c.status()["workers_ready"], 1);
    let noisy = c
        .log()
        .iter()
        .filter(|l| l.contains("notify message"))
        .count();
    assert_eq!(noisy, 0, "log:\n{}", c.log().join("\n"));
}

/// Issue 9, item 10: `--user` workers get the user's HOME, USER and LOGNAME.
#[test]
fn user_workers_get_the_users_home_and_name() {
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
    let mut c = Cluster::start(&[
        "--user",
        "nobody",
        "--workers",
        "1",
        "--bind",
        "127.0.0.1:0",
        "--ready",
        "delay:10ms",
        "--",
        "sleep",
        "1000",
    ]);
    let env = env_of(c.workers()[&0]);
    assert_eq!(env.get("HOME").map(String::as_str), nobody.dir.to_str());
    assert_eq!(env.get("USER").map(String::as_str), Some("nobody"));
    assert_eq!(env.get("LOGNAME").map(String::as_str), Some("nobody"));
}

/// A process's open-files limits (soft, hard), from /proc/PID/limits.
fn nofile_of(pid: u32) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let fields: Vec<&str> = line.split_whitespace().collect();
    (fields[3].to_string(), fields[4].to_string())
}

/// Issue 9, item 10: workers get the hard open-files limit as their soft one (not 1024), or
/// `--nofile N`; running out of fds says how to raise the limit.
#[test]
fn workers_get_the_hard_open_files_limit_or_nofile() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    // Start the master the way a login session would: soft 1024 (nextest raises its own).
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, 1024.min(hard), hard).unwrap();
    let args = [
        "--workers",
        "1",
        "--bind",
        "127.0.0.1:0",
        "--ready",
        "delay:10ms",
    ];
    let mut c = Cluster::start(&[&args[..], &["--", "sleep", "1000"]].concat());
    let (soft, hard_seen) = nofile_of(c.workers()[&0]);
    assert_eq!(soft, hard_seen, "the soft limit is raised to the hard one");
    drop(c);
    let mut c = Cluster::start(&[&args[..], &["--nofile", "2048", "--", "sleep", "1000"]].concat());
    assert_eq!(nofile_of(c.workers()[&0]).0, "2048");
    drop(c);
    let (code, err) = run(&[&args[..], &["--nofile", "5", "--", "sleep", "1000"]].concat());
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("Too many open files") && err.contains("raise it with --nofile"),
        "{err}"
    );
}

/// Issue 9, item 10: when the master's allowed CPUs shrink, a restarted worker is pinned to
/// one it may use, and the log says so.
#[test]
fn a_restart_after_the_allowed_cpus_shrank_pins_to_an_allowed_cpu() {
    let cpus = allowed_cpus();
    if cpus.len() < 2 {
        eprintln!("skipped: needs 2 CPUs, this machine allows {cpus:?}");
        return;
    }
    let mut c = Cluster::start(&[
        "--workers",
        "2",
        "--bind",
        "127.0.0.1:0",
        "--ready",
        "delay:10ms",
        "--",
        "sleep",
        "1000",
    ]);
    let workers = c.workers();
    let mut only = nix::sched::CpuSet::new();
    only.set(cpus[0]).unwrap();
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(c.pid() as i32), &only).unwrap();
    let victim = workers[&1];
    assert_eq!(
        status_field(victim, "Cpus_allowed_list").unwrap(),
        cpus[1].to_string()
    );
    signal(victim, Signal::SIGKILL);
    assert!(
        wait_until(TIMEOUT, || c
            .workers()
            .get(&1)
            .is_some_and(|p| *p != victim)),
        "slot 1 is restarted"
    );
    let new = c.workers()[&1];
    assert_eq!(
        status_field(new, "Cpus_allowed_list").unwrap(),
        cpus[0].to_string(),
        "pinned to the CPU still allowed; log:\n{}",
        c.log().join("\n")
    );
    c.expect_log(&format!("CPU {} is no longer allowed", cpus[1]));
}

/// Issue 9, item 10: the master calls accept(2) on its control socket only when a client
/// is waiting, not on every wake.
#[test]
fn the_control_socket_is_accepted_from_only_when_readable() {
    if Command::new("strace").arg("-V").output().is_err() {
        eprintln!("skipped: strace is not installed");
        return;
    }
    let c = Cluster::start(&[
        "--workers",
        "1",
        "--bind",
        "127.0.0.1:0",
        "--ready",
        "delay:10ms",
        "--",
        "sleep",
        "1000",
    ]);
    let trace = temp_dir("accept-trace").join("trace");
    let mut strace = Command::new("strace")
        .args(["-f", "-e", "trace=accept4,accept", "-o"])
        .arg(&trace)
        .args(["-p", &c.pid().to_string()])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // strace says when it is attached.
    let mut attached = String::new();
    {
        use std::io::{BufRead, BufReader};
        let mut err = BufReader::new(strace.stderr.take().unwrap());
        let _ = err.read_line(&mut attached);
    }
    // 20 wakes of the master with nobody connecting (SIGWINCH is handled and ignored).
    for _ in 0..20 {
        c.signal(Signal::SIGWINCH);
        std::thread::sleep(Duration::from_millis(10)); // separate wakes
    }
    let idle_accepts = || {
        std::fs::read_to_string(&trace)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("accept"))
            .count()
    };
    std::thread::sleep(Duration::from_millis(100));
    let idle = idle_accepts();
    // Control: a client makes it accept.
    assert_eq!(c.ctl(&["status"]).0, Some(0));
    assert!(
        wait_until(Duration::from_secs(5), || idle_accepts() > idle),
        "strace sees accept4 when a client connects ({attached})"
    );
    let _ = strace.kill();
    let _ = strace.wait();
    assert_eq!(idle, 0, "accept(2) calls during 20 idle wakes");
}

/// A stop request sent again and again (a supervisor that retries, a `kill` loop) while the
/// master is already exiting must not keep it from exiting. It once did: the signal pipe's
/// read end closed first at exit, a SIGTERM arriving then made the handler write to it,
/// that write raised SIGPIPE, whose handler wrote to it again, for ever (100 % CPU, no exit).
#[test]
fn signals_that_keep_coming_while_the_master_exits_do_not_keep_it_alive() {
    for round in 0..5 {
        let mut c = Cluster::start(&[
            "--workers",
            "1",
            "--bind",
            "127.0.0.1:0",
            "--ready",
            "delay:10ms",
            "--",
            "sleep",
            "1000",
        ]);
        let pid = nix::unistd::Pid::from_raw(c.pid() as i32);
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let storm = {
            let stop = std::sync::Arc::clone(&stop);
            std::thread::spawn(move || {
                // Bounded: the master is waited for below for at most 10 s.
                let until = Instant::now() + Duration::from_secs(12);
                while !stop.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < until {
                    if nix::sys::signal::kill(pid, Signal::SIGTERM).is_err() {
                        break;
                    }
                    std::thread::yield_now();
                }
            })
        };
        let exited = wait_until(Duration::from_secs(10), || c.exited());
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        storm.join().unwrap();
        assert!(
            exited,
            "round {round}: the master did not exit under repeated SIGTERMs: {}; log:\n{}",
            c.diagnosis(),
            c.log().join("\n")
        );
    }
}
