//! Validated configuration: raw flags in, resolved values out.
//!
//! Every check that can be made before a worker exists is made here, so that a mistake on
//! the command line is reported as one line naming the flag, and nothing has been forked yet.

use std::ffi::OsStr;
use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use nix::sys::signal::Signal;
use nix::unistd::{access, AccessFlags};

use crate::cli::{Migrate, RunArgs, Steer};
use crate::master::readiness::ReadyMode;
use crate::sockets::listen::{Keepalive, ListenOptions};

/// A command-line value that cannot be used; `main` maps it to exit code 2.
#[derive(Debug)]
pub struct Invalid(pub String);

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Invalid {}

/// More workers than this is a typo, not a deployment (and would exhaust memory or pids).
pub const MAX_WORKERS: usize = 4096;
/// CPU_SETSIZE: the highest CPU number an affinity mask can hold, plus one.
const MAX_CPUS: usize = 1024;
/// Durations above this are typos (and would overflow the monotonic clock).
const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

macro_rules! invalid {
    ($($arg:tt)*) => { Invalid(format!($($arg)*)) };
}

/// Everything the master needs, resolved and checked.
#[derive(Debug, Clone)]
pub struct Config {
    /// Sockets every worker opens, in fd order (3, 4, …).
    pub binds: Vec<Bind>,
    /// Number of worker slots.
    pub workers: usize,
    /// CPU of each slot, by slot index modulo length; `None` with `--no-pin`.
    pub cpus: Option<Vec<usize>>,
    /// listen() backlog.
    pub backlog: u32,
    /// `--nofile`: the open-files limit to set; `None`: raise the soft limit to the hard one.
    pub nofile: Option<u64>,
    /// TCP options of the listening sockets.
    pub listen: ListenOptions,
    /// `--share-port`: start even when another process listens on a bound address.
    pub share_port: bool,
    /// Time a stopping worker gets before SIGKILL.
    pub grace: Duration,
    /// Signal that asks a worker to stop.
    pub stop_signal: Signal,
    /// When a new worker counts as ready.
    pub ready: ReadyMode,
    /// How long a new worker may take to become ready.
    pub ready_timeout: Duration,
    /// `--min-uptime`: a worker that dies sooner after it became ready is a crash loop's.
    pub min_uptime: Duration,
    /// Slots replaced at once in a rolling restart.
    pub rolling_batch: usize,
    /// What to do about net.ipv4.tcp_migrate_req.
    pub migrate: Migrate,
    /// `--steer`.
    pub steer: Steer,
    /// `--name`; the first bind's port when not given (known once port 0 is resolved).
    pub name: Option<String>,
    /// `--control`.
    pub control: Option<PathBuf>,
    /// `--log-prefix`.
    pub log_prefix: bool,
    /// `--metrics`.
    pub metrics: Option<SocketAddr>,
    /// `--user`/`--group`: who workers run as.
    pub credentials: Option<Credentials>,
    /// `--max-memory`, `--max-lifetime`, `--hung-after`.
    pub recycle: crate::master::recycle::RecyclePolicy,
    /// What each worker runs.
    pub app: App,
    /// Whether Node workers get the preload (node/mod.rs); the master writes its file.
    pub node: crate::node::Preload,
}

/// One listening socket of every worker.
#[derive(Debug, Clone, PartialEq)]
pub struct Bind {
    /// Name in LISTEN_FDNAMES.
    pub name: String,
    /// Address to bind; the port is filled in by the master when 0 was given.
    pub addr: SocketAddr,
}

impl fmt::Display for Bind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.name, self.addr)
    }
}

/// The user, group and supplementary groups a worker drops to before exec.
#[derive(Debug, Clone, PartialEq)]
pub struct Credentials {
    /// The user's name.
    pub user: String,
    /// Its uid.
    pub uid: nix::unistd::Uid,
    /// The group to run as.
    pub gid: nix::unistd::Gid,
    /// Supplementary groups (the user's, from /etc/group).
    pub groups: Vec<nix::unistd::Gid>,
    /// Its home directory (HOME), from the password database.
    pub home: PathBuf,
}

