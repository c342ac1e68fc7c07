//! The control socket and its client commands: status, reload, scale, stop.

use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::time::Duration;

use crate::support::*;

#[test]
fn status_text_and_json_tell_the_truth_about_every_worker() {
    let mut c = Cluster::start(&[
        "--workers",
        "3",
        "--bind",
        "web=127.0.0.1:0",
        "--name",
        &unique_tag("status"),
    ]);
    let workers = c.workers();
    let json = c.status();
    assert_eq!(json["master_pid"], c.pid());
    assert_eq!(json["generation"], 1);
    assert_eq!(json["workers_configured"], 3);
    assert_eq!(json["workers_ready"], 3);
    assert_eq!(json["binds"][0]["name"], "web");
    assert_eq!(json["binds"][0]["addr"], c.addr().to_string());
    assert!(json["rolling_restart"].is_null());
    assert!(json["migrate"]
        .as_str()
        .unwrap()
        .contains("tcp_migrate_req"));
    let listed = json["workers"].as_array().unwrap();
    assert_eq!(listed.len(), 3);
    let backlog = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .map(|s| s.trim().parse::<u64>().unwrap().min(1024))
        .unwrap_or(1024);
    for w in listed {
        let slot = w["slot"].as_u64().unwrap() as usize;
        let pid = w["pid"].as_u64().unwrap() as u32;
        assert_eq!(workers[&slot], pid, "pid of slot {slot} matches /proc");
        assert_eq!(
            w["cpu"].as_u64().unwrap().to_string(),
            status_field(pid, "Cpus_allowed_list").unwrap(),
            "cpu of slot {slot} matches /proc"
        );
        assert_eq!(w["state"], "ready");
        assert_eq!(w["generation"], 1);
        assert_eq!(w["restarts"], 0);
        assert!(w["uptime_s"].as_f64().unwrap() > 0.0);
        assert_eq!(w["queues"][0]["fd"], 3);
        assert_eq!(w["queues"][0]["depth"], 0);
        assert_eq!(
            w["queues"][0]["backlog"].as_u64(),
            Some(backlog),
            "the effective backlog"
        );
    }
    let (code, text, _) = c.ctl(&["status"]);
    assert_eq!(code, Some(0));
    assert!(
        text.contains(&format!("master pid {}", c.pid())) && text.contains("3/3 workers ready"),
        "{text}"
    );
    for pid in workers.values() {
        assert!(text.contains(&pid.to_string()), "{text}");
    }
}

#[test]
fn a_stopped_worker_shows_a_growing_accept_queue_that_drains_after_sigcont() {
    // The kernel's hash keeps sending the stopped worker its share (--steer bpf would take
    // it out of rotation: tests/integration/steering.rs).
    let mut c = Cluster::start(&[
        "--steer",
        "hash",
        "--workers",
        "2",
        "--bind",
        "127.0.0.1:0",
        "--name",
        &unique_tag("queue"),
    ]);
    let stuck = c.workers()[&1];
    signal(stuck, Signal::SIGSTOP);
    let depth = |c: &Cluster| {
        c.status()["workers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|w| w["pid"] == stuck)
            .map(|w| w["queues"][0]["depth"].as_u64().unwrap())
            .unwrap()
    };
    // The kernel completes handshakes for the stopped worker's socket and queues them.
    let mut conns = Vec::new();
    let grew = wait_until(TIMEOUT, || {
        conns.extend((0..4).filter_map(|_| TcpStream::connect(c.addr()).ok()));
        depth(&c) >= 5
    });
    let seen = depth(&c);
    signal(stuck, Signal::SIGCONT);
    assert!(grew, "queue of the stopped worker: {seen}");
    assert!(
        wait_until(TIMEOUT, || depth(&c) == 0),
        "the queue drains after SIGCONT"
    );
    let (_, text, _) = c.ctl(&["status"]);
    let line = text
        .lines()
        .find(|l| l.contains(&format!(" {stuck} ")))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        line.contains(" 0/"),
        "the stuck worker's queue is back to 0: {line}"
    );
}

