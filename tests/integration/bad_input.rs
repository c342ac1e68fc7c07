//! Bad input: one actionable line on stderr, a non-zero exit, no panic, no worker left.

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use crate::support::*;

/// Runs the binary with `args` and checks the exit code and the words of its one error line.
fn rejects(args: &[&str], code: i32, words: &[&str]) {
    let (got, log) = run(args);
    assert_eq!(got, Some(code), "exit code of {args:?}; log:\n{log}");
    let errors: Vec<&str> = log.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(
        errors.len(),
        1,
        "exactly one error line for {args:?}:\n{log}"
    );
    for w in words {
        assert!(
            errors[0].contains(w),
            "{args:?}: {:?} lacks {w:?}",
            errors[0]
        );
    }
    assert!(
        !log.contains("panicked") && !log.contains("backtrace"),
        "{log}"
    );
}

#[test]
fn invalid_flags_exit_2_with_the_flag_named() {
    rejects(
        &["--bind", "nonsense"],
        2,
        &["--bind nonsense", "HOST:PORT"],
    );
    rejects(&["--bind", "127.0.0.1:70000"], 2, &["out of range"]);
    rejects(&["--bind", "::1:80"], 2, &["brackets"]);
    rejects(
        &["--bind", "no.such.host.invalid:80"],
        2,
        &["cannot resolve"],
    );
    rejects(
        &["--bind", "127.0.0.1:0", "--workers", "0"],
        2,
        &["--workers 0", "at least one"],
    );
    rejects(
        &["--bind", "127.0.0.1:0", "--cpus", "1000"],
        2,
        &["--cpus", "CPU 1000", "affinity mask"],
    );
    rejects(
        &["--bind", "127.0.0.1:0", "--cpus", "0-99999999999"],
        2,
        &["--cpus", "highest possible CPU"],
    );
    rejects(
        &["--bind", "127.0.0.1:0", "--workers", "18446744073709551615"],
        2,
        &["--workers", "at most"],
    );
    rejects(
        &["--bind", "127.0.0.1:0", "--grace", "18446744073709551615"],
        2,
        &["--grace", "365 days"],
    );
    rejects(
        &["--bind", "127.0.0.1:0", "--stop-signal", "9"],
        2,
        &["--stop-signal 9", "graceful"],
    );
    rejects(
        &["--bind", "127.0.0.1:0", "--ready", "soon"],
        2,
        &["--ready soon", "notify, listening"],
    );
    rejects(
        &["--bind", "127.0.0.1:0", "--rolling-batch", "0"],
        2,
        &["--rolling-batch"],
    );
    rejects(
        &["--bind", "127.0.0.1:0", "--cpus", "1-0"],
        2,
        &["--cpus", "backwards"],
    );
    rejects(
        &["--bind", "127.0.0.1:0", "--grace", "soon"],
        2,
        &["--grace", "30s"],
    );
    rejects(
        &["--bind", "127.0.0.1:0", "--stop-signal", "NOPE"],
        2,
        &["--stop-signal NOPE"],
    );
    rejects(
        &["--bind", "127.0.0.1:0", "--backlog", "0"],
        2,
        &["--backlog"],
    );
    rejects(
        &["--bind", "127.0.0.1:0", "--cmd", ""],
        2,
        &["--cmd is empty"],
    );
    rejects(
        &[
            "--bind",
            "127.0.0.1:0",
            "--cmd",
            "no-such-program-xyz --flag",
        ],
        2,
        &["not found in PATH"],
    );
    rejects(
        &["--bind", "127.0.0.1:0", "--cmd", "/etc/passwd"],
        2,
        &["not executable", "chmod +x"],
    );
    rejects(
        &["--bind", "127.0.0.1:0", "--cmd", "/tmp"],
        2,
        &["directory"],
    );
    rejects(
        &["--bind", "127.0.0.1:0", "--cmd", "echo 'unterminated"],
        2,
        &["unbalanced quotes"],
    );
    rejects(
        &["--bind", "127.0.0.1:0", "--bind", "bind0=127.0.0.1:0"],
        2,
        &["given twice"],
    );
}