fn resolve_credentials(user: &str, group: Option<&str>) -> Result<Credentials, Invalid> {
    use nix::unistd::{getgrouplist, Group, User};
    let found = User::from_name(user)
        .map_err(|e| invalid!("--user {user}: looking it up: {e}"))?
        .ok_or_else(|| invalid!("--user {user}: no such user"))?;
    let gid = match group {
        None => found.gid,
        Some(g) => {
            Group::from_name(g)
                .map_err(|e| invalid!("--group {g}: looking it up: {e}"))?
                .ok_or_else(|| invalid!("--group {g}: no such group"))?
                .gid
        }
    };
    let me = nix::unistd::geteuid();
    if !me.is_root() && me != found.uid {
        return Err(invalid!(
            "--user {user}: only root can run workers as another user (this is uid {me})"
        ));
    }
    let name = std::ffi::CString::new(user).map_err(|_| invalid!("--user: a NUL byte"))?;
    let groups = getgrouplist(&name, gid).unwrap_or_else(|_| vec![gid]);
    Ok(Credentials {
        user: user.to_string(),
        uid: found.uid,
        gid,
        groups,
        home: found.dir,
    })
}

/// The program every worker runs.
#[derive(Debug, Clone, PartialEq)]
pub enum App {
    /// The built-in demo HTTP app (this binary, re-executed in a hidden mode).
    Demo,
    /// An external program, already found in PATH.
    Program {
        /// Path passed to execve.
        path: PathBuf,
        /// argv, argv[0] as the user wrote it.
        argv: Vec<String>,
    },
}

