//! Helpers shared by the integration tests: start the real binary, read its log, find its
//! workers in /proc, talk HTTP over real TCP, and clean up even when an assertion fails.

#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use nix::sys::signal::Signal;

/// The python3 HTTP app of the tests (tests/integration/apps/http_app.py).
pub const PYTHON_HTTP_APP: &str = include_str!("apps/http_app.py");
/// A python app that closes its listener on SIGTERM without draining its queue.
pub const PYTHON_CLOSE_APP: &str = include_str!("apps/close_app.py");
/// A python app that accepts eagerly and, when it stops, closes what it accepted but has
/// not read (as uvicorn does).
pub const PYTHON_EAGER_APP: &str = include_str!("apps/eager_app.py");
/// A Node app that calls server.close() on SIGTERM.
pub const NODE_CLOSE_APP: &str = include_str!("apps/close_app.js");

/// Generous upper bound for anything that should take a second or two.
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// Path of the binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_reuseport-cluster")
}

/// Polls `cond` until it holds or `timeout` passes: first every millisecond (so that the
/// benchmarks can time fast events), backing off to every 20 ms.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    let mut interval = Duration::from_millis(1);
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(interval);
        interval = (interval * 2).min(Duration::from_millis(20));
    }
}

/// `workers` workers of `app` on 127.0.0.1, ready when listening, with `extra` options,
/// once all are ready.
pub fn app_cluster(
    app: &std::path::Path,
    workers: usize,
    extra: &[&str],
    env: &[(&str, &str)],
) -> Cluster {
    let workers = workers.to_string();
    let mut args = vec![
        "--workers",
        &workers,
        "--bind",
        "127.0.0.1:0",
        "--ready",
        "listening",
    ];
    args.extend_from_slice(extra);
    args.extend(["--", app.to_str().unwrap()]);
    let mut c = Cluster::spawn(&args, env);
    c.expect_log("workers ready");
    c
}

/// A running master, killed with its workers when dropped.
pub struct Cluster {
    _lock: Option<MachineLock>,
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
    stdout: Arc<Mutex<Vec<String>>>,
    /// The sockets the master announced, in fd order.
    pub addrs: Vec<SocketAddr>,
    /// The control socket the master announced.
    pub control: Option<PathBuf>,
    seen_workers: Vec<u32>,
    status: Option<ExitStatus>,
    /// Set once the reader of the master's stderr has seen EOF (every line is in `log`).
    stderr_closed: Arc<std::sync::atomic::AtomicBool>,
    /// Started through a wrapper (unshare): the master is the wrapper's child.
    wrapped: bool,
    /// When the binary was started (after the machine-wide test lock was taken).
    pub spawned: Instant,
}

impl Cluster {
    /// Starts the binary with `args` and waits until it says all its workers are up.
    pub fn start(args: &[&str]) -> Cluster {
        let mut c = Cluster::spawn(args, &[]);
        c.expect_log("workers ready");
        c
    }

    /// Starts the binary and returns at once (after it has announced its sockets, unless
    /// it exits first).
    pub fn spawn(args: &[&str], env: &[(&str, &str)]) -> Cluster {
        Cluster::spawn_wrapped(&[], args, env)
    }

