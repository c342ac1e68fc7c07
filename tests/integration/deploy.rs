//! Production deploys: privilege drop, systemd's notify protocol, PID 1 in a container.

use std::time::Duration;

use crate::support::*;

/// A privileged port that is free now, or None (and why) when this host has none.
fn free_privileged_port() -> Option<u16> {
    let start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        .ok()
        .and_then(|s| s.trim().parse::<u16>().ok())
        .unwrap_or(1024);
    (600..start.min(1024)).find(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
}

#[test]
fn workers_run_as_nobody_on_a_privileged_port_and_still_roll() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: dropping to another user needs root");
        return;
    }
    let Some(port) = free_privileged_port() else {
        eprintln!("skipped: no privileged port below net.ipv4.ip_unprivileged_port_start is free");
        return;
    };
    let bind = format!("127.0.0.1:{port}");
    let mut c = Cluster::start(&["--workers", "2", "--bind", &bind, "--user", "nobody"]);
    let check = |c: &mut Cluster| {
        for (slot, pid) in c.workers() {
            let uid = status_field(pid, "Uid").unwrap();
            assert!(
                uid.split_whitespace().all(|u| u == "65534"),
                "worker {slot} uid: {uid}"
            );
            let gid = status_field(pid, "Gid").unwrap();
            assert!(
                gid.split_whitespace().all(|g| g == "65534"),
                "worker {slot} gid: {gid}"
            );
            let groups = status_field(pid, "Groups").unwrap_or_default();
            assert!(
                !groups.split_whitespace().any(|g| g == "0"),
                "root's group kept: {groups}"
            );
        }
        for _ in 0..20 {
            assert_eq!(
                get(c.addr()).expect("request to a nobody worker").status,
                200
            );
        }
    };
    check(&mut c);
    c.signal(Signal::SIGHUP);
    c.expect_log("rolling restart to generation 2 done");
    check(&mut c);
    assert!(c.status()["workers"]
        .as_array()
        .unwrap()
        .iter()
        .all(|w| w["generation"] == 2));
}

#[test]
fn unknown_user_or_group_is_refused() {
    let (code, log) = run(&["--bind", "127.0.0.1:0", "--user", "no-such-user-xyz"]);
    assert_eq!(code, Some(2), "{log}");
    assert!(
        log.contains("--user no-such-user-xyz: no such user"),
        "{log}"
    );
    let (code, log) = run(&[
        "--bind",
        "127.0.0.1:0",
        "--user",
        "nobody",
        "--group",
        "no-such-group-xyz",
    ]);
    assert_eq!(code, Some(2), "{log}");
    assert!(
        log.contains("--group no-such-group-xyz: no such group"),
        "{log}"
    );
}

#[test]
fn systemd_hears_ready_reloading_ready_stopping_and_the_watchdog() {
    let systemd = FakeSystemd::new();
    let path = systemd.path.to_str().unwrap().to_string();
    let mut c = Cluster::spawn(
        &[
            "--workers",
            "2",
            "--bind",
            "127.0.0.1:0",
            "--ready",
            "listening",
        ],
        &[("NOTIFY_SOCKET", &path), ("WATCHDOG_USEC", "400000")],
    );
    c.expect_log("workers ready");
    let ready = systemd.expect(0, "READY=1");
    let first = &systemd.messages()[ready];
    assert!(first.contains(&format!("MAINPID={}", c.pid())), "{first}");
    systemd.expect(0, "STATUS=2/2 workers ready, generation 1");
    // Workers never see the master's NOTIFY_SOCKET.
    for pid in c.workers().values() {
        assert_ne!(env_of(*pid).get("NOTIFY_SOCKET"), Some(&path));
    }

    c.signal(Signal::SIGHUP);
    let reloading = systemd.expect(ready + 1, "RELOADING=1");
    let message = &systemd.messages()[reloading];
    let usec: u64 = message
        .lines()
        .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
        .unwrap_or_else(|| panic!("no MONOTONIC_USEC: {message}"))
        .parse()
        .unwrap();
    assert!(usec > 0);
    let ready_again = systemd.expect(reloading + 1, "READY=1");
    c.expect_log("rolling restart to generation 2 done");
    systemd.expect(reloading, "generation 2");

    // The watchdog: WATCHDOG=1 every 200 ms (half of WATCHDOG_USEC).
    let before = systemd
        .messages()
        .iter()
        .filter(|m| m.contains("WATCHDOG=1"))
        .count();
    std::thread::sleep(Duration::from_millis(1100));
    let after = systemd
        .messages()
        .iter()
        .filter(|m| m.contains("WATCHDOG=1"))
        .count();
    assert!(
        after - before >= 3,
        "{} watchdog pings in 1.1 s",
        after - before
    );

    c.signal(Signal::SIGTERM);
    systemd.expect(ready_again + 1, "STOPPING=1");
    assert_eq!(c.wait_exit(TIMEOUT), Some(0));
}