impl Config {
    /// Checks and resolves the raw flags.
    pub fn from_args(args: &RunArgs) -> Result<Config, Invalid> {
        let binds = args
            .binds
            .iter()
            .enumerate()
            .map(|(i, spec)| parse_bind(spec, i))
            .collect::<Result<Vec<_>, _>>()?;
        check_duplicate_binds(&binds)?;

        let allowed = allowed_cpus();
        let cpus = if args.no_pin {
            None
        } else if let Some(list) = &args.cpus {
            let cpus = parse_cpu_list(list).map_err(|e| invalid!("--cpus {list}: {e}"))?;
            if let Some(cpu) = cpus.iter().find(|c| !allowed.contains(c)) {
                return Err(invalid!(
                    "--cpus {list}: CPU {cpu} is not in this process's affinity mask ({}); \
                     pick CPUs from that list",
                    format_cpu_list(&allowed)
                ));
            }
            Some(cpus)
        } else {
            Some(allowed)
        };

        let workers = match args.workers {
            Some(0) => return Err(invalid!("--workers 0: at least one worker is needed")),
            Some(n) if n > MAX_WORKERS => {
                return Err(invalid!("--workers {n}: at most {MAX_WORKERS} workers"))
            }
            Some(n) => n,
            None => num_cpus::get().max(1),
        };
        if args.backlog == 0 || args.backlog > i32::MAX as u32 {
            return Err(invalid!(
                "--backlog {}: the backlog must be between 1 and {}",
                args.backlog,
                i32::MAX
            ));
        }
        let listen = ListenOptions {
            nodelay: !args.no_nodelay,
            defer_accept: args
                .defer_accept
                .as_deref()
                .map(|d| {
                    let d = parse_duration(d).map_err(|e| invalid!("--defer-accept {e}"))?;
                    if d.is_zero() {
                        return Err(invalid!("--defer-accept 0: give the longest wait, e.g. 5s"));
                    }
                    // Whole seconds, rounded up (the kernel counts in seconds).
                    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
                    Ok(secs.min(u32::MAX as u64) as u32)
                })
                .transpose()?,
            fastopen: match args.fastopen {
                Some(0) => {
                    return Err(invalid!(
                        "--fastopen 0: give the queue length, e.g. --fastopen 256"
                    ))
                }
                n => n,
            },
            keepalive: args
                .keepalive
                .as_deref()
                .map(|k| parse_keepalive(k).map_err(|e| invalid!("--keepalive {k}: {e}")))
                .transpose()?,
        };
        let grace = parse_duration(&args.grace).map_err(|e| invalid!("--grace {e}"))?;
        let stop_signal = parse_signal(&args.stop_signal)
            .map_err(|e| invalid!("--stop-signal {}: {e}", args.stop_signal))?;

        let ready =
            ReadyMode::parse(&args.ready).map_err(|e| invalid!("--ready {}: {e}", args.ready))?;
        let ready_timeout =
            parse_duration(&args.ready_timeout).map_err(|e| invalid!("--ready-timeout {e}"))?;
        let min_uptime =
            parse_duration(&args.min_uptime).map_err(|e| invalid!("--min-uptime {e}"))?;
        if let Some(name) = &args.name {
            crate::ops::control::check_name(name).map_err(Invalid)?;
        }
        if args.rolling_batch == 0 {
            return Err(invalid!("--rolling-batch 0: at least one slot at a time"));
        }
        let positive = |flag: &str, value: &Option<String>| -> Result<Option<Duration>, Invalid> {
            let Some(v) = value else { return Ok(None) };
            match parse_duration(v) {
                Ok(d) if d.is_zero() => Err(invalid!("{flag} {v}: must be more than 0")),
                Ok(d) => Ok(Some(d)),
                Err(e) => Err(invalid!("{flag} {e}")),
            }
        };
        let recycle = crate::master::recycle::RecyclePolicy {
            max_memory: args
                .max_memory
                .as_deref()
                .map(|m| {
                    crate::master::recycle::parse_size(m).map_err(|e| invalid!("--max-memory {e}"))
                })
                .transpose()?,
            max_lifetime: positive("--max-lifetime", &args.max_lifetime)?,
            hung_after: positive("--hung-after", &args.hung_after)?,
        };

        let words = match (&args.cmd, args.program.is_empty()) {
            (Some(cmd), _) => Some(
                shlex::split(cmd)
                    .ok_or_else(|| invalid!("--cmd {cmd:?}: unbalanced quotes or trailing \\"))?,
            ),
            (None, false) => Some(args.program.clone()),
            (None, true) => None,
        };
        let app = match words {
            None => App::Demo,
            Some(words) if words.is_empty() || words[0].is_empty() => {
                return Err(invalid!(
                    "--cmd is empty: give the program to run, e.g. --cmd \"node app.js\""
                ))
            }
            Some(words) => App::Program {
                path: resolve_program(&words[0], std::env::var_os("PATH").as_deref())?,
                argv: words,
            },
        };

        Ok(Config {
            binds,
            workers,
            cpus,
            backlog: args.backlog,
            nofile: match args.nofile {
                Some(0) => return Err(invalid!("--nofile 0: workers need some open files")),
                n => n,
            },
            listen,
            share_port: args.share_port,
            grace,
            stop_signal,
            ready,
            ready_timeout,
            min_uptime,
            rolling_batch: args.rolling_batch,
            migrate: args.migrate,
            steer: args.steer,
            name: args.name.clone(),
            control: args.control.clone(),
            log_prefix: args.log_prefix,
            credentials: args
                .user
                .as_deref()
                .map(|user| resolve_credentials(user, args.group.as_deref()))
                .transpose()?
                // Already that user and group: there is nothing to drop (and setgroups
                // would need CAP_SETGID).
                .filter(|c| c.uid != nix::unistd::geteuid() || c.gid != nix::unistd::getegid()),
            metrics: args
                .metrics
                .as_deref()
                .map(|m| parse_addr(m).map_err(|e| invalid!("--metrics {m}: {e}")))
                .transpose()?,
            recycle,
            node: match (args.no_node_preload, crate::node::detect(&app)) {
                (_, None) => crate::node::Preload::NotNode,
                (true, Some(_)) => crate::node::Preload::Disabled,
                (false, Some((launch, program))) => crate::node::Preload::On {
                    program,
                    launch,
                    path: None,
                },
            },
            app,
        })
    }

    /// Looks the program up in PATH again, as a rolling restart does (a new binary at the
    /// same path, or earlier in PATH, is picked up).
    pub fn resolve_app_again(&self) -> Result<App, Invalid> {
        match &self.app {
            App::Demo => Ok(App::Demo),
            App::Program { argv, .. } => Ok(App::Program {
                path: resolve_program(&argv[0], std::env::var_os("PATH").as_deref())?,
                argv: argv.clone(),
            }),
        }
    }
}

/// `on`, or nginx's `IDLE:INTERVAL:COUNT` (each part may be empty).
fn parse_keepalive(value: &str) -> Result<Keepalive, String> {
    if value == "on" {
        return Ok(Keepalive::default());
    }
    let parts: Vec<&str> = value.split(':').collect();
    let [idle, interval, count] = parts[..] else {
        return Err("expected IDLE:INTERVAL:COUNT, e.g. 60s:10s:5 (or no value)".into());
    };
    let time = |part: &str| -> Result<Option<Duration>, String> {
        match part {
            "" => Ok(None),
            d => match parse_duration(d)? {
                d if d < Duration::from_secs(1) => Err(format!("{part}: at least 1s")),
                d => Ok(Some(d)),
            },
        }
    };
    let count = match count {
        "" => None,
        c => match c.parse::<u32>() {
            Ok(n) if (1..=127).contains(&n) => Some(n),
            _ => return Err(format!("count {c:?}: a number of probes from 1 to 127")),
        },
    };
    Ok(Keepalive {
        idle: time(idle)?,
        interval: time(interval)?,
        count,
    })
}