    /// Like [`Cluster::spawn`], with the binary run by `wrapper` (e.g. `unshare --pid --fork`).
    pub fn spawn_wrapped(wrapper: &[&str], args: &[&str], env: &[(&str, &str)]) -> Cluster {
        let lock = machine_lock(false);
        // A control socket in a temp dir, so that the host-wide default directory stays
        // clean of test files: its own, or one per --name (two masters of one name must
        // meet at the same lock), unless the test gives --control itself.
        let name = args
            .iter()
            .position(|a| *a == "--name")
            .map(|i| args[i + 1]);
        let control = match name {
            Some(name) => {
                let dir =
                    std::env::temp_dir().join(format!("rc-test-names-{}", std::process::id()));
                std::fs::create_dir_all(&dir).unwrap();
                dir.join(format!("{name}.sock"))
            }
            None => temp_dir("ctl").join("c.sock"),
        };
        let control_args: Vec<&str> = match args.contains(&"--control") {
            false => vec!["--control", control.to_str().unwrap()],
            true => vec![],
        };
        let mut cmd = match wrapper {
            [program, rest @ ..] => {
                let mut cmd = Command::new(program);
                cmd.args(rest).arg(bin());
                cmd
            }
            [] => Command::new(bin()),
        };
        cmd.args(&control_args)
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let spawned = Instant::now();
        let mut child = cmd.spawn().expect("starting reuseport-cluster");
        let stderr = child.stderr.take().unwrap();
        let stdout_pipe = child.stdout.take().unwrap();
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let out_sink = Arc::clone(&stdout);
        std::thread::spawn(move || {
            for line in lossy_lines(stdout_pipe) {
                out_sink.lock().unwrap().push(line);
            }
        });
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&log);
        let stderr_closed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let closed = Arc::clone(&stderr_closed);
        std::thread::spawn(move || {
            let _closed = SetOnDrop(closed);
            for line in lossy_lines(stderr) {
                eprintln!("  | {line}");
                sink.lock().unwrap().push(line);
            }
        });
        let mut c = Cluster {
            _lock: lock,
            spawned,
            child,
            log,
            stdout,
            addrs: Vec::new(),
            control: None,
            seen_workers: Vec::new(),
            status: None,
            stderr_closed,
            wrapped: !wrapper.is_empty(),
        };
        wait_until(TIMEOUT, || c.log_contains("control socket") || c.exited());
        if let Some(line) = c.log().into_iter().find(|l| l.contains("sockets:")) {
            c.addrs = parse_sockets(&line);
        }
        c.control = c.log().into_iter().find_map(|l| {
            let rest = l.strip_prefix("control socket ")?;
            Some(PathBuf::from(rest.split(" (name").next()?))
        });
        c
    }

    /// Runs a client command (`status`, `scale 3`…) against this master; returns
    /// (exit code, stdout, stderr).
    pub fn ctl(&self, args: &[&str]) -> (Option<i32>, String, String) {
        let control = self
            .control
            .as_ref()
            .expect("the master announced its control socket");
        let out = Command::new(bin())
            .args(args)
            .arg("--control")
            .arg(control)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// `status --json`, parsed.
    pub fn status(&self) -> serde_json::Value {
        let (code, out, err) = self.ctl(&["status", "--json"]);
        assert_eq!(code, Some(0), "status failed: {err}");
        serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("status --json is not JSON ({e}): {out}"))
    }

    /// The master's pid (as this test sees it).
    pub fn pid(&self) -> u32 {
        match self.wrapped {
            true => children(self.child.id()).first().copied().unwrap_or(0),
            false => self.child.id(),
        }
    }

    /// The first socket's address, as a client reaches it.
    pub fn addr(&self) -> SocketAddr {
        self.addrs[0]
    }

    /// Every line the master has logged so far.
    pub fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// Every line the master (and workers writing through it) wrote to stdout so far.
    pub fn stdout_lines(&self) -> Vec<String> {
        self.stdout.lock().unwrap().clone()
    }

    /// Whether some log line contains `needle`.
    pub fn log_contains(&self, needle: &str) -> bool {
        self.log.lock().unwrap().iter().any(|l| l.contains(needle))
    }

    /// Waits for a log line containing `needle`; panics with the log if it never comes.
    pub fn expect_log(&mut self, needle: &str) -> String {
        let found = wait_until(TIMEOUT, || self.log_contains(needle) || self.exited());
        let log = self.log();
        match log.iter().find(|l| l.contains(needle)) {
            Some(line) if found => line.clone(),
            _ => panic!(
                "no log line with {needle:?}; {}\nlog:\n{}",
                self.diagnosis(),
                log.join("\n")
            ),
        }
    }

    /// Where the master and its children are, for a failure message.
    pub fn diagnosis(&self) -> String {
        let pid = self.pid();
        let read = |p: String| std::fs::read_to_string(p).unwrap_or_default();
        let mut out = format!(
            "master {pid}: wchan {:?}, syscall {:?}, fd 2 {} {:?}",
            read(format!("/proc/{pid}/wchan")),
            read(format!("/proc/{pid}/syscall")).trim(),
            fd_target(pid, 2),
            read(format!("/proc/{pid}/fdinfo/2")).replace('\n', " ")
        );
        if std::env::var_os("RC_TEST_GDB").is_some() {
            if let Ok(o) = Command::new("gdb")
                .args([
                    "-p",
                    &pid.to_string(),
                    "-batch",
                    "-ex",
                    "thread apply all bt",
                ])
                .output()
            {
                out.push_str(&String::from_utf8_lossy(&o.stdout));
            }
        }
        for child in children(pid) {
            let stat = read(format!("/proc/{child}/stat"));
            let state = stat
                .rsplit(')')
                .next()
                .unwrap_or("")
                .split_whitespace()
                .next();
            let cmd = read(format!("/proc/{child}/cmdline")).replace('\0', " ");
            out.push_str(&format!("\n  child {child} {state:?} {cmd}"));
        }
        // Every worker the log names that is no longer a child: gone, or where it is.
        let kids = children(pid);
        let mut named: Vec<u32> = self
            .log()
            .iter()
            .filter_map(|l| {
                l.split_once("(pid ")?
                    .1
                    .split([',', ')'])
                    .next()?
                    .parse()
                    .ok()
            })
            .filter(|p| !kids.contains(p))
            .collect();
        named.sort_unstable();
        named.dedup();
        for p in named {
            let stat = read(format!("/proc/{p}/stat"));
            let wchan = read(format!("/proc/{p}/wchan"));
            out.push_str(&format!(
                "\n  logged worker {p}: {}",
                match stat.is_empty() {
                    true => "gone".to_string(),
                    false => format!("stat {stat:?} wchan {wchan:?}"),
                }
            ));
        }
        let samples: Vec<String> = (0..5)
            .map(|_| {
                std::thread::sleep(Duration::from_millis(7));
                let stat = read(format!("/proc/{pid}/stat"));
                let f: Vec<&str> = stat
                    .rsplit(')')
                    .next()
                    .unwrap_or("")
                    .split_whitespace()
                    .collect();
                format!(
                    "{} cpu {}+{} {}",
                    f.first().unwrap_or(&"?"),
                    f.get(11).unwrap_or(&"?"),
                    f.get(12).unwrap_or(&"?"),
                    read(format!("/proc/{pid}/syscall"))
                        .split(' ')
                        .take(5)
                        .collect::<Vec<_>>()
                        .join(" ")
                        .trim()
                )
            })
            .collect();
        out.push_str(&format!("\n  master samples: {samples:?}"));
        if self.control.is_some() {
            let (code, text, err) = self.ctl(&["status"]);
            out.push_str(&format!("\n  status ({code:?}): {text}{err}"));
        }
        out
    }

    /// The master's children that are workers (not adopted orphans), by slot.
    pub fn workers(&mut self) -> HashMap<usize, u32> {
        let mut by_slot = HashMap::new();
        for pid in children(self.pid()) {
            if let Some(slot) = env_of(pid).get("REUSEPORT_CLUSTER_WORKER") {
                by_slot.insert(slot.parse().unwrap(), pid);
                if !self.seen_workers.contains(&pid) {
                    self.seen_workers.push(pid);
                }
            }
        }
        by_slot
    }

    /// How many worker processes the master has (a slot with two would show here, not in
    /// [`Cluster::workers`]).
    pub fn worker_count(&self) -> usize {
        children(self.pid())
            .into_iter()
            .filter(|p| env_of(*p).contains_key("REUSEPORT_CLUSTER_WORKER"))
            .count()
    }

    /// Sends `sig` to the master.
    pub fn signal(&self, sig: Signal) {
        signal(self.pid(), sig);
    }

    /// Whether the master has exited (reaping it if so).
    pub fn exited(&mut self) -> bool {
        if self.status.is_none() {
            self.status = self.child.try_wait().unwrap();
        }
        self.status.is_some()
    }

    /// Waits for the master to exit and returns its exit code (`None`: killed by a signal).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        assert!(
            wait_until(timeout, || self.exited()),
            "master still running after {timeout:?}; log:\n{}",
            self.log().join("\n")
        );
        // Let the reader thread take the last lines: until EOF, which a process that still
        // holds the master's stderr (an orphan) may delay, so not for ever.
        let closed = Arc::clone(&self.stderr_closed);
        wait_until(Duration::from_secs(5), || {
            closed.load(std::sync::atomic::Ordering::SeqCst)
        });
        self.status.unwrap().code()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Gracefully first, so that the master removes its control socket and lock file.
        if !self.exited() && self.pid() > 1 {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.pid() as i32),
                Signal::SIGTERM,
            );
            wait_until(Duration::from_secs(2), || self.exited());
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        for pid in &self.seen_workers {
            kill_group(*pid);
        }
    }
}