#[test]
fn without_notify_socket_nothing_is_sent_and_nothing_breaks() {
    // Control: the same start and stop with no NOTIFY_SOCKET at all.
    let mut c = Cluster::start(&["--workers", "1", "--bind", "127.0.0.1:0"]);
    c.signal(Signal::SIGTERM);
    assert_eq!(c.wait_exit(TIMEOUT), Some(0));
}

#[test]
fn as_pid_1_of_a_container_it_stops_on_sigterm_reaps_orphans_and_exits_meaningfully() {
    // `unshare --pid --fork --mount-proc` gives the master a new PID namespace in which it is
    // PID 1, as in a container (without an image: what matters is the process model).
    if std::process::Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc", "true"])
        .status()
        .map_or(true, |s| !s.success())
    {
        eprintln!("skipped: unshare --pid is not permitted here (needs root or user namespaces)");
        return;
    }
    let dir = temp_dir("pid1");
    let report = dir.join("grandchild-ppid");
    let app = script(
        "daemonizer.py",
        &format!(
            "#!/usr/bin/env python3\nimport os, socket, time\nif os.fork() == 0:\n    if os.fork() == 0:\n        time.sleep(0.5)\n        open('{}', 'w').write(str(os.getppid()))\n        os._exit(0)\n    os._exit(0)\nsock = socket.socket(fileno=3)\nwhile True:\n    c, _ = sock.accept()\n    c.recv(4096)\n    c.sendall(b'HTTP/1.1 200 OK\\r\\nContent-Length: 3\\r\\nX-Worker: 0\\r\\nConnection: close\\r\\n\\r\\nok\\n')\n    c.close()\n",
            report.display()
        ),
    );
    let mut c = Cluster::spawn_wrapped(
        &["unshare", "--pid", "--fork", "--mount-proc"],
        &[
            "--workers",
            "2",
            "--bind",
            "127.0.0.1:0",
            "--ready",
            "listening",
            "--cmd",
            app.to_str().unwrap(),
        ],
        &[],
    );
    c.expect_log("workers ready");
    let master = c.pid();
    let ns_pids = status_field(master, "NSpid").unwrap();
    assert_eq!(
        ns_pids.split_whitespace().last(),
        Some("1"),
        "the master is PID 1 inside: {ns_pids}"
    );
    assert_eq!(get(c.addr()).unwrap().status, 200);
    assert!(wait_until(TIMEOUT, || std::fs::read_to_string(&report)
        .is_ok_and(|s| !s.is_empty())));
    assert_eq!(
        std::fs::read_to_string(&report).unwrap(),
        "1",
        "orphans are adopted by PID 1, the master"
    );
    let zombies = || {
        children(master)
            .into_iter()
            .filter(|p| status_field(*p, "State").is_some_and(|s| s.starts_with('Z')))
            .count()
    };
    assert!(wait_until(TIMEOUT, || zombies() == 0), "PID 1 left zombies");
    // The runtime's SIGTERM: a graceful stop, and the exit status says it was clean.
    c.signal(Signal::SIGTERM);
    assert_eq!(
        c.wait_exit(TIMEOUT),
        Some(0),
        "unshare passes on the master's exit status"
    );
    c.expect_log("all workers stopped");
}

/// Seconds of a duration flag value such as `20s`.
fn seconds(value: &str) -> u64 {
    value
        .trim_end_matches('s')
        .parse()
        .unwrap_or_else(|_| panic!("{value:?} is not N s"))
}

/// The value following `flag` in `args`.
fn flag<'a>(args: &'a [String], flag: &str) -> &'a str {
    let i = args
        .iter()
        .position(|a| a == flag)
        .unwrap_or_else(|| panic!("no {flag} in {args:?}"));
    &args[i + 1]
}