/// The address of a `[NAME=]HOST:PORT` bind.
pub fn parse_bind_addr(spec: &str) -> Result<SocketAddr, String> {
    parse_bind(spec, 0).map(|b| b.addr).map_err(|e| e.0)
}

/// Parses `[NAME=]HOST:PORT`; `index` gives the default name.
fn parse_bind(spec: &str, index: usize) -> Result<Bind, Invalid> {
    let (name, addr) = match spec.split_once('=') {
        Some((name, addr)) => {
            check_fd_name(name).map_err(|e| invalid!("--bind {spec}: name {name:?} {e}"))?;
            (name.to_string(), addr)
        }
        None => (format!("bind{index}"), spec),
    };
    let addr = parse_addr(addr).map_err(|e| invalid!("--bind {spec}: {e}"))?;
    Ok(Bind { name, addr })
}

pub fn parse_addr(addr: &str) -> Result<SocketAddr, String> {
    if let Ok(sa) = SocketAddr::from_str(addr) {
        return Ok(sa);
    }
    if let Some((scheme, rest)) = addr.split_once("://") {
        let bare = rest.split('/').next().unwrap_or(rest);
        return Err(format!(
            "drop the scheme ({scheme}://) and any path: give HOST:PORT, e.g. {bare}"
        ));
    }
    let (host, port) = addr
        .rsplit_once(':')
        .ok_or("expected HOST:PORT, e.g. 0.0.0.0:8000, [::]:8000 or localhost:8000")?;
    if host.is_empty() {
        return Err("the host is missing: use 0.0.0.0:PORT for every IPv4 address".into());
    }
    let port: u16 = match port.parse::<u64>() {
        Ok(p) if p <= u16::MAX as u64 => p as u16,
        Ok(p) => return Err(format!("port {p} is out of range (0-65535)")),
        Err(_) => return Err(format!("port {port:?} is not a number")),
    };
    if host.contains(':') && !host.starts_with('[') {
        return Err("put an IPv6 address in brackets, e.g. [::1]:8000".into());
    }
    if host.starts_with('[') {
        return Err(format!("{host} is not a valid IPv6 address"));
    }
    let mut addrs = (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve host {host:?}: {e}"))?
        .collect::<Vec<_>>();
    // One bind is one socket: prefer IPv4 like most resolvers order `localhost`; a user who
    // wants both families passes two binds.
    addrs.sort_by_key(|a| !a.is_ipv4());
    addrs
        .first()
        .copied()
        .ok_or_else(|| format!("host {host:?} has no address"))
}

/// systemd's rules for FileDescriptorName=: printable ASCII, no colon, at most 255 bytes.
fn check_fd_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("is empty");
    }
    if name.len() > 255 {
        return Err("is longer than 255 bytes");
    }
    if !name.bytes().all(|b| b.is_ascii_graphic() && b != b':') {
        return Err("may only hold printable ASCII without ':' (it goes into LISTEN_FDNAMES)");
    }
    Ok(())
}

fn check_duplicate_binds(binds: &[Bind]) -> Result<(), Invalid> {
    for (i, a) in binds.iter().enumerate() {
        for b in &binds[..i] {
            if a.addr == b.addr && a.addr.port() != 0 {
                return Err(invalid!("--bind {} is given twice", a.addr));
            }
            if a.name == b.name {
                return Err(invalid!("--bind name {:?} is given twice", a.name));
            }
        }
    }
    Ok(())
}