/// Sets its flag when dropped: when the thread that owns it ends, however it ends.
struct SetOnDrop(Arc<std::sync::atomic::AtomicBool>);

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

fn parse_sockets(line: &str) -> Vec<SocketAddr> {
    // "...; sockets: fd 3 bind0=127.0.0.1:4000, fd 4 http=[::1]:4001"
    let list = line.split("sockets:").nth(1).unwrap_or("");
    list.split(',')
        .filter_map(|s| s.split('=').nth(1))
        .filter_map(|a| a.trim().parse().ok())
        .collect()
}

/// Runs the binary to completion (bounded) and returns (exit code, stderr); checks that
/// no process it started outlives it.
pub fn run(args: &[&str]) -> (Option<i32>, String) {
    static RUNS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let tag = unique_tag(&format!(
        "run{}",
        RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let mut c = Cluster::spawn(args, &[("RC_TEST_TAG", &tag)]);
    let code = c.wait_exit(TIMEOUT);
    let log = c.log().join("\n");
    assert_eq!(
        tagged_processes(&tag),
        Vec::<u32>::new(),
        "left behind by {args:?}:\n{log}"
    );
    (code, log)
}

/// Inodes of the sockets listening on `port` (/proc/net/tcp and tcp6, state 0A).
pub fn listening_inodes(port: u16) -> Vec<u64> {
    let port_hex = format!(":{port:04X}");
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .flat_map(|f| {
            std::fs::read_to_string(f)
                .unwrap_or_default()
                .lines()
                .skip(1)
                .map(String::from)
                .collect::<Vec<_>>()
        })
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 9 && f[1].ends_with(&port_hex) && f[3] == "0A").then(|| f[9].parse().ok())?
        })
        .collect()
}