#[test]
fn another_uid_is_refused() {
    let c = Cluster::start(&[
        "--workers",
        "1",
        "--bind",
        "127.0.0.1:0",
        "--name",
        &unique_tag("uid"),
    ]);
    let control = c.control.clone().unwrap();
    let as_nobody = || {
        std::process::Command::new(bin())
            .args(["status", "--control"])
            .arg(&control)
            .uid(65534)
            .gid(65534)
            .output()
            .unwrap()
    };
    // The socket file is 0600: the kernel refuses nobody before the master sees it.
    assert_eq!(
        std::fs::metadata(&control).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let out = as_nobody();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("ermission denied"));
    // Even when the file is opened up, the master checks the peer's uid (SO_PEERCRED).
    for dir in [control.parent().unwrap(), &control] {
        let mode = if dir == control.as_path() {
            0o666
        } else {
            0o755
        };
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    let out = as_nobody();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("uid 65534 may not control this cluster"),
        "{stderr}"
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).is_empty(),
        "no status leaked"
    );
}

#[test]
fn reload_does_what_sighup_does() {
    let mut c = Cluster::start(&[
        "--workers",
        "2",
        "--bind",
        "127.0.0.1:0",
        "--name",
        &unique_tag("reload"),
    ]);
    let (code, out, _) = c.ctl(&["reload", "--no-wait"]);
    assert_eq!(
        (code, out.as_str()),
        (
            Some(0),
            "ok: rolling restart to generation 2 of 2 workers started\n"
        )
    );
    c.expect_log("rolling restart to generation 2 done");
    for w in c.status()["workers"].as_array().unwrap() {
        assert_eq!(w["generation"], 2);
    }
}

#[test]
fn a_second_master_with_the_same_name_is_refused() {
    let name = unique_tag("twice");
    let c = Cluster::start(&["--workers", "1", "--bind", "127.0.0.1:0", "--name", &name]);
    let (code, log) = run(&["--workers", "1", "--bind", "127.0.0.1:0", "--name", &name]);
    assert_eq!(code, Some(1), "{log}");
    assert!(
        log.contains(&format!(
            "another reuseport-cluster is already running as {name}, pid {}",
            c.pid()
        )),
        "{log}"
    );
}

#[test]
fn stop_stops_gracefully_and_clients_explain_a_missing_cluster() {
    let mut c = Cluster::start(&[
        "--workers",
        "2",
        "--bind",
        "127.0.0.1:0",
        "--name",
        &unique_tag("stop"),
    ]);
    let (code, out, _) = c.ctl(&["stop", "--no-wait"]);
    assert_eq!((code, out.as_str()), (Some(0), "ok: stopping\n"));
    assert_eq!(c.wait_exit(TIMEOUT), Some(0));
    assert!(
        !c.control.as_ref().unwrap().exists(),
        "the socket file is removed"
    );
    let (code, _, err) = c.ctl(&["status"]);
    assert_eq!(code, Some(1));
    assert!(
        err.starts_with("error: no reuseport-cluster is running at"),
        "{err}"
    );
}

#[test]
fn load_scale_up_and_down_by_command_and_signal_without_failed_requests() {
    let _load = load_lock();
    let mut c = Cluster::start(&[
        "--workers",
        "2",
        "--bind",
        "127.0.0.1:0",
        "--name",
        &unique_tag("scale"),
    ]);
    let load = Load::start(c.addr(), 16, Duration::from_secs(120));
    let count = |c: &mut Cluster| c.workers().len();
    let ready = |c: &Cluster, n: u64| {
        let s = c.status();
        s["workers_configured"] == n
            && s["workers_ready"] == n
            && s["workers"].as_array().unwrap().len() as u64 == n
    };

    assert_eq!(c.ctl(&["scale", "4"]).0, Some(0));
    assert!(wait_until(TIMEOUT, || ready(&c, 4)), "{:?}", c.status());
    assert_eq!(count(&mut c), 4);
    let cpus = allowed_cpus();
    for (slot, pid) in c.workers() {
        assert_eq!(
            status_field(pid, "Cpus_allowed_list").unwrap(),
            cpus[slot % cpus.len()].to_string()
        );
    }
    assert_eq!(c.ctl(&["scale", "1"]).0, Some(0));
    assert!(wait_until(TIMEOUT, || ready(&c, 1) && count(&mut c) == 1));
    assert_eq!(
        c.workers().keys().copied().collect::<Vec<_>>(),
        vec![0],
        "the highest slots went"
    );

    c.signal(Signal::SIGTTIN);
    assert!(wait_until(TIMEOUT, || ready(&c, 2)));
    c.signal(Signal::SIGTTOU);
    assert!(wait_until(TIMEOUT, || ready(&c, 1) && count(&mut c) == 1));
    c.signal(Signal::SIGTTOU);
    std::thread::sleep(Duration::from_millis(300));
    assert!(ready(&c, 1), "never below one worker");

    let stats = load.finish();
    eprintln!(
        "load while scaling: {} ok, {} failed {:?}",
        stats.ok, stats.failed, stats.errors
    );
    assert!(stats.ok > 100);
    assert_eq!(stats.failed, 0, "{:?}", stats.errors);
}