#[test]
fn clap_usage_errors_exit_2() {
    let out = Command::new(bin())
        .args(["--workers", "2"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--bind"));
    let out = Command::new(bin())
        .args(["--bind", "127.0.0.1:0", "--workers", "many"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn help_documents_every_flag_with_its_default() {
    let out = Command::new(bin()).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "--bind",
        "--workers",
        "--cpus",
        "--no-pin",
        "--backlog",
        "[default: 1024]",
        "--grace",
        "[default: 30s]",
        "--stop-signal",
        "[default: TERM]",
        "--cmd",
        "demo",
        "Exit codes",
    ] {
        assert!(help.contains(needle), "--help lacks {needle:?}:\n{help}");
    }
}

#[test]
fn port_held_by_a_socket_without_so_reuseport_is_explained() {
    let plain = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = plain.local_addr().unwrap().to_string();
    rejects(
        &["--bind", &addr, "--workers", "2"],
        1,
        &[&addr, "without SO_REUSEPORT", "ss -ltnp"],
    );
}

#[test]
fn port_held_by_another_users_reuseport_socket_is_explained() {
    let port = free_port();
    // A SO_REUSEPORT listener owned by `nobody`: the kernel will not group it with ours.
    let mut holder = Command::new("python3")
        .args([
            "-c",
            &format!(
                "import socket,sys,time\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)\n\
                 s.bind(('127.0.0.1',{port}))\ns.listen()\nprint('ok',flush=True)\ntime.sleep(60)"
            ),
        ])
        .uid(65534)
        .gid(65534)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut ready = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(holder.stdout.take().unwrap()),
        &mut ready,
    )
    .unwrap();
    assert_eq!(ready.trim(), "ok");
    let addr = format!("127.0.0.1:{port}");
    rejects(
        &["--bind", &addr],
        1,
        &["another user's socket", "same effective uid"],
    );
    let _ = holder.kill();
    let _ = holder.wait();
}

#[test]
fn privileged_port_without_permission_is_explained() {
    let start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        .ok()
        .and_then(|s| s.trim().parse::<u16>().ok())
        .unwrap_or(1024);
    if start <= 1 {
        eprintln!(
            "skipped: net.ipv4.ip_unprivileged_port_start is {start}, no port is privileged here"
        );
        return;
    }
    let port = (start - 1).to_string();
    let bind = format!("127.0.0.1:{port}");
    // As `nobody`, without CAP_NET_BIND_SERVICE.
    let out = Command::new(bin())
        .args(["--bind", &bind, "--workers", "1"])
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("privileged") && stderr.contains("CAP_NET_BIND_SERVICE"),
        "{stderr}"
    );
    assert_eq!(
        stderr.lines().filter(|l| l.starts_with("error:")).count(),
        1,
        "{stderr}"
    );
}

#[test]
fn a_failed_start_leaves_no_worker_behind() {
    // Slot 0 comes up, slot 1 fails: the master must stop slot 0 before it exits.
    let dir = temp_dir("partial");
    let marker = dir.join("first-started");
    let app = script(
        "second-fails.sh",
        &format!(
            "#!/bin/sh\nif [ \"$REUSEPORT_CLUSTER_WORKER\" = 1 ]; then\n  while [ ! -e {m} ]; do sleep 0.05; done\n  exit 3\nfi\ntouch {m}\nexec sleep 1000\n",
            m = marker.display()
        ),
    );
    let tag = unique_tag("partial");
    let mut c = Cluster::spawn(
        &[
            "--workers",
            "2",
            "--bind",
            "127.0.0.1:0",
            "--ready",
            "delay:10s",
            "--cmd",
            app.to_str().unwrap(),
        ],
        &[("RC_TEST_TAG", &tag)],
    );
    assert_eq!(c.wait_exit(TIMEOUT), Some(1));
    assert!(marker.exists(), "worker 0 did start");
    assert!(c.log_contains("worker 1") && c.log_contains("exit status 3"));
    assert_eq!(
        tagged_processes(&tag),
        Vec::<u32>::new(),
        "workers left behind"
    );
}