/// Children of `pid` (from /proc/PID/task/PID/children).
pub fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// The environment of a process.
pub fn env_of(pid: u32) -> HashMap<String, String> {
    std::fs::read(format!("/proc/{pid}/environ"))
        .unwrap_or_default()
        .split(|b| *b == 0)
        .filter_map(|kv| {
            let kv = String::from_utf8_lossy(kv);
            kv.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect()
}

/// A field of /proc/PID/status, e.g. `Cpus_allowed_list`.
pub fn status_field(pid: u32, field: &str) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| {
            l.strip_prefix(&format!("{field}:"))
                .map(|v| v.trim().to_string())
        })
}

/// Whether `pid` is alive and not a zombie.
pub fn alive(pid: u32) -> bool {
    matches!(status_field(pid, "State"), Some(s) if !s.starts_with('Z') && !s.starts_with('X'))
}

/// The open fds of a process, sorted.
pub fn fds(pid: u32) -> Vec<i32> {
    let mut fds: Vec<i32> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    fds.sort_unstable();
    fds
}

/// What an fd of a process points to (`socket:[1234]`).
pub fn fd_target(pid: u32, fd: i32) -> String {
    std::fs::read_link(format!("/proc/{pid}/fd/{fd}"))
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// One HTTP response.
#[derive(Debug)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Header names lower-cased.
    pub headers: HashMap<String, String>,
    /// The body as text.
    pub body: String,
}

impl Response {
    /// The X-Worker header as a slot number.
    pub fn worker(&self) -> usize {
        self.headers["x-worker"].parse().unwrap()
    }
}

/// GET / on a new connection, `Connection: close`.
pub fn get(addr: SocketAddr) -> std::io::Result<Response> {
    get_within(addr, Duration::from_secs(10))
}

/// GET / on a new connection, giving up after `timeout` without an answer.
pub fn get_within(addr: SocketAddr, timeout: Duration) -> std::io::Result<Response> {
    get_path_within(addr, "/", timeout)
}

/// GET `path` on a new connection, `Connection: close`, giving up after `timeout`.
pub fn get_path_within(
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
) -> std::io::Result<Response> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").as_bytes(),
    )?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    parse_response(&raw).ok_or_else(|| {
        std::io::Error::other(format!("bad response: {:?}", String::from_utf8_lossy(&raw)))
    })
}

/// Sends one keep-alive GET on `stream` and reads exactly one response.
pub fn get_on(stream: &mut TcpStream) -> std::io::Result<Response> {
    stream.write_all(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")?;
    let mut raw = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&raw[..end]).to_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if raw.len() >= end + 4 + len {
                return parse_response(&raw).ok_or_else(|| std::io::Error::other("bad response"));
            }
        }
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "closed",
            ));
        }
        raw.extend_from_slice(&buf[..n]);
    }
}

fn parse_response(raw: &[u8]) -> Option<Response> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text.split_once("\r\n\r\n")?;
    let mut lines = head.lines();
    let status = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_lowercase(), v.trim().to_string()))
        .collect();
    Some(Response {
        status,
        headers,
        body: body.to_string(),
    })
}