/// Writes 2 500 numbered lines to stdout as fast as it can, says READY=1, and on SIGTERM
/// writes a last line without a newline and exits.
const CHATTY_APP: &str = r#"#!/usr/bin/env python3
import os, signal, socket, sys, time
slot = os.environ["REUSEPORT_CLUSTER_WORKER"]
def bye(*_):
    sys.stdout.write("bye from " + slot)
    sys.stdout.flush()
    os._exit(0)
signal.signal(signal.SIGTERM, bye)
for i in range(2500):
    sys.stdout.write("line %s %d %s\n" % (slot, i, "x" * 50))
sys.stdout.flush()
sys.stderr.write("to stderr from " + slot + "\n")
sys.stderr.flush()
addr = os.environ["NOTIFY_SOCKET"]
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.connect("\0" + addr[1:] if addr.startswith("@") else addr)
s.send(b"READY=1")
while True:
    time.sleep(1)
"#;

#[test]
fn load_log_prefix_delivers_every_line_whole_including_the_last_one() {
    let _load = load_lock();
    let app = script("chatty.py", CHATTY_APP);
    let mut c = Cluster::spawn(
        &[
            "--workers",
            "4",
            "--bind",
            "127.0.0.1:0",
            "--ready",
            "notify",
            "--log-prefix",
            "--cmd",
            app.to_str().unwrap(),
        ],
        &[],
    );
    c.expect_log("workers ready");
    let workers = c.workers();
    assert!(
        wait_until(TIMEOUT, || c.stdout_lines().len() >= 10_000),
        "{} lines",
        c.stdout_lines().len()
    );
    for slot in 0..4 {
        c.expect_log(&format!(
            "[w{slot} {}] to stderr from {slot}",
            workers[&slot]
        ));
    }
    c.signal(Signal::SIGTERM);
    assert_eq!(c.wait_exit(TIMEOUT), Some(0));
    std::thread::sleep(Duration::from_millis(100));
    let lines = c.stdout_lines();
    let mut seen = std::collections::HashSet::new();
    for line in &lines {
        let (prefix, rest) = line
            .split_once("] ")
            .unwrap_or_else(|| panic!("no prefix: {line:?}"));
        let mut p = prefix.trim_start_matches("[w").split(' ');
        let (slot, pid): (usize, u32) = (
            p.next().unwrap().parse().unwrap(),
            p.next().unwrap().parse().unwrap(),
        );
        assert_eq!(workers[&slot], pid, "{line}");
        if let Some(bye) = rest.strip_prefix("bye from ") {
            assert_eq!(bye, slot.to_string(), "{line}");
            seen.insert((slot, usize::MAX));
            continue;
        }
        let f: Vec<&str> = rest.split(' ').collect();
        assert!(
            f.len() == 4 && f[0] == "line" && f[1] == slot.to_string() && f[3] == "x".repeat(50),
            "mangled: {line:?}"
        );
        assert!(
            seen.insert((slot, f[2].parse::<usize>().unwrap())),
            "duplicate: {line}"
        );
    }
    assert_eq!(
        seen.len(),
        10_000 + 4,
        "every line once, and each worker's last words"
    );
}