/// Starts the real binary with `args` (addresses made local and free) and stops it.
fn starts_with(args: &[String]) {
    let args: Vec<String> = args
        .iter()
        .map(|a| {
            if a.starts_with("0.0.0.0:") {
                "127.0.0.1:0".to_string()
            } else {
                a.clone()
            }
        })
        .map(|a| {
            if a == "/tmp/reuseport-cluster.sock" {
                temp_dir("sock").join("c.sock").display().to_string()
            } else {
                a
            }
        })
        .collect();
    let mut refs: Vec<&str> = args.iter().map(String::as_str).collect();
    refs.extend(["--workers", "1"]);
    let mut c = Cluster::start(&refs);
    c.signal(Signal::SIGTERM);
    assert_eq!(c.wait_exit(TIMEOUT), Some(0), "{args:?}");
}

#[test]
fn kubernetes_manifests_give_the_master_time_to_stop_gracefully() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join("deploy/kubernetes/deployment.yaml")).unwrap();
    let d: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    assert_eq!(d["kind"], "Deployment");
    let pod = &d["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let args: Vec<String> = container["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect();
    let grace = seconds(flag(&args, "--grace"));
    let pre_stop: u64 = container["lifecycle"]["preStop"]["exec"]["command"][1]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let termination = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
    assert!(
        termination > pre_stop + grace,
        "terminationGracePeriodSeconds {termination} <= preStop {pre_stop} + --grace {grace}"
    );
    assert_eq!(container["readinessProbe"]["httpGet"]["port"], "http");
    let liveness: Vec<String> = container["livenessProbe"]["exec"]["command"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect();
    assert_eq!(liveness[1], "status");
    assert_eq!(
        flag(&liveness, "--control"),
        flag(&args, "--control"),
        "the probe asks the master it runs"
    );
    let ports: Vec<u64> = container["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| p["containerPort"].as_u64().unwrap())
        .collect();
    assert!(ports.contains(&8000) && ports.contains(&9100));
    assert_eq!(d["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"], 0);
    let service: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(root.join("deploy/kubernetes/service.yaml")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        service["spec"]["selector"],
        d["spec"]["selector"]["matchLabels"]
    );
    // The container's arguments are ones the launcher accepts.
    starts_with(&args);
}

#[test]
fn systemd_unit_and_dockerfile_match_the_launcher() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let unit =
        std::fs::read_to_string(root.join("deploy/systemd/reuseport-cluster@.service")).unwrap();
    let value = |key: &str| {
        unit.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("no {key}= in the unit"))
            .to_string()
    };
    // Type=notify-reload needs systemd 253; Debian 12 and RHEL 9 have 252.
    assert_eq!(value("Type"), "notify", "the master sends READY=1");
    assert_eq!(
        value("ExecReload"),
        "/usr/bin/reuseport-cluster reload --name %i",
        "systemctl reload waits for the rolling restart's outcome"
    );
    assert_eq!(
        value("KillMode"),
        "mixed",
        "systemd signals the master, which stops its workers"
    );
    assert_eq!(value("NotifyAccess"), "main");
    let example_grace = unit
        .lines()
        .find_map(|l| l.split("--grace ").nth(1))
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap();
    assert!(
        seconds(&value("TimeoutStopSec")) > seconds(example_grace),
        "TimeoutStopSec must exceed --grace"
    );
    assert!(value("ExecStart").starts_with("/usr/bin/reuseport-cluster --name %i"));

    let dockerfile = std::fs::read_to_string(root.join("deploy/Dockerfile")).unwrap();
    assert!(dockerfile.contains(
        "COPY --from=build /src/target/release/reuseport-cluster /usr/local/bin/reuseport-cluster"
    ));
    let json = |prefix: &str| -> Vec<String> {
        let line = dockerfile.lines().find(|l| l.starts_with(prefix)).unwrap();
        serde_json::from_str(line.trim_start_matches(prefix).trim()).unwrap()
    };
    assert_eq!(json("ENTRYPOINT"), vec!["/usr/local/bin/reuseport-cluster"]);
    starts_with(&json("CMD"));
}

