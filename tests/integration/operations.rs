//! Deploy-grade operations: `reload`, `scale` and `stop` wait for their outcome and exit
//! with it; `status` tells what serves, how the last rollout went and which slots crash-loop.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::support::*;

/// The demo app behind a shell script that exits 42 at start while `marker` exists, as a
/// broken deploy would (the file stands for a bad config or binary).
fn breakable_app(marker: &Path) -> PathBuf {
    script(
        "breakable.sh",
        &format!(
            "#!/bin/sh\nif [ -e '{}' ]; then echo 'breakable: config is broken' >&2; exit 42; fi\n\
             exec '{}' __demo-worker\n",
            marker.display(),
            bin()
        ),
    )
}

/// A cluster of `workers` running [`breakable_app`], and its marker file (absent).
fn breakable_cluster(workers: &str, extra: &[&str], env: &[(&str, &str)]) -> (Cluster, PathBuf) {
    let marker = temp_dir("marker").join("broken");
    let app = breakable_app(&marker);
    let mut args = vec![
        "--workers",
        workers,
        "--bind",
        "127.0.0.1:0",
        "--cmd",
        app.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let mut c = Cluster::spawn(&args, env);
    c.expect_log("workers ready");
    (c, marker)
}

fn lines(text: &str) -> Vec<&str> {
    text.lines().collect()
}

#[test]
fn reload_waits_for_every_slot_and_exits_0_once_the_new_generation_serves() {
    let c = Cluster::start(&["--workers", "2", "--bind", "127.0.0.1:0"]);
    let before = Instant::now();
    let (code, out, err) = c.ctl(&["reload"]);
    assert_eq!(code, Some(0), "{out}{err}");
    let out = lines(&out);
    assert_eq!(
        out.first(),
        Some(&"rolling restart to generation 2 of 2 workers started")
    );
    for slot in [1, 2] {
        assert!(
            out.iter().any(|l| l.starts_with(&format!(
                "slot {slot}/2: generation 2 starting (worker {}, pid ",
                slot - 1
            ))),
            "{out:?}"
        );
        assert!(
            out.iter().any(
                |l| l.starts_with(&format!("slot {slot}/2: generation 2 ready after "))
                    && l.ends_with(&format!("({slot}/2 done)"))
            ),
            "{out:?}"
        );
    }
    let last = out.last().unwrap();
    assert!(
        last.starts_with("ok: generation 2 serves every slot: 2 workers replaced in "),
        "{last}"
    );
    // When it returns, it is true: every worker runs generation 2, and status says so.
    let status = c.status();
    assert_eq!(status["serving_generations"], serde_json::json!([2]));
    assert_eq!(status["last_rollout"]["generation"], 2);
    assert_eq!(status["last_rollout"]["result"], "done");
    assert!(status["last_rollout"]["took_s"].as_f64().unwrap() <= before.elapsed().as_secs_f64());
    for w in status["workers"].as_array().unwrap() {
        assert_eq!(w["generation"], 2, "{w}");
    }

    // Control: --no-wait answers at once, before the pass is done.
    let (code, out, _) = c.ctl(&["reload", "--no-wait"]);
    assert_eq!(
        (code, out.as_str()),
        (
            Some(0),
            "ok: rolling restart to generation 3 of 2 workers started\n"
        )
    );
    assert_eq!(c.status()["last_rollout"]["result"], "under way");
}

#[test]
fn a_rolled_back_reload_exits_4_with_one_line_and_status_tells_the_truth() {
    let (mut c, marker) = breakable_cluster("3", &[], &[]);
    let before = c.workers();
    std::fs::write(&marker, "").unwrap();
    let (code, out, err) = c.ctl(&["reload"]);
    assert_eq!(
        code,
        Some(4),
        "exit 4 on rollback; out:\n{out}\nerr:\n{err}"
    );
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(
        err.starts_with("error: generation 2 rolled back: worker 0 (pid ")
            && err.contains("exited (exit status 42) after ")
            && err.contains(" before it was ready")
            && err.trim_end().ends_with("; generation 1 still serves"),
        "{err}"
    );
    assert!(!out.contains("ok:"), "{out}");
    assert_eq!(c.workers(), before, "every old worker still serves");

    let status = c.status();
    assert_eq!(status["generation"], 2, "the newest generation started");
    assert_eq!(status["serving_generations"], serde_json::json!([1]));
    let last = &status["last_rollout"];
    assert_eq!(last["generation"], 2);
    assert_eq!(last["result"], "rolled back");
    assert!(
        last["reason"]
            .as_str()
            .unwrap()
            .contains("exited (exit status 42)"),
        "{last}"
    );
    let (_, text, _) = c.ctl(&["status"]);
    assert!(
        text.contains("generation 1 serving, 3/3 workers ready"),
        "{text}"
    );
    assert!(
        text.contains("last rollout: to generation 2, begun ")
            && text.contains("rolled back in ")
            && text.contains("exit status 42"),
        "{text}"
    );

    // Control: the fixed deploy goes through, and exits 0.
    std::fs::remove_file(&marker).unwrap();
    let (code, out, err) = c.ctl(&["reload"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("ok: generation 3 serves every slot"), "{out}");
    assert_eq!(c.status()["serving_generations"], serde_json::json!([3]));
}

#[test]
fn reload_timeout_gives_up_waiting_with_exit_5_and_the_pass_goes_on() {
    let c = Cluster::start(&[
        "--workers",
        "2",
        "--bind",
        "127.0.0.1:0",
        "--ready",
        "delay:700ms",
    ]);
    let (code, _, err) = c.ctl(&["reload", "--timeout", "300ms"]);
    assert_eq!(code, Some(5), "{err}");
    assert!(
        err.contains("no outcome after 300 ms: the reload goes on in the master"),
        "{err}"
    );
    assert!(wait_until(TIMEOUT, || {
        c.status()["last_rollout"]["result"] == "done"
    }));
}

#[test]
fn stop_waits_for_the_master_and_exits_with_its_outcome() {
    let mut c = Cluster::start(&["--workers", "2", "--bind", "127.0.0.1:0"]);
    let (code, out, err) = c.ctl(&["stop"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(
        out.lines().last(),
        Some("ok: stopped: every worker exited within the grace period")
    );
    // It returned after the master was done: the master exits at once.
    assert!(wait_until(Duration::from_secs(2), || c.exited()));
    assert_eq!(c.wait_exit(TIMEOUT), Some(0));

    // A worker that ignores the stop signal is SIGKILLed after the grace: stop exits 3,
    // as the master does.
    let app = script(
        "deaf.sh",
        "#!/bin/sh\ntrap '' TERM\nwhile :; do sleep 1; done\n",
    );
    let mut c = Cluster::start(&[
        "--workers",
        "1",
        "--bind",
        "127.0.0.1:0",
        "--ready",
        "delay:50ms",
        "--grace",
        "300ms",
        "--cmd",
        app.to_str().unwrap(),
    ]);
    let (code, _, err) = c.ctl(&["stop"]);
    assert_eq!(code, Some(3), "{err}");
    assert!(err.contains("had to be SIGKILLed"), "{err}");
    assert_eq!(c.wait_exit(TIMEOUT), Some(3));
}

#[test]
fn scale_is_relative_with_a_sign_waits_for_ready_workers_and_refuses_0() {
    let (mut c, marker) = breakable_cluster("2", &[], &[]);
    let (code, out, err) = c.ctl(&["scale", "+1"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out.lines().last(), Some("ok: 3 workers ready"), "{out}");
    assert_eq!(c.workers().len(), 3, "scale +1 on 2 is 3");
    let (code, out, err) = c.ctl(&["scale", "-2"]);
    assert_eq!(
        (code, out.lines().last()),
        (Some(0), Some("ok: 1 workers ready")),
        "{err}"
    );
    assert_eq!(c.workers().len(), 1, "and the scaled-away workers are gone");

    for (args, needle) in [
        (
            &["scale", "0"][..],
            "a cluster keeps at least 1 worker; to stop it, use `reuseport-cluster stop`",
        ),
        (
            &["scale", "-1"][..],
            "the cluster has 1 workers and keeps at least 1",
        ),
        (&["scale", "two"][..], "not a number of workers"),
    ] {
        let (code, _, err) = c.ctl(args);
        assert_eq!(code, Some(1), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    assert_eq!(
        c.status()["workers_configured"],
        1,
        "refusals change nothing"
    );

    // A new slot whose worker fails: scale exits 4 and names it.
    std::fs::write(&marker, "").unwrap();
    let (code, _, err) = c.ctl(&["scale", "2"]);
    assert_eq!(code, Some(4), "{err}");
    assert!(
        err.starts_with("error: scale to 2: worker 1")
            && err.contains("exited (exit status 42); it restarts in"),
        "{err}"
    );
}

#[test]
fn a_crash_looping_slot_is_listed_in_backoff_with_its_restarts_and_next_start() {
    let (mut c, marker) = breakable_cluster("2", &[], &[]);
    std::fs::write(&marker, "").unwrap();
    let victim = c.workers()[&1];
    signal(victim, Signal::SIGKILL);
    let backoff = |c: &Cluster| {
        c.status()["workers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|w| w["state"] == "backoff")
            .cloned()
    };
    assert!(wait_until(TIMEOUT, || backoff(&c)
        .is_some_and(|w| w["restarts"].as_u64() >= Some(1))));
    let w = backoff(&c).unwrap();
    assert_eq!(w["slot"], 1);
    assert!(w["pid"].is_null(), "{w}");
    assert_eq!(w["last_exit"], "exit status 42");
    assert!(w["next_start_in_s"].as_f64().unwrap() >= 0.0, "{w}");
    let (_, text, _) = c.ctl(&["status"]);
    let row = text
        .lines()
        .find(|l| l.contains("backoff"))
        .unwrap_or_else(|| panic!("no backoff row:\n{text}"));
    assert!(
        row.starts_with("1 ") && row.contains("exit status 42") && row.contains("next "),
        "{row}"
    );

    // Control: once fixed, the slot comes back and the backoff row goes.
    std::fs::remove_file(&marker).unwrap();
    assert!(wait_until(TIMEOUT, || c.status()["workers_ready"] == 2
        && backoff(&c).is_none()));
}

#[test]
fn systemd_status_follows_a_rolling_restart_and_says_when_it_was_rolled_back() {
    let systemd = FakeSystemd::new();
    let path = systemd.path.to_str().unwrap().to_string();
    let (c, marker) = breakable_cluster(
        "2",
        &["--ready", "delay:300ms"],
        &[("NOTIFY_SOCKET", &path)],
    );
    let ready = systemd.expect(0, "STATUS=2/2 workers ready, generation 1");
    let (code, out, err) = c.ctl(&["reload"]);
    assert_eq!(code, Some(0), "{out}{err}");
    let during = systemd.expect(ready, "rolling restart to generation 2: 0/2 slots done");
    let half = systemd.expect(during, "rolling restart to generation 2: 1/2 slots done");
    systemd.expect(half, "STATUS=2/2 workers ready, generation 2");

    std::fs::write(&marker, "").unwrap();
    let mark = systemd.messages().len();
    let (code, _, err) = c.ctl(&["reload"]);
    assert_eq!(
        code,
        Some(4),
        "a rolled-back reload fails under systemd too: {err}"
    );
    let status = systemd.expect(mark, "rolling restart to generation 3 rolled back");
    let message = &systemd.messages()[status];
    assert!(
        message.contains("STATUS=2/2 workers ready, generation 2;")
            && message.contains("exit status 42"),
        "{message}"
    );
    // systemd hears the reload end (READY=1) after RELOADING=1 either way.
    let reloading = systemd.expect(mark, "RELOADING=1");
    systemd.expect(reloading + 1, "READY=1");
}

#[test]
fn on_a_terminal_reload_draws_a_live_line_per_slot() {
    if std::process::Command::new("script")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!(
            "skipped: script(1) from util-linux is not installed (it gives the client a terminal)"
        );
        return;
    }
    let c = Cluster::start(&[
        "--workers",
        "1",
        "--bind",
        "127.0.0.1:0",
        "--ready",
        "delay:350ms",
    ]);
    let command = format!(
        "'{}' reload --control '{}'",
        bin(),
        c.control.as_ref().unwrap().display()
    );
    let out = std::process::Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{shown}");
    // The starting line is redrawn in place with its clock, then replaced by the ready line.
    assert!(
        shown.contains("\r\x1b[Kslot 1/1: generation 2 starting (worker 0, pid ")
            && shown.contains(" … 1")
            && shown.contains("\r\x1b[Kslot 1/1: generation 2 ready after "),
        "{shown:?}"
    );
    // Control: without a terminal, the same progress comes as plain lines.
    let (_, plain, _) = c.ctl(&["reload"]);
    assert!(
        !plain.contains('\x1b') && plain.contains("slot 1/1: generation 3 ready after"),
        "{plain}"
    );
}

/// Accepts on fd 3 and answers each connection's first line with the TCP options the
/// accepted socket has (and the listening socket's TCP_DEFER_ACCEPT and TCP_FASTOPEN): what
/// the app gets without setting anything itself.
const SOCKOPT_APP: &str = r#"#!/usr/bin/env python3
import json, socket
ls = socket.socket(fileno=3)
TCP_FASTOPEN = 23
while True:
    c, _ = ls.accept()
    c.recv(100)
    o = {
        "nodelay": c.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY),
        "keepalive": c.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
        "keepidle": c.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
        "keepintvl": c.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
        "keepcnt": c.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
        "defer_accept": ls.getsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT),
        "fastopen": ls.getsockopt(socket.IPPROTO_TCP, TCP_FASTOPEN),
    }
    c.sendall((json.dumps(o) + "\n").encode())
    c.close()
"#;

/// The options an accepted connection of a cluster started with `flags` has.
fn accepted_options(flags: &[&str]) -> serde_json::Value {
    use std::io::{BufRead, BufReader, Write};
    let app = script("sockopt.py", SOCKOPT_APP);
    let mut args = vec![
        "--workers",
        "1",
        "--bind",
        "127.0.0.1:0",
        "--ready",
        "listening",
    ];
    args.extend_from_slice(flags);
    args.extend_from_slice(&["--cmd", app.to_str().unwrap()]);
    let c = Cluster::start(&args);
    let mut s = std::net::TcpStream::connect(c.addr()).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    s.write_all(b"hello\n").unwrap();
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"))
}

#[test]
fn accepted_connections_inherit_tcp_nodelay_and_the_listen_options() {
    let o = accepted_options(&[]);
    assert_ne!(o["nodelay"], 0, "TCP_NODELAY is on by default: {o}");
    assert_eq!(o["keepalive"], 0, "{o}");
    assert_eq!(o["defer_accept"], 0, "{o}");
    assert_eq!(o["fastopen"], 0, "{o}");

    // Control: --no-nodelay leaves Nagle on, as a plain socket has it.
    let o = accepted_options(&["--no-nodelay"]);
    assert_eq!(o["nodelay"], 0, "{o}");

    let o = accepted_options(&[
        "--keepalive",
        "75s:15s:4",
        "--defer-accept",
        "5s",
        "--fastopen",
        "64",
    ]);
    assert_ne!(o["nodelay"], 0, "{o}");
    assert_ne!(o["keepalive"], 0, "{o}");
    assert_eq!(
        (
            o["keepidle"].as_u64(),
            o["keepintvl"].as_u64(),
            o["keepcnt"].as_u64()
        ),
        (Some(75), Some(15), Some(4)),
        "{o}"
    );
    // The kernel keeps TCP_DEFER_ACCEPT as SYN-ACK retransmissions and reads back the
    // time they cover, which is at least what was asked.
    assert!(o["defer_accept"].as_u64().unwrap() >= 5, "{o}");
    assert_eq!(o["fastopen"], 64, "{o}");

    let o = accepted_options(&["--keepalive"]);
    assert_ne!(
        o["keepalive"], 0,
        "bare --keepalive turns SO_KEEPALIVE on: {o}"
    );
}

#[test]
fn a_port_already_served_through_so_reuseport_is_refused_naming_the_process() {
    let a = Cluster::start(&["--workers", "2", "--bind", "127.0.0.1:0"]);
    let port = a.addr().port().to_string();
    let bind = format!("127.0.0.1:{port}");
    let (code, log) = run(&[
        "--workers",
        "1",
        "--bind",
        &bind,
        "--name",
        &unique_tag("second"),
    ]);
    assert_eq!(code, Some(1), "{log}");
    let line = log
        .lines()
        .find(|l| l.contains("already served by"))
        .unwrap_or_else(|| panic!("{log}"));
    // The first cluster's master holds its slots' sockets (socket takeover), its workers
    // use them: either is a right answer, the master the likelier (the lowest pid).
    let mut holders: Vec<u32> = children(a.pid());
    holders.push(a.pid());
    let named = holders
        .iter()
        .any(|p| line.contains(&format!("port {port} is already served by pid {p} (")));
    assert!(named, "names one of {holders:?}: {line}");
    assert!(line.contains("--share-port"), "{line}");

    // The same for any other SO_REUSEPORT listener of this uid: a python one, and its
    // command line is named. The wildcard address covers 127.0.0.1 too.
    let port = free_port();
    let mut other = std::process::Command::new("python3")
        .args([
            "-c",
            &format!(
                "import socket,sys\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)\n\
                 s.bind(('0.0.0.0', {port}))\ns.listen()\nprint('up', flush=True)\nsys.stdin.read()\n"
            ),
        ])
        .stdin(std::process::Stdio::piped()) // it exits when this closes, shim or not
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut up = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(other.stdout.as_mut().unwrap()),
        &mut up,
    )
    .unwrap();
    let bind = format!("127.0.0.1:{port}");
    let (code, log) = run(&["--workers", "1", "--bind", &bind]);
    drop(other.stdin.take());
    let _ = other.kill();
    let _ = other.wait();
    assert_eq!(code, Some(1), "{log}");
    // (python3 may be a shim that forks the real interpreter: the pid is the listener's.)
    assert!(
        log.contains(&format!("port {port} is already served by pid "))
            && log.contains("python3 -c import socket,sys s=socket")
            && log.contains(&format!("listening on 0.0.0.0:{port} with SO_REUSEPORT")),
        "{log}"
    );
}

#[test]
fn share_port_starts_beside_another_listener_on_purpose() {
    let a = Cluster::start(&["--workers", "1", "--bind", "127.0.0.1:0"]);
    let bind = format!("127.0.0.1:{}", a.addr().port());
    let mut b = Cluster::spawn(
        &[
            "--workers",
            "1",
            "--bind",
            &bind,
            "--share-port",
            "--name",
            &unique_tag("share"),
        ],
        &[],
    );
    b.expect_log("workers ready");
    assert!(
        b.log_contains("--share-port: sharing port"),
        "{:?}",
        b.log()
    );
    // Control: another address on the same port is no conflict at all.
    let other_ip = format!("127.0.0.2:{}", a.addr().port());
    let mut c = Cluster::spawn(
        &[
            "--workers",
            "1",
            "--bind",
            &other_ip,
            "--name",
            &unique_tag("other-ip"),
        ],
        &[],
    );
    c.expect_log("workers ready");
    assert!(!c.log_contains("--share-port"));
}

/// Runs the binary with `args` and returns (exit code, stderr).
fn run_bin(args: &[&str]) -> (Option<i32>, String) {
    let out = std::process::Command::new(bin())
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_program_without_double_dash_an_unquoted_cmd_and_a_url_get_one_line_that_says_what_to_do() {
    let (code, err) = run_bin(&["--bind", "127.0.0.1:0", "node", "app.js"]);
    assert_eq!(code, Some(2));
    assert_eq!(
        err.trim_end(),
        "error: unexpected argument \"node\": to run a program, put it after `--` \
         (reuseport-cluster --bind ADDR -- node app.js) or quote it in --cmd \"node app.js\""
    );
    let (code, err) = run_bin(&["--bind", "127.0.0.1:0", "--cmd", "node", "app.js"]);
    assert_eq!(code, Some(2));
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains(
            "--cmd takes the whole command as one argument; quote it: --cmd \"node app.js\""
        ),
        "{err}"
    );
    let (code, err) = run_bin(&["--bind", "http://127.0.0.1:8000/"]);
    assert_eq!(code, Some(2));
    assert_eq!(
        err.trim_end(),
        "error: --bind http://127.0.0.1:8000/: drop the scheme (http://) and any path: give \
         HOST:PORT, e.g. 127.0.0.1:8000"
    );
    // Control: a mistyped sub-command keeps clap's suggestion.
    let (code, err) = run_bin(&["stauts"]);
    assert_eq!(code, Some(2));
    assert!(!err.contains("after `--`"), "{err}");
}

/// Listens on `port` itself (never on fd 3), unless LISTEN_TOO is set, in which case it
/// also serves fd 3 (an app with an admin port of its own).
const ELSEWHERE_APP: &str = r#"#!/usr/bin/env python3
import os, socket, sys
own = socket.socket()
own.bind(("127.0.0.1", int(sys.argv[1])))
own.listen()
if os.environ.get("LISTEN_TOO"):
    fd3 = socket.socket(fileno=3)
    while True:
        c, _ = fd3.accept()
        c.close()
own.accept()
"#;

#[test]
fn an_app_listening_on_a_port_of_its_own_is_told_to_use_fd_3() {
    let app = script("elsewhere.py", ELSEWHERE_APP);
    let port = free_port();
    let cmd = format!("{} {port}", app.display());
    let mut c = Cluster::spawn(
        &[
            "--workers",
            "1",
            "--bind",
            "127.0.0.1:0",
            "--ready-timeout",
            "3s",
            "--cmd",
            &cmd,
        ],
        &[],
    );
    let warning = c.expect_log("itself, and not on the socket it was given at fd 3");
    assert!(
        warning.contains(&format!("listens on 127.0.0.1:{port} itself"))
            && warning.contains("LISTEN_FDS=1")
            && warning.contains("uvicorn --fd 3"),
        "{warning}"
    );
    // At the ready timeout the start-up fails with that cause instead of counting the worker
    // as ready (which left the port taking connections nobody accepted).
    assert_eq!(c.wait_exit(TIMEOUT), Some(1));
    let log = c.log();
    let last = log.last().unwrap();
    assert!(
        last.starts_with("error: worker 0 (pid ")
            && last.contains(&format!(
                "not ready after 3.0 s: it listens on 127.0.0.1:{port} itself, not on its fd 3"
            )),
        "{last}"
    );
    assert!(
        !log.iter().any(|l| l.contains("counting it as ready")),
        "{log:?}"
    );

    // Control: the same app serving fd 3 as well (its own port is an admin port) is fine.
    let port = free_port();
    let cmd = format!("{} {port}", app.display());
    let mut c = Cluster::spawn(
        &["--workers", "1", "--bind", "127.0.0.1:0", "--cmd", &cmd],
        &[("LISTEN_TOO", "1")],
    );
    c.expect_log("workers ready");
    std::thread::sleep(Duration::from_millis(800));
    assert!(
        !c.log_contains("not on the socket it was given"),
        "{:?}",
        c.log()
    );
}

#[test]
fn an_app_exiting_at_start_up_gets_the_fd_3_hint_in_the_first_line_about_it() {
    let app = script(
        "eaddrinuse.sh",
        "#!/bin/sh\necho 'Error: listen EADDRINUSE: address already in use :::8000' >&2\nexit 1\n",
    );
    let (code, log) = run(&[
        "--workers",
        "2",
        "--bind",
        "127.0.0.1:0",
        "--cmd",
        app.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(1));
    let first = log
        .lines()
        .find(|l| l.starts_with("start-up failed:"))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(
        first.contains("before any worker was ready; if it reported EADDRINUSE, it binds the port itself: make it use fd 3 (LISTEN_FDS=1)"),
        "{first}"
    );
    let first_master_line_after = log
        .lines()
        .skip_while(|l| !l.contains("EADDRINUSE: address already"))
        .find(|l| !l.contains("EADDRINUSE: address already") && !l.ends_with(": started"))
        .unwrap();
    assert!(
        first_master_line_after.starts_with("start-up failed:"),
        "the cause comes first: {log}"
    );
}

#[test]
fn log_format_json_applies_to_worker_lines_under_log_prefix() {
    let app = script(
        "talk.sh",
        &format!(
            "#!/bin/sh\necho \"to stdout from $REUSEPORT_CLUSTER_WORKER \\\"quoted\\\"\"\necho \"to stderr from $REUSEPORT_CLUSTER_WORKER\" >&2\nexec '{}' __demo-worker\n",
            bin()
        ),
    );
    let mut c = Cluster::spawn(
        &[
            "--workers",
            "2",
            "--bind",
            "127.0.0.1:0",
            "--log-prefix",
            "--log-format",
            "json",
            "--cmd",
            app.to_str().unwrap(),
        ],
        &[],
    );
    c.expect_log("workers ready");
    let workers = c.workers();
    let parsed = |line: &str| -> serde_json::Value {
        serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
    };
    assert!(wait_until(TIMEOUT, || c.stdout_lines().len() >= 2));
    assert!(wait_until(TIMEOUT, || c
        .log()
        .iter()
        .filter(|l| l.contains("to stderr from"))
        .count()
        >= 2));
    for (lines, stream) in [(c.stdout_lines(), "stdout"), (c.log(), "stderr")] {
        let mut from_workers = 0;
        for line in &lines {
            let v = parsed(line);
            assert!(v["ts"].is_string() && v["level"].is_string(), "{line}");
            if let Some(text) = v["line"].as_str() {
                let slot = v["slot"].as_u64().unwrap() as usize;
                assert_eq!(v["pid"].as_u64().unwrap() as u32, workers[&slot], "{line}");
                assert_eq!(v["generation"], 1, "{line}");
                assert_eq!(v["stream"], stream, "{line}");
                let expected = match stream {
                    "stdout" => format!("to stdout from {slot} \"quoted\""),
                    _ => format!("to stderr from {slot}"),
                };
                assert_eq!(text, expected);
                from_workers += 1;
            }
        }
        assert_eq!(from_workers, 2, "{stream}: {lines:?}");
    }
    // Control: without --log-format json the same lines keep the text prefix.
    let mut c = Cluster::spawn(
        &[
            "--workers",
            "1",
            "--bind",
            "127.0.0.1:0",
            "--log-prefix",
            "--cmd",
            app.to_str().unwrap(),
        ],
        &[],
    );
    c.expect_log("workers ready");
    let pid = c.workers()[&0];
    assert!(wait_until(TIMEOUT, || c
        .stdout_lines()
        .contains(&format!("[w0 {pid}] to stdout from 0 \"quoted\""))));
}

#[test]
fn a_stop_during_a_waiting_reload_ends_it_with_exit_1_and_says_why() {
    let c = Cluster::start(&[
        "--workers",
        "2",
        "--bind",
        "127.0.0.1:0",
        "--ready",
        "delay:2s",
    ]);
    let control = c.control.clone().unwrap();
    let reload = std::thread::spawn(move || {
        std::process::Command::new(bin())
            .args(["reload", "--control"])
            .arg(&control)
            .output()
            .unwrap()
    });
    assert!(wait_until(TIMEOUT, || c.status()["last_rollout"]["result"]
        == "under way"));
    c.signal(Signal::SIGTERM);
    let out = reload.join().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(
        err.trim_end(),
        "error: the rolling restart to generation 2 was abandoned: the cluster is stopping"
    );
}