#[test]
fn log_format_json_writes_one_object_per_line_with_the_worker_fields() {
    let mut c = Cluster::spawn(
        &[
            "--workers",
            "2",
            "--bind",
            "127.0.0.1:0",
            "--log-format",
            "json",
        ],
        &[],
    );
    c.expect_log("workers ready");
    let workers = c.workers();
    c.signal(Signal::SIGTERM);
    assert_eq!(c.wait_exit(TIMEOUT), Some(0));
    let mut about_workers = 0;
    for line in c.log() {
        let v: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(
            v["ts"].is_string() && v["level"] == "info" && v["msg"].is_string(),
            "{line}"
        );
        if v["msg"].as_str().unwrap().starts_with("worker ") {
            let slot = v["slot"].as_u64().unwrap() as usize;
            assert_eq!(v["pid"].as_u64().unwrap() as u32, workers[&slot], "{line}");
            assert_eq!(v["generation"], 1, "{line}");
            about_workers += 1;
        }
    }
    assert!(
        about_workers >= 6,
        "started, ready, stopping, exited of 2 workers"
    );
    // A start-up error is JSON too.
    let (code, log) = run(&[
        "--workers",
        "0",
        "--bind",
        "127.0.0.1:0",
        "--log-format",
        "json",
    ]);
    assert_eq!(code, Some(2));
    let v: serde_json::Value = serde_json::from_str(log.lines().last().unwrap()).unwrap();
    assert_eq!(v["level"], "error");
    assert!(v["msg"].as_str().unwrap().contains("--workers 0"));
}

/// GET /metrics, parsed by a real Prometheus parser: (metric, labels) -> value.
fn scrape(addr: &str) -> Vec<(String, std::collections::HashMap<String, String>, f64)> {
    use std::io::{Read, Write};
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    assert!(
        head.starts_with("HTTP/1.1 200") && head.contains("text/plain; version=0.0.4"),
        "{head}"
    );
    let scrape = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).unwrap();
    let mut series = std::collections::HashSet::new();
    for sample in &scrape.samples {
        let mut labels: Vec<String> = sample
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        labels.sort();
        assert!(
            series.insert((sample.metric.clone(), labels)),
            "duplicate series {}",
            sample.metric
        );
    }
    assert!(!scrape.samples.is_empty(), "{body}");
    scrape
        .samples
        .into_iter()
        .map(|s| {
            let value = match s.value {
                prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Gauge(v) => v,
                other => panic!("{} is not a counter or gauge: {other:?}", s.metric),
            };
            let labels = s
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            (s.metric, labels, value)
        })
        .collect()
}

fn sample(
    samples: &[(String, std::collections::HashMap<String, String>, f64)],
    metric: &str,
    labels: &[(&str, &str)],
) -> Option<f64> {
    samples
        .iter()
        .find(|(m, l, _)| {
            m == metric
                && labels
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, _, v)| *v)
}