/// CPUs this test process may run on, as a list.
pub fn allowed_cpus() -> Vec<usize> {
    let list = status_field(std::process::id(), "Cpus_allowed_list").unwrap();
    let mut cpus = Vec::new();
    for part in list.split(',') {
        match part.split_once('-') {
            Some((a, b)) => cpus.extend(a.parse::<usize>().unwrap()..=b.parse().unwrap()),
            None => cpus.push(part.parse().unwrap()),
        }
    }
    cpus
}

/// Writes an executable script into a fresh temp dir and returns its path.
pub fn script(name: &str, body: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let dir = temp_dir(name);
    let path = dir.join(name);
    std::fs::write(&path, body).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// A fresh, empty directory for one test.
pub fn temp_dir(tag: &str) -> PathBuf {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("rc-test-{tag}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A port that was free a moment ago (for tests that need one fixed port on two binds).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Whether this host can use IPv6 loopback.
pub fn have_ipv6() -> bool {
    std::net::TcpListener::bind("[::1]:0").is_ok()
}

/// The process group of `pid` (field 5 of /proc/PID/stat).
pub fn pgid(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces: count fields after its closing paren.
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(2)?
        .parse()
        .ok()
}

/// Live processes whose environment holds `RC_TEST_TAG=<tag>`.
pub fn tagged_processes(tag: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| alive(*pid) && env_of(*pid).get("RC_TEST_TAG").is_some_and(|t| t == tag))
        .collect()
}

/// A tag unique to this test run and `name`, for [`tagged_processes`].
pub fn unique_tag(name: &str) -> String {
    format!("{name}-{}", std::process::id())
}

/// The lines of `r` until EOF; bytes that are not UTF-8 (an app's, on the shared stream) do
/// not end the reading, as `BufRead::lines` would.
fn lossy_lines(r: impl std::io::Read) -> impl Iterator<Item = String> {
    let mut reader = BufReader::new(r);
    std::iter::from_fn(move || {
        let mut buf = Vec::new();
        match reader.read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => None,
            Ok(_) => Some(
                String::from_utf8_lossy(&buf)
                    .trim_end_matches('\n')
                    .to_string(),
            ),
        }
    })
}

/// The state letter of `pid` in /proc/PID/stat (`T`: stopped), if it exists.
pub fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// CPU seconds (user + system) of `pid` so far (benchmarks compare launchers' masters).
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

/// Sends `sig` to one process.
pub fn signal(pid: u32, sig: Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig)
        .unwrap_or_else(|e| panic!("kill -{sig} {pid}: {e}"));
}

/// SIGKILLs the process group `pgid`, if it still exists. Never shells out to kill(1):
/// procps' `kill -9 -PID` has been seen to send kill(-1, …), i.e. to every process.
pub fn kill_group(pgid: u32) {
    assert!(pgid > 1, "refusing to signal process group {pgid}");
    let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pgid as i32), Signal::SIGKILL);
}

/// A hold on the machine-wide test lock: shared by every test that starts a master,
/// exclusive for tests that put load on the machine or change its sysctls. Works across
/// processes (nextest) and threads (cargo test) alike.
pub struct MachineLock {
    _lock: nix::fcntl::Flock<std::fs::File>,
    exclusive: bool,
}