/// Parses `0-3,6` into `[0, 1, 2, 3, 6]`, keeping the order given.
pub fn parse_cpu_list(list: &str) -> Result<Vec<usize>, String> {
    let mut cpus = Vec::new();
    for part in list.split(',').map(str::trim) {
        let num = |s: &str| {
            s.trim()
                .parse::<usize>()
                .map_err(|_| format!("{s:?} is not a CPU number (expected a list like 0-3,6)"))
        };
        match part.split_once('-') {
            Some((lo, hi)) => {
                let (lo, hi) = (num(lo)?, num(hi)?);
                if lo > hi {
                    return Err(format!("range {part} is backwards"));
                }
                if hi >= MAX_CPUS {
                    return Err(format!(
                        "CPU {hi} is beyond the highest possible CPU ({})",
                        MAX_CPUS - 1
                    ));
                }
                cpus.extend(lo..=hi);
            }
            None => {
                let cpu = num(part)?;
                if cpu >= MAX_CPUS {
                    return Err(format!(
                        "CPU {cpu} is beyond the highest possible CPU ({})",
                        MAX_CPUS - 1
                    ));
                }
                cpus.push(cpu);
            }
        }
    }
    let mut seen = std::collections::HashSet::new();
    if let Some(dup) = cpus.iter().find(|c| !seen.insert(**c)) {
        return Err(format!("CPU {dup} is listed twice"));
    }
    Ok(cpus)
}

/// Formats CPUs as a compact list (`0-3,6`), like /proc's Cpus_allowed_list.
pub fn format_cpu_list(cpus: &[usize]) -> String {
    let mut sorted = cpus.to_vec();
    sorted.sort_unstable();
    let mut parts: Vec<String> = Vec::new();
    let mut i = 0;
    while i < sorted.len() {
        let start = sorted[i];
        while i + 1 < sorted.len() && sorted[i + 1] == sorted[i] + 1 {
            i += 1;
        }
        parts.push(if sorted[i] == start {
            start.to_string()
        } else {
            format!("{start}-{}", sorted[i])
        });
        i += 1;
    }
    parts.join(",")
}

/// CPUs in this process's affinity mask.
fn allowed_cpus() -> Vec<usize> {
    core_affinity::get_core_ids()
        .map(|ids| ids.into_iter().map(|c| c.id).collect())
        .filter(|v: &Vec<usize>| !v.is_empty())
        .unwrap_or_else(|| (0..num_cpus::get()).collect())
}

/// Parses `30s`, `500ms`, `1m 30s`; a bare number means seconds. At most a year.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = match s.trim().parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => humantime::parse_duration(s.trim())
            .map_err(|e| format!("{s:?}: {e} (expected e.g. 30s, 500ms or 1m30s)"))?,
    };
    if d > MAX_DURATION {
        return Err(format!("{s:?}: at most 365 days"));
    }
    Ok(d)
}

/// Parses `TERM`, `SIGTERM`, `sigterm` or `15`.
pub fn parse_signal(s: &str) -> Result<Signal, String> {
    let s = s.trim();
    let sig = match s.parse::<i32>() {
        Ok(n) => Signal::try_from(n).map_err(|_| format!("{n} is not a signal number"))?,
        Err(_) => {
            let upper = s.to_ascii_uppercase();
            let name = match upper.starts_with("SIG") {
                true => upper,
                false => format!("SIG{upper}"),
            };
            Signal::from_str(&name).map_err(|_| "unknown signal (e.g. TERM, INT, QUIT)")?
        }
    };
    if sig == Signal::SIGKILL || sig == Signal::SIGSTOP {
        return Err(format!("{sig} can not be used to ask for a graceful stop"));
    }
    Ok(sig)
}

/// Finds PROGRAM the way execvp would: a name with a slash is a path, else PATH is searched.
pub fn resolve_program(program: &str, path_var: Option<&OsStr>) -> Result<PathBuf, Invalid> {
    if program.contains('/') {
        let path = PathBuf::from(program);
        check_executable(&path).map_err(|e| invalid!("--cmd: {program}: {e}"))?;
        return Ok(path);
    }
    let path_var = path_var.unwrap_or(OsStr::new("/usr/local/bin:/usr/bin:/bin"));
    let mut first_error = None;
    for dir in std::env::split_paths(path_var) {
        let dir = if dir.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            dir
        };
        let candidate = dir.join(program);
        if !candidate.exists() {
            continue;
        }
        match check_executable(&candidate) {
            Ok(()) => return Ok(candidate),
            Err(e) => {
                first_error.get_or_insert_with(|| format!("{}: {e}", candidate.display()));
            }
        }
    }
    Err(match first_error {
        Some(e) => invalid!("--cmd: {e}"),
        None => invalid!(
            "--cmd: program {program:?} not found in PATH ({}); give its path, e.g. ./{program}",
            path_var.to_string_lossy()
        ),
    })
}