#[test]
fn metrics_parse_as_prometheus_text_and_follow_the_cluster() {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let name = unique_tag("metrics");
    let mut c = Cluster::start(&[
        "--workers",
        "2",
        "--bind",
        "web=127.0.0.1:0",
        "--metrics",
        &addr,
        "--name",
        &name,
    ]);
    c.expect_log(&format!("metrics at http://{addr}/metrics"));
    let m = scrape(&addr);
    let cluster = [("cluster", name.as_str())];
    assert_eq!(
        sample(&m, "reuseport_cluster_workers_configured", &cluster),
        Some(2.0)
    );
    assert_eq!(
        sample(&m, "reuseport_cluster_workers_ready", &cluster),
        Some(2.0)
    );
    assert_eq!(
        sample(&m, "reuseport_cluster_generation", &cluster),
        Some(1.0)
    );
    for slot in ["0", "1"] {
        assert_eq!(
            sample(
                &m,
                "reuseport_cluster_worker_restarts_total",
                &[("slot", slot)]
            ),
            Some(0.0)
        );
        assert_eq!(
            sample(
                &m,
                "reuseport_cluster_accept_queue_depth",
                &[("slot", slot), ("bind", "web")]
            ),
            Some(0.0)
        );
        assert!(
            sample(
                &m,
                "reuseport_cluster_accept_queue_backlog",
                &[("slot", slot), ("bind", "web")]
            )
            .unwrap()
                > 0.0
        );
        assert!(
            sample(
                &m,
                "reuseport_cluster_worker_uptime_seconds",
                &[("slot", slot)]
            )
            .unwrap()
                > 0.0
        );
    }
    // A crash and a rolling restart show up.
    let old = c.workers()[&1];
    signal(old, Signal::SIGKILL);
    assert!(wait_until(TIMEOUT, || c
        .workers()
        .get(&1)
        .is_some_and(|p| *p != old)));
    c.signal(Signal::SIGHUP);
    c.expect_log("rolling restart to generation 2 done");
    let m = scrape(&addr);
    assert_eq!(
        sample(
            &m,
            "reuseport_cluster_worker_restarts_total",
            &[("slot", "1")]
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(&m, "reuseport_cluster_rolling_restarts_total", &cluster),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &m,
            "reuseport_cluster_rolling_restarts_failed_total",
            &cluster
        ),
        Some(0.0)
    );
    assert_eq!(
        sample(&m, "reuseport_cluster_generation", &cluster),
        Some(2.0)
    );
    // The SIGKILL from here is a death by another process; one death is no crash loop.
    assert_eq!(
        sample(
            &m,
            "reuseport_cluster_worker_deaths_total",
            &[("cause", "other_process")]
        ),
        Some(1.0)
    );
    for cause in ["exit", "signal", "oom_killer", "unknown"] {
        assert_eq!(
            sample(
                &m,
                "reuseport_cluster_worker_deaths_total",
                &[("cause", cause)]
            ),
            Some(0.0),
            "{cause}"
        );
    }
    assert_eq!(
        sample(&m, "reuseport_cluster_degraded", &cluster),
        Some(0.0)
    );
    // Nothing stalled: no queue was moved (the counter is there under every steering).
    assert_eq!(
        sample(&m, "reuseport_cluster_queues_moved_total", &cluster),
        Some(0.0)
    );
    // Anything but GET /metrics gets a plain refusal.
    use std::io::{Read, Write};
    let mut s = TcpStream::connect(&addr).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    assert!(raw.starts_with("HTTP/1.1 404"), "{raw}");
}

/// `status` through the control socket answers within `limit`.
fn answers_quickly(c: &Cluster, limit: Duration) {
    let t0 = std::time::Instant::now();
    let (code, out, err) = c.ctl(&["status"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(t0.elapsed() < limit, "status took {:?}", t0.elapsed());
}

#[test]
fn load_a_worker_writing_without_newlines_does_not_stall_the_master() {
    let _load = load_lock();
    let app = script(
        "no_newlines.py",
        "#!/usr/bin/env python3\nimport sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n    sys.stdout.flush()\n",
    );
    let mut c = Cluster::start(&[
        "--workers",
        "1",
        "--bind",
        "127.0.0.1:0",
        "--ready",
        "delay:50ms",
        "--log-prefix",
        "--cmd",
        app.to_str().unwrap(),
    ]);
    std::thread::sleep(Duration::from_secs(1));
    answers_quickly(&c, Duration::from_secs(3));
    let rss_kib: u64 = status_field(c.pid(), "VmRSS")
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        rss_kib < 64 * 1024,
        "the master buffers without bound: {rss_kib} KiB"
    );
    c.signal(Signal::SIGTERM);
    assert_eq!(c.wait_exit(TIMEOUT), Some(0));
}

#[test]
fn more_than_eight_control_clients_are_turned_away_at_once() {
    use std::io::Read;
    let c = Cluster::start(&[
        "--workers",
        "1",
        "--bind",
        "127.0.0.1:0",
        "--name",
        &unique_tag("busy"),
    ]);
    let control = c.control.clone().unwrap();
    let fds_before = fds(c.pid()).len();
    // Eight clients that connect and say nothing hold every place.
    let idle: Vec<_> = (0..8)
        .map(|_| std::os::unix::net::UnixStream::connect(&control).unwrap())
        .collect();
    assert!(wait_until(TIMEOUT, || fds(c.pid()).len() >= fds_before + 8));
    let mut ninth = std::os::unix::net::UnixStream::connect(&control).unwrap();
    ninth
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let mut answer = String::new();
    let _ = ninth.read_to_string(&mut answer);
    assert_eq!(answer, "error: too many control connections; retry\n");
    assert!(
        fds(c.pid()).len() <= fds_before + 8,
        "a refused client holds no fd"
    );
    // The idle ones time out (5 s), then status works again.
    assert!(wait_until(TIMEOUT, || c.ctl(&["status"]).0 == Some(0)));
    drop(idle);
}
