//! Real servers under the launcher, unmodified (docs/servers.md): gunicorn (sync, gthread),
//! uvicorn, hypercorn, daphne, uWSGI, Node http, express, fastify, Puma, lighttpd, Go
//! net/http and axum + listenfd. Each: two workers answer, a rolling restart under load
//! (the failed requests are measured and printed, `SERVER-RESULT ...`), a clean stop with
//! nothing left behind. scripts/install-servers.sh installs them into
//! /var/cache/reuseport-cluster-test/servers; a test skips, saying why, only when its server
//! could not be installed. Named load_* so that they run one at a time.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::support::*;

fn apps() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/integration/apps/servers")
}

fn venv(program: &str) -> Option<String> {
    installed(&cache().join("venv/bin").join(program))
}

/// The pids that answer new connections (from the body's "pid N" or an X-Pid header):
/// asks until two different pids answered, at most 200 times.
fn answering_pids(addr: std::net::SocketAddr) -> BTreeSet<u32> {
    let mut pids = BTreeSet::new();
    for _ in 0..200 {
        let pid = get(addr).ok().filter(|r| r.status == 200).and_then(|r| {
            r.headers
                .get("x-pid")
                .cloned()
                .or_else(|| r.body.split("pid ").nth(1).map(|s| s.trim().to_string()))
                .and_then(|p| p.parse::<u32>().ok())
        });
        pids.extend(pid);
        if pids.len() >= 2 {
            break;
        }
    }
    pids
}

/// Runs `server` under the launcher (2 workers on `port`): both answer, a rolling restart
/// under load, then the stop signal; prints the figures for docs/servers.md.
fn server_test(server: &str, port: u16, launcher: &[&str], app: &[&str], env: &[(&str, &str)]) {
    let _load = load_lock();
    if !migration_possible() {
        return;
    }
    let tag = unique_tag(server);
    let bind = format!("127.0.0.1:{port}");
    let mut args = vec!["--workers", "2", "--bind", &bind, "--grace", "10s"];
    // Readiness without any change to the app: it waits for connections on its socket.
    if !launcher.contains(&"--ready") {
        args.extend_from_slice(&["--ready", "listening"]);
    }
    // The default steering: BPF where this host allows it (drain before stop), else the hash.
    let (bpf, why_not) = bpf_steering();
    if !bpf {
        eprintln!(
            "{server}: no BPF steering here ({why_not}): new-connection failures not asserted"
        );
    }
    args.extend_from_slice(launcher);
    args.push("--");
    args.extend_from_slice(app);
    let mut envs = vec![("RC_TEST_TAG", tag.as_str())];
    envs.extend_from_slice(env);
    let started = Instant::now();
    let mut c = Cluster::spawn(&args, &envs);
    c.expect_log("workers ready");
    let start_ms = started.elapsed().as_millis();

    let first = answering_pids(c.addr());
    assert_eq!(
        first.len(),
        2,
        "{server}: two workers answer, got pids {first:?}"
    );

    // A rolling restart under load: 4 keep-alive clients and 4 opening a connection per
    // request, from before the restart starts until after it is done.
    let load = Load::start(c.addr(), 8, Duration::from_secs(90));
    let enough = |n: u64| wait_until(TIMEOUT, || load.ok_so_far() >= n);
    assert!(enough(50), "{server}: the load runs");
    let rolled = Instant::now();
    c.signal(Signal::SIGHUP);
    c.expect_log("rolling restart to generation 2 done");
    let roll_ms = rolled.elapsed().as_millis();
    let ok_before = load.ok_so_far();
    assert!(
        enough(ok_before + 50),
        "{server}: the load runs after the restart"
    );
    let stats = load.finish();

    let second = answering_pids(c.addr());
    assert_eq!(
        second.len(),
        2,
        "{server}: two new workers answer: {second:?}"
    );
    assert!(
        first.is_disjoint(&second),
        "{server}: new pids after the restart: {first:?} then {second:?}"
    );

    let stopping = Instant::now();
    c.signal(Signal::SIGTERM);
    let code = c.wait_exit(TIMEOUT);
    let stop_ms = stopping.elapsed().as_millis();
    println!(
        "SERVER-RESULT {server}: start {start_ms} ms; rolling restart {roll_ms} ms under load: \
         {} ok, {} failed ({} new-connection, {} keep-alive) {:?}; stop {stop_ms} ms, exit {code:?}",
        stats.ok, stats.failed, stats.failed_new, stats.failed_keepalive, stats.errors
    );
    if bpf {
        // Issue 13's goal: the old worker is stopped only once it has read what it accepted.
        assert_eq!(
            stats.failed_new, 0,
            "{server}: no new-connection request fails in a rolling restart with BPF steering: {:?}",
            stats.errors
        );
    }
    assert_eq!(code, Some(0), "{server}: a clean stop within --grace");
    assert_eq!(
        tagged_processes(&tag),
        Vec::<u32>::new(),
        "{server}: processes left behind"
    );
}

fn app(name: &str) -> String {
    apps().join(name).to_str().unwrap().to_string()
}

