//! The launcher's contract with workers, and its supervision.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use crate::support::*;

/// A python3 app that ignores SIGTERM, and says so over sd_notify once it does.
const STUBBORN_APP: &str = r#"#!/usr/bin/env python3
import os, signal, socket, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
addr = os.environ["NOTIFY_SOCKET"]
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.connect("\0" + addr[1:] if addr.startswith("@") else addr)
s.send(b"READY=1\nSTATUS=ignoring SIGTERM")
time.sleep(1000)
"#;

#[test]
fn workers_are_pinned_and_hold_exactly_their_sockets_and_env() {
    let mut c = Cluster::start(&[
        "--workers",
        "3",
        "--bind",
        "a=127.0.0.1:0",
        "--bind",
        "b=127.0.0.1:0",
        "--ready",
        "delay:50ms",
        "--",
        "sleep",
        "1000",
    ]);
    let cpus = allowed_cpus();
    let workers = c.workers();
    assert_eq!(workers.len(), 3, "workers: {workers:?}");
    let mut pids: Vec<u32> = workers.values().copied().collect();
    pids.sort_unstable();
    pids.dedup();
    assert_eq!(pids.len(), 3, "distinct pids");
    for (slot, pid) in workers {
        let expected_cpu = cpus[slot % cpus.len()];
        assert_eq!(
            status_field(pid, "Cpus_allowed_list").unwrap(),
            expected_cpu.to_string(),
            "worker {slot} pid {pid} pinned to its CPU"
        );
        assert_eq!(
            fds(pid),
            vec![0, 1, 2, 3, 4],
            "worker {slot} holds exactly fds 0-4"
        );
        for fd in [3, 4] {
            assert!(
                fd_target(pid, fd).starts_with("socket:"),
                "fd {fd} is a socket"
            );
        }
        assert_eq!(
            pgid(pid),
            Some(pid),
            "worker {slot} leads its own process group"
        );
        let env = env_of(pid);
        assert_eq!(env["LISTEN_PID"], pid.to_string());
        assert_eq!(env["LISTEN_FDS"], "2");
        assert_eq!(env["LISTEN_FDNAMES"], "a:b");
        assert_eq!(env["REUSEPORT_CLUSTER_WORKER"], slot.to_string());
        assert_eq!(env["REUSEPORT_CLUSTER_WORKERS"], "3");
        assert_eq!(env["REUSEPORT_CLUSTER_CPU"], expected_cpu.to_string());
        assert_eq!(env["REUSEPORT_CLUSTER_GENERATION"], "1");
        assert!(
            env.contains_key("PATH"),
            "the master's environment is passed on"
        );
    }
    // Both sockets listen on the announced ports.
    for addr in &c.addrs {
        assert!(TcpStream::connect(addr).is_ok(), "{addr} accepts");
    }
}

#[test]
fn fds_the_master_inherited_do_not_reach_workers() {
    // A pipe without FD_CLOEXEC, as a careless parent (or a shell) may pass down.
    let (r, w) = nix::unistd::pipe().unwrap();
    let leaked = [r.as_raw_fd(), w.as_raw_fd()];
    let mut c = Cluster::start(&[
        "--workers",
        "1",
        "--ready",
        "delay:50ms",
        "--bind",
        "127.0.0.1:0",
        "--",
        "sleep",
        "1000",
    ]);
    assert!(
        fds(c.pid()).contains(&leaked[0]),
        "the master did inherit the pipe"
    );
    assert_eq!(
        fds(c.workers()[&0]),
        vec![0, 1, 2, 3],
        "inherited {leaked:?}"
    );
}

#[test]
fn no_pin_leaves_affinity_alone_and_omits_the_cpu_variable() {
    let mut c = Cluster::start(&[
        "--workers",
        "2",
        "--no-pin",
        "--bind",
        "127.0.0.1:0",
        "--ready",
        "delay:50ms",
        "--",
        "sleep",
        "1000",
    ]);
    let mine = status_field(std::process::id(), "Cpus_allowed_list").unwrap();
    let workers = c.workers();
    assert_eq!(workers.len(), 2, "{workers:?}");
    for (_, pid) in workers {
        assert_eq!(status_field(pid, "Cpus_allowed_list").unwrap(), mine);
        assert!(!env_of(pid).contains_key("REUSEPORT_CLUSTER_CPU"));
    }
}