#[test]
fn doctor_explains_each_check_and_fails_on_a_taken_port() {
    let doctor = |args: &[&str]| {
        let out = std::process::Command::new(bin())
            .arg("doctor")
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (code, out) = doctor(&["--bind", "127.0.0.1:0", "--workers", "1"]);
    assert_eq!(code, Some(0), "{out}");
    for topic in [
        "kernel",
        "SO_REUSEPORT",
        "tcp_migrate_req",
        "somaxconn",
        "open files limit",
        "CPUs in the affinity mask",
        "127.0.0.1:0",
        "NOTIFY_SOCKET",
    ] {
        assert!(out.contains(topic), "no line about {topic}:\n{out}");
    }
    assert!(
        out.lines()
            .all(|l| l.starts_with("ok ") || l.starts_with("warn ") || l.starts_with("fail ")),
        "{out}"
    );

    let plain = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = plain.local_addr().unwrap().to_string();
    let (code, out) = doctor(&["--bind", &taken]);
    assert_eq!(code, Some(1), "{out}");
    let line = out
        .lines()
        .find(|l| l.starts_with("fail"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        line.contains(&taken) && line.contains("without SO_REUSEPORT"),
        "{line}"
    );
}

#[test]
fn load_multihost_demo_through_haproxy_loses_no_request() {
    // scripts/multihost-demo.sh: two network-namespace hosts behind HAProxy; one does
    // rolling restarts, the other's master is stopped and started again, under wrk.
    let _load = load_lock();
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: ip netns needs root");
        return;
    }
    for tool in ["haproxy", "wrk", "ip"] {
        if std::process::Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .map_or(true, |o| !o.status.success())
        {
            eprintln!("skipped: {tool} is missing and scripts/install-multihost-tools.sh could not install it");
            return;
        }
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = std::process::Command::new(root.join("scripts/multihost-demo.sh"))
        .arg("10")
        .env("REUSEPORT_CLUSTER_BIN", bin())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("host 1: 2 rolling restarts done"),
        "{stdout}"
    );
    assert!(
        stdout.contains("host 2: 1 graceful stop(s), 2 start(s)"),
        "{stdout}"
    );
    let requests: u64 = stdout
        .lines()
        .find_map(|l| {
            l.trim()
                .split(" requests in ")
                .next()
                .filter(|_| l.contains(" requests in "))
        })
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no wrk summary: {stdout}"));
    assert!(requests > 1000, "{stdout}");
    assert!(stdout.contains("failed requests: 0"), "{stdout}");
    let namespaces = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&namespaces.stdout).contains("rc-"),
        "namespaces left behind"
    );
}

#[test]
fn a_supervisor_that_never_reads_its_notify_socket_cannot_stall_the_master() {
    let path = temp_dir("deaf-systemd").join("notify.sock");
    let _deaf = std::os::unix::net::UnixDatagram::bind(&path).unwrap(); // never read
    let path = path.to_str().unwrap().to_string();
    let mut c = Cluster::spawn(
        &[
            "--workers",
            "1",
            "--bind",
            "127.0.0.1:0",
            "--name",
            &unique_tag("deaf"),
        ],
        &[("NOTIFY_SOCKET", &path), ("WATCHDOG_USEC", "20000")],
    );
    c.expect_log("workers ready");
    // A WATCHDOG=1 every 10 ms fills the socket's queue within a second or two.
    std::thread::sleep(Duration::from_secs(2));
    let t0 = std::time::Instant::now();
    assert_eq!(c.ctl(&["status"]).0, Some(0));
    assert!(
        t0.elapsed() < Duration::from_secs(3),
        "status took {:?}",
        t0.elapsed()
    );
    c.signal(Signal::SIGTERM);
    assert_eq!(c.wait_exit(TIMEOUT), Some(0));
}

#[test]
fn completions_and_man_pages_come_from_the_command_line_definition() {
    for (shell, marker) in [
        ("bash", "complete -F"),
        ("zsh", "#compdef reuseport-cluster"),
        ("fish", "complete -c reuseport-cluster"),
    ] {
        let out = std::process::Command::new(bin())
            .args(["completions", shell])
            .output()
            .unwrap();
        assert!(out.status.success(), "completions {shell}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains(marker), "completions {shell}: no {marker:?}");
        assert!(
            text.contains("rolling-batch"),
            "completions {shell}: flags missing"
        );
    }
    let out = std::process::Command::new(bin())
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{log}");
    assert!(log.contains("possible values: bash"), "{log}");

    let dir = temp_dir("man");
    let status = std::process::Command::new(bin())
        .arg("__man")
        .arg(&dir)
        .status()
        .unwrap();
    assert!(status.success());
    let page = std::fs::read_to_string(dir.join("reuseport-cluster.1")).unwrap();
    assert!(
        page.starts_with(".ie \\n(.g .ds Aq"),
        "not roff: {}",
        &page[..60]
    );
    assert!(
        page.contains("rolling\\-batch"),
        "flags missing from the man page"
    );
    for sub in ["status", "reload", "scale", "stop", "doctor", "completions"] {
        assert!(
            dir.join(format!("reuseport-cluster-{sub}.1")).exists(),
            "no man page for {sub}"
        );
    }
    assert!(!dir.join("reuseport-cluster-__demo-worker.1").exists());
}