thread_local! {
    /// Whether this test thread holds the lock exclusively (its masters need no shared hold).
    static EXCLUSIVE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

impl Drop for MachineLock {
    fn drop(&mut self) {
        if self.exclusive {
            EXCLUSIVE.with(|e| e.set(false));
        }
    }
}

fn machine_lock(exclusive: bool) -> Option<MachineLock> {
    if EXCLUSIVE.with(|e| e.get()) {
        return None;
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(std::env::temp_dir().join("reuseport-cluster-tests.lock"))
        .unwrap();
    let how = match exclusive {
        true => nix::fcntl::FlockArg::LockExclusive,
        false => nix::fcntl::FlockArg::LockShared,
    };
    match nix::fcntl::Flock::lock(file, how) {
        Ok(lock) => {
            EXCLUSIVE.with(|e| e.set(exclusive));
            Some(MachineLock {
                _lock: lock,
                exclusive,
            })
        }
        Err((_, e)) => panic!("locking the test lock: {e}"),
    }
}

/// Waits until no other test runs a master, and keeps it so: for load tests.
pub fn load_lock() -> MachineLock {
    machine_lock(true).expect("load tests do not nest")
}

/// A load client: `conns` threads, half reusing keep-alive connections, half opening a new
/// connection per request, until stopped or `limit` passes.
pub struct Load {
    stop: Arc<std::sync::atomic::AtomicBool>,
    ok: Arc<std::sync::atomic::AtomicU64>,
    failed: Arc<std::sync::atomic::AtomicU64>,
    refused: Arc<std::sync::atomic::AtomicU64>,
    threads: Vec<std::thread::JoinHandle<LoadStats>>,
}

/// What a load client saw.
#[derive(Debug, Default, Clone)]
pub struct LoadStats {
    /// Requests answered 200.
    pub ok: u64,
    /// Requests that failed (connect, reset, EOF before a whole response, non-200).
    pub failed: u64,
    /// The first few failures, for the assertion message.
    pub errors: Vec<String>,
    /// Of `failed`, those of the clients that open a new connection per request.
    pub failed_new: u64,
    /// Of `failed`, those of the keep-alive clients.
    pub failed_keepalive: u64,
    /// Of `failed`, connections refused (no socket listening on the port at all).
    pub refused: u64,
}

impl LoadStats {
    fn add(&mut self, other: LoadStats) {
        self.ok += other.ok;
        self.failed += other.failed;
        self.failed_new += other.failed_new;
        self.failed_keepalive += other.failed_keepalive;
        self.refused += other.refused;
        self.errors.extend(
            other
                .errors
                .into_iter()
                .take(10 - self.errors.len().min(10)),
        );
    }
}

impl Load {
    /// Starts the client against `addr`.
    pub fn start(addr: SocketAddr, conns: usize, limit: Duration) -> Load {
        Load::start_with(addr, conns, limit, false)
    }

    /// Like [`Load::start`]; with `retry_closed`, a keep-alive client retries a request once
    /// on a new connection when the server closed the reused one before answering (what
    /// HTTP clients do for idempotent requests: the server may close an idle connection
    /// at any time).
    pub fn start_with(addr: SocketAddr, conns: usize, limit: Duration, retry_closed: bool) -> Load {
        Load::run(addr, conns, limit, retry_closed, false)
    }

    /// Every client opens a new connection per request and gives up on it after 5 s.
    pub fn start_new_connections(addr: SocketAddr, conns: usize, limit: Duration) -> Load {
        Load::run(addr, conns, limit, false, true)
    }

    fn run(
        addr: SocketAddr,
        conns: usize,
        limit: Duration,
        retry_closed: bool,
        all_new: bool,
    ) -> Load {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let ok = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let failed = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let refused = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let deadline = Instant::now() + limit;
        let threads = (0..conns)
            .map(|i| {
                let stop = Arc::clone(&stop);
                let ok = Arc::clone(&ok);
                let count = move || ok.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let (failed, refused) = (Arc::clone(&failed), Arc::clone(&refused));
                std::thread::spawn(move || {
                    let running = || {
                        !stop.load(std::sync::atomic::Ordering::Relaxed)
                            && Instant::now() < deadline
                    };
                    let mut stats = LoadStats::default();
                    let fail = |stats: &mut LoadStats, e: String| {
                        stats.failed += 1;
                        failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if e.contains("Connection refused") {
                            stats.refused += 1;
                            refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        if stats.errors.len() < 10 {
                            stats.errors.push(e);
                        }
                    };
                    if i % 2 == 0 && !all_new {
                        let mut conn: Option<TcpStream> = None;
                        while running() {
                            let reused = conn.is_some();
                            let stream = match conn.take() {
                                Some(s) => s,
                                None => match TcpStream::connect(addr) {
                                    Ok(s) => {
                                        let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
                                        s
                                    }
                                    Err(e) => {
                                        fail(&mut stats, format!("connect: {e}"));
                                        continue;
                                    }
                                },
                            };
                            let mut stream = stream;
                            let mut answer = get_on(&mut stream);
                            if retry_closed && reused && answer.is_err() {
                                answer = TcpStream::connect(addr).and_then(|mut s| {
                                    s.set_read_timeout(Some(Duration::from_secs(10)))?;
                                    let r = get_on(&mut s);
                                    stream = s;
                                    r
                                });
                            }
                            match answer {
                                Ok(r) if r.status == 200 => {
                                    stats.ok += 1;
                                    count();
                                    let close =
                                        r.headers.get("connection").is_some_and(|c| c == "close");
                                    if !close {
                                        conn = Some(stream);
                                    }
                                }
                                Ok(r) => {
                                    fail(&mut stats, format!("keep-alive: status {}", r.status))
                                }
                                Err(e) => fail(&mut stats, format!("keep-alive: {e}")),
                            }
                        }
                    } else {
                        let timeout = match all_new {
                            true => Duration::from_secs(5),
                            false => Duration::from_secs(10),
                        };
                        while running() {
                            match get_within(addr, timeout) {
                                Ok(r) if r.status == 200 => {
                                    stats.ok += 1;
                                    count();
                                }
                                Ok(r) => {
                                    fail(&mut stats, format!("new connection: status {}", r.status))
                                }
                                Err(e) => fail(&mut stats, format!("new connection: {e}")),
                            }
                        }
                    }
                    match i % 2 {
                        0 => stats.failed_keepalive = stats.failed,
                        _ => stats.failed_new = stats.failed,
                    }
                    stats
                })
            })
            .collect();
        Load {
            stop,
            ok,
            failed,
            refused,
            threads,
        }
    }

    /// Requests answered so far.
    pub fn ok_so_far(&self) -> u64 {
        self.ok.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Requests failed so far, and of them connections refused.
    pub fn failed_so_far(&self) -> (u64, u64) {
        let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        (load(&self.failed), load(&self.refused))
    }

    /// Stops the client and sums what its threads saw.
    pub fn finish(self) -> LoadStats {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut total = LoadStats::default();
        for t in self.threads {
            total.add(t.join().unwrap());
        }
        total
    }
}

/// Runs `passes` rolling restarts of `cmd` (2 workers; empty: the demo app) under load
/// (keep-alive clients retry once on a connection the server closed); what the clients saw.
pub fn rolls_under_load(cmd: &[&str], env: &[(&str, &str)], passes: u64) -> LoadStats {
    let mut args = vec![
        "--workers",
        "2",
        "--bind",
        "127.0.0.1:0",
        "--ready",
        "listening",
        "--migrate",
        "off",
        "--grace",
        "10s",
    ];
    if !cmd.is_empty() {
        args.push("--");
        args.extend_from_slice(cmd);
    }
    let mut c = Cluster::spawn(&args, env);
    c.expect_log("workers ready");
    let t0 = Instant::now();
    let load = Load::start_with(c.addr(), 16, Duration::from_secs(150), true);
    assert!(
        wait_until(TIMEOUT, || load.ok_so_far() > 50),
        "the load runs"
    );
    let mut passes_took = Vec::new();
    for g in 2..2 + passes {
        let t = Instant::now();
        c.signal(Signal::SIGHUP);
        c.expect_log(&format!("rolling restart to generation {g} done"));
        passes_took.push(t.elapsed());
    }
    // Let the last old workers finish what they accepted.
    let ok = load.ok_so_far();
    assert!(
        wait_until(TIMEOUT, || load.ok_so_far() > ok + 50),
        "the load stalled after the last pass: {} answered since; the load began {:?} ago \
         (it runs 150 s), passes took {passes_took:?}; listeners (port, inode, queued): \
         {:?}; held sockets {}; workers {}; log:\n{}",
        load.ok_so_far() - ok,
        t0.elapsed(),
        tcp_listeners(),
        c.status()["held_sockets"],
        c.status()["workers"],
        c.log().join("\n")
    );
    load.finish()
}

/// This thread's network namespace's TCP listeners: (port, inode, connections queued).
pub fn tcp_listeners() -> Vec<(u16, u64, u64)> {
    // Column 1 is local address:port, 3 the state (0A: listening), 4 tx_queue:rx_queue
    // (for a listener rx_queue is the accept queue), 9 the inode.
    let table = std::fs::read_to_string("/proc/thread-self/net/tcp").unwrap_or_default();
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.get(3) != Some(&"0A") {
                return None;
            }
            let port = u16::from_str_radix(f[1].rsplit(':').next()?, 16).ok()?;
            let queued = u64::from_str_radix(f[4].split(':').nth(1)?, 16).ok()?;
            Some((port, f.get(9)?.parse().ok()?, queued))
        })
        .collect()
}

/// Moves this test thread, and every process and thread it starts from now on, into a new
/// network namespace with its loopback up, where net.ipv4.tcp_migrate_req is 0 as in a
/// container. False, with the reason printed, where that is not allowed.
pub fn enter_fresh_netns() -> bool {
    if let Err(e) = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET) {
        eprintln!("skipped: cannot create a network namespace here (unshare: {e}; needs root or CAP_SYS_ADMIN)");
        return false;
    }
    let up = Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(up, "ip link set lo up in the new namespace");
    true
}

/// net.ipv4.tcp_migrate_req of this thread's network namespace.
pub fn migrate_req() -> Option<String> {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_migrate_req")
        .ok()
        .map(|v| v.trim().to_string())
}

/// Whether connections queued on a closing socket migrate (net.ipv4.tcp_migrate_req=1, or 0
/// but writable, so that the master's `--migrate auto` turns it on). Prints why not.
pub fn migration_possible() -> bool {
    let path = "/proc/sys/net/ipv4/tcp_migrate_req";
    match std::fs::read_to_string(path) {
        Ok(v) if v.trim() == "1" => true,
        Ok(_) if std::fs::OpenOptions::new().write(true).open(path).is_ok() => true,
        Ok(_) => {
            eprintln!("skipped: {path} is 0 and not writable here (run as root, or sysctl -w net.ipv4.tcp_migrate_req=1)");
            false
        }
        Err(_) => {
            eprintln!("skipped: this kernel has no {path} (Linux 5.14+)");
            false
        }
    }
}

/// A fake systemd: a datagram socket that records every sd_notify message.
pub struct FakeSystemd {
    /// Its socket, for NOTIFY_SOCKET.
    pub path: std::path::PathBuf,
    messages: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl FakeSystemd {
    /// Binds a fresh socket and records what arrives.
    pub fn new() -> FakeSystemd {
        let path = temp_dir("systemd").join("notify.sock");
        let socket = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        let messages = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = std::sync::Arc::clone(&messages);
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = socket.recv(&mut buf) {
                sink.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        });
        FakeSystemd { path, messages }
    }

    /// Every message so far.
    pub fn messages(&self) -> Vec<String> {
        self.messages.lock().unwrap().clone()
    }

    /// Waits for a message containing `needle` after the first `from` ones; its index.
    pub fn expect(&self, from: usize, needle: &str) -> usize {
        let found = wait_until(TIMEOUT, || {
            self.messages()
                .iter()
                .skip(from)
                .any(|m| m.contains(needle))
        });
        let all = self.messages();
        assert!(found, "no {needle:?} after message {from}: {all:#?}");
        from + all
            .iter()
            .skip(from)
            .position(|m| m.contains(needle))
            .unwrap()
    }
}

/// Whether this host gets BPF steering, and `doctor`'s line about it.
pub fn bpf_steering() -> (bool, String) {
    let out = Command::new(bin())
        .arg("doctor")
        .output()
        .expect("running doctor");
    let out = String::from_utf8_lossy(&out.stdout);
    let line = out.lines().find(|l| l.contains("steering")).unwrap_or("");
    (out.contains("steering: bpf"), line.to_string())
}

/// Makes DejaVu Sans the charts' "sans-serif" (plotters draws no text without a font).
pub fn register_chart_font() {
    let font = std::fs::read("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")
        .expect("fonts-dejavu-core (scripts/install-load-tools.sh installs it)");
    let _ = plotters::style::register_font(
        "sans-serif",
        plotters::style::FontStyle::Normal,
        Box::leak(font.into_boxed_slice()),
    );
}

/// A bar chart's x label: group `i` of `names` spans i..i+1, and its name goes at its middle
/// (ask plotters for key points every 0.5: `x_labels(4 * names.len())`).
pub fn bar_group_label(x: &f64, names: &[&str]) -> String {
    let i = x - 0.5;
    match i.fract() == 0.0 && i >= 0.0 {
        true => names.get(i as usize).copied().unwrap_or("").to_string(),
        false => String::new(),
    }
}

/// Where scripts/install-servers.sh puts the real servers.
pub fn cache() -> PathBuf {
    let root = std::env::var("REUSEPORT_CLUSTER_TEST_CACHE")
        .unwrap_or_else(|_| "/var/cache/reuseport-cluster-test".into());
    Path::new(&root).join("servers")
}

/// The program, or None after printing why the test skips.
pub fn installed(program: &Path) -> Option<String> {
    if program.is_file() {
        return Some(program.to_str().unwrap().to_string());
    }
    eprintln!(
        "skipped: {} is not installed (scripts/install-servers.sh could not install it)",
        program.display()
    );
    None
}

/// `program` from PATH, or None after printing why the test skips.
pub fn which(program: &str) -> Option<String> {
    let found = std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .map(|d| Path::new(d).join(program))
        .find(|p| p.is_file());
    installed(&found.unwrap_or_else(|| PathBuf::from(program)))
}