fn check_executable(path: &Path) -> Result<(), String> {
    let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => "no such file".to_string(),
        _ => e.to_string(),
    })?;
    if meta.is_dir() {
        return Err("is a directory, not a program".into());
    }
    if !meta.is_file() {
        return Err("is not a regular file".into());
    }
    if access(path, AccessFlags::X_OK).is_err() || meta.permissions().mode() & 0o111 == 0 {
        return Err(format!(
            "is not executable (mode {:o}); run chmod +x {}",
            meta.permissions().mode() & 0o7777,
            path.display()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binds_parse_every_documented_form() {
        let b = parse_bind("0.0.0.0:8000", 0).unwrap();
        assert_eq!(
            (b.name.as_str(), b.addr.to_string()),
            ("bind0", "0.0.0.0:8000".into())
        );
        assert_eq!(
            parse_bind("[::]:8000", 1).unwrap().addr.to_string(),
            "[::]:8000"
        );
        assert_eq!(
            parse_bind("[::1]:80", 1).unwrap().addr.to_string(),
            "[::1]:80"
        );
        let named = parse_bind("http=127.0.0.1:8080", 0).unwrap();
        assert_eq!(named.name, "http");
        assert_eq!(named.addr.to_string(), "127.0.0.1:8080");
        assert!(parse_bind("localhost:8000", 0)
            .unwrap()
            .addr
            .ip()
            .is_loopback());
    }

    #[test]
    fn bad_binds_say_what_is_wrong() {
        let err = |s| parse_bind(s, 0).unwrap_err().0;
        assert!(err("127.0.0.1:70000").contains("out of range"));
        assert!(err("127.0.0.1").contains("HOST:PORT"));
        assert!(err(":80").contains("host is missing"));
        assert!(err("::1:80").contains("brackets"));
        assert!(err("a:b=127.0.0.1:80").contains("':'"));
        assert!(err("127.0.0.1:http").contains("not a number"));
    }

    #[test]
    fn cpu_lists_round_trip() {
        assert_eq!(parse_cpu_list("0-3,6").unwrap(), vec![0, 1, 2, 3, 6]);
        assert_eq!(parse_cpu_list("2,0").unwrap(), vec![2, 0]);
        assert!(parse_cpu_list("3-1").is_err());
        assert!(parse_cpu_list("1,1").is_err());
        assert!(parse_cpu_list("x").is_err());
        assert!(parse_cpu_list("0-18446744073709551615").is_err());
        assert!(parse_cpu_list("0-99999999999").is_err());
        assert!(parse_cpu_list("1024").is_err());
        assert_eq!(format_cpu_list(&[6, 0, 1, 2, 3]), "0-3,6");
        assert_eq!(format_cpu_list(&[1]), "1");
    }

    #[test]
    fn durations_and_signals() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2").unwrap(), Duration::from_secs(2));
        assert!(parse_duration("soon").is_err());
        assert_eq!(parse_signal("TERM").unwrap(), Signal::SIGTERM);
        assert_eq!(parse_signal("sigint").unwrap(), Signal::SIGINT);
        assert_eq!(parse_signal("3").unwrap(), Signal::SIGQUIT);
        assert!(parse_signal("KILL").is_err());
        assert!(parse_signal("9").is_err() && parse_signal("19").is_err());
        assert!(parse_duration("18446744073709551615").is_err());
        assert!(parse_signal("NOPE").is_err());
    }

    #[test]
    fn programs_resolve_through_path() {
        let sh = resolve_program("sh", Some(OsStr::new("/nonexistent:/bin:/usr/bin"))).unwrap();
        assert!(sh.ends_with("sh"));
        let e = resolve_program("no-such-program-xyz", Some(OsStr::new("/bin"))).unwrap_err();
        assert!(e.0.contains("not found in PATH"), "{e}");
        let file = std::env::temp_dir().join(format!("rc-not-exec-{}", std::process::id()));
        std::fs::write(&file, "data").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = resolve_program(file.to_str().unwrap(), None).unwrap_err();
        std::fs::remove_file(&file).unwrap();
        assert!(e.0.contains("not executable (mode 644)"), "{e}");
        let e = resolve_program("/tmp", None).unwrap_err();
        assert!(e.0.contains("directory"), "{e}");
    }
}