#[test]
fn master_environment_meant_for_the_master_is_not_passed_on() {
    let mut c = Cluster::spawn(
        &[
            "--workers",
            "1",
            "--bind",
            "127.0.0.1:0",
            "--ready",
            "delay:50ms",
            "--",
            "sleep",
            "1000",
        ],
        &[
            ("NOTIFY_SOCKET", "/run/systemd/notify"),
            ("LISTEN_FDS", "7"),
            ("KEEP_ME", "yes"),
        ],
    );
    c.expect_log("workers ready");
    let pid = c.workers()[&0];
    let env = env_of(pid);
    assert!(
        !env.contains_key("NOTIFY_SOCKET"),
        "NOTIFY_SOCKET belongs to the master"
    );
    assert_eq!(env["LISTEN_FDS"], "1");
    assert_eq!(env["KEEP_ME"], "yes");
}

#[test]
fn load_new_connections_spread_over_all_workers() {
    let _load = load_lock();
    let c = Cluster::start(&["--workers", "4", "--bind", "127.0.0.1:0"]);
    let addr = c.addr();
    let mut share: HashMap<usize, usize> = HashMap::new();
    let threads: Vec<_> = (0..4)
        .map(|_| {
            std::thread::spawn(move || {
                (0..500)
                    .map(|_| get(addr).expect("request failed").worker())
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    for t in threads {
        for w in t.join().unwrap() {
            *share.entry(w).or_default() += 1;
        }
    }
    eprintln!("requests per worker: {share:?}");
    assert_eq!(share.values().sum::<usize>(), 2000);
    for slot in 0..4 {
        assert!(
            share.get(&slot).copied().unwrap_or(0) > 0,
            "worker {slot} got no connection: {share:?}"
        );
    }
}

#[test]
fn load_demo_serves_300_concurrent_keep_alive_connections_on_one_worker() {
    let _load = load_lock();
    let c = Cluster::start(&["--workers", "1", "--bind", "127.0.0.1:0"]);
    let mut conns: Vec<TcpStream> = (0..300)
        .map(|_| {
            let s = TcpStream::connect(c.addr()).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            s
        })
        .collect();
    for round in 0..2 {
        for (i, s) in conns.iter_mut().enumerate() {
            let r = get_on(s).unwrap_or_else(|e| panic!("round {round} conn {i}: {e}"));
            assert_eq!(r.status, 200);
            assert!(
                r.body.starts_with("hello from worker 0 (pid "),
                "{}",
                r.body
            );
            assert_eq!(r.headers["connection"], "keep-alive");
        }
    }
}

#[test]
fn unmodified_python_app_takes_fd_3_from_listen_fds() {
    let app = script("app.py", PYTHON_HTTP_APP);
    let cmd = format!("python3 {}", app.display());
    let mut c = Cluster::start(&["--workers", "2", "--bind", "web=127.0.0.1:0", "--cmd", &cmd]);
    let workers = c.workers();
    let mut seen = HashMap::new();
    assert!(
        wait_until(TIMEOUT, || {
            let r = get(c.addr()).expect("python app answers");
            seen.insert(r.worker(), r.body.clone());
            seen.len() == 2
        }),
        "both python workers answer: {seen:?}"
    );
    for (slot, body) in seen {
        assert_eq!(
            body,
            format!(
                "python pid={} worker={slot} gen=1 names=web\n",
                workers[&slot]
            )
        );
    }
}

#[test]
fn killed_worker_is_replaced_in_the_same_slot_and_cpu() {
    let mut c = Cluster::start(&["--workers", "2", "--bind", "127.0.0.1:0"]);
    let before = c.workers();
    let old = before[&1];
    let cpu = status_field(old, "Cpus_allowed_list").unwrap();
    signal(old, Signal::SIGKILL);
    let line = c.expect_log(&format!(
        "pid {old}, cpu {cpu}, gen 1): exited (signal SIGKILL)"
    ));
    assert!(line.ends_with("restarting in 100 ms"), "{line}");
    // Meanwhile the other worker serves every new connection.
    for _ in 0..20 {
        assert_eq!(
            get(c.addr()).expect("request during the restart").status,
            200
        );
    }
    assert!(wait_until(TIMEOUT, || c
        .workers()
        .get(&1)
        .is_some_and(|p| *p != old)));
    let new = c.workers()[&1];
    assert_eq!(
        status_field(new, "Cpus_allowed_list").unwrap(),
        cpu,
        "same CPU"
    );
    assert_eq!(
        c.workers()[&0],
        before[&0],
        "the other worker was left alone"
    );
    assert!(
        wait_until(TIMEOUT, || get(c.addr()).is_ok_and(
            |r| r.worker() == 1 && r.body.contains(&format!("pid {new}"))
        )),
        "the replacement serves"
    );
}

#[test]
fn sigterm_stops_every_worker_and_exits_zero() {
    let mut c = Cluster::start(&["--workers", "3", "--bind", "127.0.0.1:0"]);
    let pids: Vec<u32> = c.workers().values().copied().collect();
    c.signal(Signal::SIGTERM);
    assert_eq!(c.wait_exit(TIMEOUT), Some(0));
    for pid in pids {
        assert!(!alive(pid), "worker {pid} still alive");
    }
}

#[test]
fn app_ignoring_the_stop_signal_is_killed_after_grace_and_exit_code_says_so() {
    let app = script("stubborn.py", STUBBORN_APP);
    let mut c = Cluster::start(&[
        "--workers",
        "2",
        "--grace",
        "1500ms",
        "--bind",
        "127.0.0.1:0",
        "--ready",
        "notify",
        "--cmd",
        app.to_str().unwrap(),
    ]);
    let pids: Vec<u32> = c.workers().values().copied().collect();
    let t0 = Instant::now();
    c.signal(Signal::SIGTERM);
    assert_eq!(
        c.wait_exit(TIMEOUT),
        Some(3),
        "exit 3: workers had to be killed"
    );
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(1400),
        "waited for the grace period, took {took:?}"
    );
    assert!(c.log_contains("sending SIGKILL"));
    for pid in pids {
        assert!(!alive(pid));
    }
}

/// A deliberate second Ctrl-C forces the stop; see master_robustness.rs for the repeated
/// requests that must not.
#[test]
fn second_ctrl_c_kills_at_once() {
    let app = script("stubborn2.py", STUBBORN_APP);
    let mut c = Cluster::start(&[
        "--workers",
        "1",
        "--grace",
        "60s",
        "--bind",
        "127.0.0.1:0",
        "--ready",
        "notify",
        "--cmd",
        app.to_str().unwrap(),
    ]);
    c.signal(Signal::SIGINT);
    c.expect_log("stopping");
    std::thread::sleep(Duration::from_millis(600)); // past the window of a duplicate delivery
    let t0 = Instant::now();
    c.signal(Signal::SIGINT);
    assert_eq!(c.wait_exit(TIMEOUT), Some(3));
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "did not wait for the 60 s grace"
    );
}

#[test]
fn sigkill_to_the_master_leaves_no_worker_behind() {
    let tag = unique_tag("sigkill-master");
    let mut c = Cluster::spawn(
        &["--workers", "3", "--bind", "127.0.0.1:0"],
        &[("RC_TEST_TAG", &tag)],
    );
    c.expect_log("workers ready");
    assert_eq!(tagged_processes(&tag).len(), 4, "master and 3 workers");
    c.signal(Signal::SIGKILL);
    c.wait_exit(TIMEOUT);
    assert!(
        wait_until(TIMEOUT, || tagged_processes(&tag).is_empty()),
        "workers outlived a SIGKILLed master: {:?}",
        tagged_processes(&tag)
    );
    // A SIGKILLed master cannot remove its control socket: the next one of that name
    // would replace it; this test cleans up after itself instead.
    if let Some(control) = &c.control {
        let _ = std::fs::remove_file(control);
        let _ = std::fs::remove_file(control.with_extension("lock"));
    }
}

#[test]
fn orphans_of_a_double_forking_app_are_reaped() {
    let dir = temp_dir("orphan");
    let report = dir.join("grandchild-ppid");
    let app = script(
        "daemonizer.py",
        &format!(
            r#"#!/usr/bin/env python3
import os, time
if os.fork() == 0:
    if os.fork() == 0:
        time.sleep(0.5)   # by now its parent has exited: it was adopted
        open("{report}", "w").write(str(os.getppid()))
        os._exit(0)
    os._exit(0)
time.sleep(1000)
"#,
            report = report.display()
        ),
    );
    let mut c = Cluster::start(&[
        "--workers",
        "1",
        "--bind",
        "127.0.0.1:0",
        "--ready",
        "delay:50ms",
        "--cmd",
        app.to_str().unwrap(),
    ]);
    assert!(
        wait_until(TIMEOUT, || report.exists()),
        "the grandchild ran"
    );
    assert!(wait_until(TIMEOUT, || std::fs::read_to_string(&report)
        .is_ok_and(|s| !s.is_empty())));
    let ppid: u32 = std::fs::read_to_string(&report)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(
        ppid,
        c.pid(),
        "the master adopted the orphan (PR_SET_CHILD_SUBREAPER)"
    );
    let zombies = || {
        children(c.pid())
            .into_iter()
            .filter(|p| status_field(*p, "State").is_some_and(|s| s.starts_with('Z')))
            .count()
    };
    assert!(
        wait_until(TIMEOUT, || zombies() == 0),
        "zombie children of the master remain"
    );
    assert_eq!(c.workers().len(), 1, "the worker itself lives on");
}

#[test]
fn ipv4_and_ipv6_wildcards_on_one_port_and_localhost() {
    if !have_ipv6() {
        eprintln!("skipped: this host has no IPv6 loopback");
        return;
    }
    let port = free_port();
    let v4 = format!("0.0.0.0:{port}");
    let v6 = format!("[::]:{port}");
    let mut c = Cluster::start(&["--workers", "1", "--bind", &v4, "--bind", &v6]);
    let pid = c.workers()[&0];
    for fd in [3, 4] {
        assert!(
            fd_target(pid, fd).starts_with("socket:"),
            "fd {fd} of the worker is a socket"
        );
    }
    for addr in [format!("127.0.0.1:{port}"), format!("[::1]:{port}")] {
        let addr: SocketAddr = addr.parse().unwrap();
        assert_eq!(
            get(addr).unwrap_or_else(|e| panic!("{addr}: {e}")).status,
            200
        );
    }
    drop(c);
    let c = Cluster::start(&["--workers", "1", "--bind", "localhost:0"]);
    assert!(c.addr().ip().is_loopback());
    assert_eq!(get(c.addr()).unwrap().status, 200);
}

#[test]
fn start_up_fails_fast_when_the_app_exits_at_once() {
    let mut c = Cluster::spawn(
        &[
            "--workers",
            "4",
            "--bind",
            "127.0.0.1:0",
            "--cmd",
            "sh -c 'exit 7'",
        ],
        &[],
    );
    // Timed from the spawn (after the machine-wide test lock, which a load test may hold).
    let t0 = c.spawned;
    let code = c.wait_exit(TIMEOUT);
    let log = c.log().join("\n");
    assert_eq!(code, Some(1), "{log}");
    assert!(
        log.contains("error: worker 0")
            && log.contains("exit status 7")
            && log.contains("before any worker was ready"),
        "{log}"
    );
    assert!(t0.elapsed() < Duration::from_secs(10));
}

#[test]
fn exec_failure_in_the_child_is_reported_with_worker_step_and_os_error() {
    let app = script("noshebang", "echo not a binary\n");
    let (code, log) = run(&[
        "--workers",
        "2",
        "--bind",
        "127.0.0.1:0",
        "--ready",
        "delay:50ms",
        "--cmd",
        app.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(1), "{log}");
    let error = log
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(
        error.contains("worker 0")
            && error.contains("exec ")
            && error.contains("Exec format error"),
        "{error}"
    );
    assert!(error.contains("#!"), "says how to fix it: {error}");
}

#[test]
fn backlog_above_somaxconn_is_warned_about() {
    let Some(max) = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
    else {
        eprintln!("skipped: /proc/sys/net/core/somaxconn is not readable");
        return;
    };
    let backlog = (max + 1).to_string();
    let mut c = Cluster::spawn(
        &[
            "--workers",
            "1",
            "--backlog",
            &backlog,
            "--bind",
            "127.0.0.1:0",
        ],
        &[],
    );
    let line = c.expect_log("somaxconn");
    assert!(
        line.starts_with("warning:") && line.contains("sysctl -w net.core.somaxconn="),
        "{line}"
    );
}

#[test]
fn load_many_workers_killed_at_once_are_all_reaped() {
    // Eight workers SIGKILLed in the same instant exit in a burst of SIGCHLDs. A master that
    // drained its signal pipe after reaping could swallow the last wake-up and sleep for
    // ever. That race was seen once, under the full suite's load, in
    // app_ignoring_the_stop_signal_is_killed_after_grace_and_exit_code_says_so; its window
    // is microseconds wide and this test does not hit it reliably (it passed against the
    // old order too): it is a regression check, not a reproduction.
    let _load = load_lock();
    let app = script("stubborn_many.py", STUBBORN_APP);
    for round in 0..5 {
        let mut c = Cluster::start(&[
            "--workers",
            "8",
            "--grace",
            "200ms",
            "--bind",
            "127.0.0.1:0",
            "--ready",
            "notify",
            "--cmd",
            app.to_str().unwrap(),
        ]);
        c.signal(Signal::SIGTERM);
        assert_eq!(
            c.wait_exit(Duration::from_secs(20)),
            Some(3),
            "round {round}"
        );
        assert_eq!(
            c.log()
                .iter()
                .filter(|l| l.contains("exited (signal SIGKILL)"))
                .count(),
            8,
            "round {round}"
        );
    }
}

#[test]
fn workers_of_a_master_on_a_terminal_are_not_stopped_for_reading_stdin() {
    // On a terminal, workers are background process groups: reading the terminal would stop
    // them (SIGTTIN) for good. The master gives them /dev/null as stdin instead.
    let dir = temp_dir("tty");
    let marker = dir.join("read-stdin");
    let app = script(
        "reads_stdin.py",
        &format!(
            "#!/usr/bin/env python3\nimport sys, time\ndata = sys.stdin.read()\nopen('{}', 'w').write('eof %d' % len(data))\ntime.sleep(1000)\n",
            marker.display()
        ),
    );
    let control = dir.join("c.sock");
    // pty.fork: the master runs as a session leader with a pseudo-terminal as stdin.
    let driver = format!(
        r#"
import os, pty, signal, sys, time
pid, fd = pty.fork()
if pid == 0:
    os.execv({bin:?}, [{bin:?}, "--bind", "127.0.0.1:0", "--workers", "1", "--ready", "delay:50ms",
                       "--control", {control:?}, "--cmd", {app:?}])
os.set_blocking(fd, False)
deadline = time.time() + 20
while time.time() < deadline and not os.path.exists({marker:?}):
    try:
        os.read(fd, 4096)
    except OSError:
        pass
    time.sleep(0.05)
os.kill(pid, signal.SIGTERM)
os.waitpid(pid, 0)
print("done")
"#,
        bin = bin(),
        control = control.display().to_string(),
        app = app.display().to_string(),
        marker = marker.display().to_string(),
    );
    let out = std::process::Command::new("python3")
        .args(["-c", &driver])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("done"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(&marker).ok().as_deref(),
        Some("eof 0"),
        "the worker read EOF instead of being stopped"
    );
}