#[test]
fn load_server_gunicorn_sync() {
    let Some(gunicorn) = venv("gunicorn") else {
        return;
    };
    let dir = apps();
    let port = free_port();
    server_test(
        "gunicorn sync",
        port,
        &[],
        &[&gunicorn, "--chdir", dir.to_str().unwrap(), "wsgi:app"],
        &[],
    );
}

#[test]
fn load_server_gunicorn_gthread() {
    let Some(gunicorn) = venv("gunicorn") else {
        return;
    };
    let dir = apps();
    server_test(
        "gunicorn gthread",
        free_port(),
        &[],
        &[
            &gunicorn,
            "-k",
            "gthread",
            "--threads",
            "4",
            "--chdir",
            dir.to_str().unwrap(),
            "wsgi:app",
        ],
        &[],
    );
}

#[test]
fn load_server_uvicorn() {
    let Some(uvicorn) = venv("uvicorn") else {
        return;
    };
    let dir = apps();
    server_test(
        "uvicorn",
        free_port(),
        &[],
        &[
            &uvicorn,
            "--fd",
            "3",
            "--app-dir",
            dir.to_str().unwrap(),
            "asgi:app",
        ],
        &[],
    );
}

#[test]
fn load_server_hypercorn() {
    let Some(hypercorn) = venv("hypercorn") else {
        return;
    };
    let dir = apps();
    server_test(
        "hypercorn",
        free_port(),
        &[],
        &[&hypercorn, "--bind", "fd://3", "asgi:app"],
        &[("PYTHONPATH", dir.to_str().unwrap())],
    );
}

#[test]
fn load_server_daphne() {
    let Some(daphne) = venv("daphne") else { return };
    let dir = apps();
    server_test(
        "daphne",
        free_port(),
        &[],
        &[&daphne, "--fd", "3", "asgi:app"],
        &[("PYTHONPATH", dir.to_str().unwrap())],
    );
}

#[test]
fn load_server_uwsgi() {
    let Some(uwsgi) = which("uwsgi") else { return };
    // SIGTERM means "reload" to uWSGI unless --die-on-term. Its http protocol closes every
    // connection after the response: say so, or keep-alive clients see it closed.
    server_test(
        "uWSGI",
        free_port(),
        &[],
        &[
            &uwsgi,
            "--plugin",
            "python3",
            "--protocol",
            "http",
            "--die-on-term",
            "--add-header",
            "Connection: close",
            "--wsgi-file",
            &app("wsgi.py"),
        ],
        &[],
    );
}

fn node_test(server: &str, script: &str) {
    let Some(node) = which("node") else { return };
    let modules = cache().join("node/node_modules");
    if script != "node_http.js" && !modules.join(server).is_dir() {
        eprintln!("skipped: {server} is not installed (scripts/install-servers.sh: npm)");
        return;
    }
    server_test(
        server,
        free_port(),
        &[],
        &[&node, &app(script)],
        &[("NODE_PATH", modules.to_str().unwrap())],
    );
}

#[test]
fn load_server_node_http() {
    node_test("node http", "node_http.js");
}

#[test]
fn load_server_express() {
    node_test("express", "express.js");
}

#[test]
fn load_server_fastify() {
    node_test("fastify", "fastify.js");
}

#[test]
fn load_server_puma() {
    let Some(puma) = which("puma") else { return };
    // Puma uses an inherited LISTEN_FDS socket when its -b names the same address.
    let port = free_port();
    let bind = format!("tcp://127.0.0.1:{port}");
    server_test(
        "Puma",
        port,
        &[],
        &[
            &puma,
            "-b",
            &bind,
            "--dir",
            apps().to_str().unwrap(),
            &app("config.ru"),
        ],
        &[],
    );
}

#[test]
fn load_server_lighttpd() {
    let Some(lighttpd) = which("lighttpd") else {
        return;
    };
    let root = temp_dir("lighttpd");
    std::fs::write(root.join("index.html"), "hello from lighttpd\n").unwrap();
    // lighttpd stops at once on SIGTERM and drains on SIGINT.
    server_test(
        "lighttpd",
        free_port(),
        &["--stop-signal", "INT"],
        &[&lighttpd, "-D", "-f", &app("lighttpd.conf")],
        &[("RC_LIGHTTPD_ROOT", root.to_str().unwrap())],
    );
}

#[test]
fn load_server_go_net_http() {
    let Some(go) = which("go") else { return };
    let dir = temp_dir("go");
    let out = dir.join("server");
    let build = std::process::Command::new(&go)
        .args(["build", "-o"])
        .arg(&out)
        .arg(app("main.go"))
        .env("GOPROXY", "off")
        .env("GOFLAGS", "-mod=mod")
        .env("GOCACHE", cache().join("go-build"))
        .env("GOPATH", cache().join("go"))
        .output()
        .unwrap();
    assert!(
        build.status.success(),
        "go build: {}",
        String::from_utf8_lossy(&build.stderr)
    );
    server_test(
        "Go net/http",
        free_port(),
        &[],
        &[out.to_str().unwrap()],
        &[],
    );
}

#[test]
fn load_server_axum_listenfd() {
    let Some(axum) = installed(&cache().join("axum/debug/axum-listenfd-app")) else {
        return;
    };
    server_test("axum + listenfd", free_port(), &[], &[&axum], &[]);
}
