//! The control socket: `status`, `reload`, `scale N`, `stop` over a unix stream socket.
//!
//! Protocol (documented in the README, usable with socat): the client sends one request
//! line; the master answers with text and closes the connection. An answer that starts with
//! `error:` is a refusal. Requests: `status`, `status --json`, `reload`, `scale N`, `stop`.
//!
//! It is served inside the master's single-threaded loop (see `ops/conns.rs`): a request is at
//! most one 1 KiB line, a client has 5 s to send it and read the answer, and at most 8
//! clients are served at once. Only root and the
//! master's own uid may talk to it (SO_PEERCRED); the socket file is mode 0600.
//!
//! A lock file next to the socket (`NAME.lock`, holding the master's pid) tells a live
//! master from a stale socket file left by a dead one; a master that stops removes both.

use std::fs::File;
use std::io::{ErrorKind, Read, Seek, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use nix::fcntl::{Flock, FlockArg};
use nix::poll::PollFlags;
use nix::sys::socket::{getsockopt, sockopt};

use crate::ops::conns::Conns;

/// Longest request line.
const MAX_REQUEST: usize = 1024;

/// What a client asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    /// The cluster's status, as text or JSON.
    Status {
        /// JSON instead of text.
        json: bool,
    },
    /// A rolling restart, like SIGHUP.
    Reload {
        /// Keep the connection open for its progress and outcome.
        wait: bool,
    },
    /// Grow or shrink the cluster.
    Scale {
        /// To how many workers.
        count: Count,
        /// Keep the connection open until the workers are ready (or gone).
        wait: bool,
    },
    /// A graceful stop, like SIGTERM.
    Stop {
        /// Keep the connection open until the master exits, for its outcome.
        wait: bool,
    },
}

/// The number of workers `scale` asks for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Count {
    /// Exactly this many.
    To(usize),
    /// This many more.
    Up(usize),
    /// This many fewer.
    Down(usize),
}

impl Count {
    /// The number of workers this means for a cluster of `have`.
    pub fn resolve(self, have: usize) -> Result<usize, String> {
        match self {
            Count::To(n) => Ok(n),
            Count::Up(n) => Ok(have.saturating_add(n)),
            Count::Down(n) if n < have => Ok(have - n),
            Count::Down(n) => Err(format!(
                "scale -{n}: the cluster has {have} workers and keeps at least 1; to stop it, \
                 use `reuseport-cluster stop`"
            )),
        }
    }
}

impl Request {
    /// Parses one request line.
    pub fn parse(line: &str) -> Result<Request, String> {
        let mut words: Vec<&str> = line.split_whitespace().collect();
        let wait = words.last() == Some(&"--wait") && words.len() > 1;
        if wait {
            words.pop();
        }
        match (&words[..], wait) {
            (["status"], false) => Ok(Request::Status { json: false }),
            (["status", "--json"] | ["status", "json"], false) => {
                Ok(Request::Status { json: true })
            }
            (["reload"], _) => Ok(Request::Reload { wait }),
            (["stop"], _) => Ok(Request::Stop { wait }),
            (["scale", n], _) => Ok(Request::Scale {
                count: parse_count(n)?,
                wait,
            }),
            _ => Err(format!(
                "unknown request {line:?}: expected status [--json], reload [--wait], \
                 scale N|+N|-N [--wait] or stop [--wait]"
            )),
        }
    }
}

/// `N`, `+N` or `-N` workers.
fn parse_count(word: &str) -> Result<Count, String> {
    let (make, digits): (fn(usize) -> Count, &str) = match word.as_bytes().first() {
        Some(b'+') => (Count::Up, &word[1..]),
        Some(b'-') => (Count::Down, &word[1..]),
        _ => (Count::To, word),
    };
    let n: usize = match digits.parse() {
        Ok(n) if digits.bytes().all(|b| b.is_ascii_digit()) => n,
        _ => {
            return Err(format!(
                "scale {word}: not a number of workers; give N, +N or -N, e.g. scale 4 or scale +1"
            ))
        }
    };
    match make(n) {
        Count::To(0) => Err(
            "scale 0: a cluster keeps at least 1 worker; to stop it, use `reuseport-cluster stop`"
                .into(),
        ),
        Count::Up(0) | Count::Down(0) => Err(format!("scale {word}: that changes nothing")),
        count => Ok(count),
    }
}

/// The socket path for `name`: `--control`, else a per-user runtime directory.
pub fn socket_path(name: &str, explicit: Option<&Path>) -> PathBuf {
    match explicit {
        Some(p) => p.to_path_buf(),
        None => runtime_dir().join(format!("{name}.sock")),
    }
}

/// /run/reuseport-cluster for root, else $XDG_RUNTIME_DIR/reuseport-cluster, else a
/// private directory under /tmp.
pub fn runtime_dir() -> PathBuf {
    let uid = nix::unistd::geteuid();
    if uid.is_root() {
        return PathBuf::from("/run/reuseport-cluster");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir).join("reuseport-cluster"),
        _ => std::env::temp_dir().join(format!("reuseport-cluster-{uid}")),
    }
}

/// Checks a `--name`: it becomes a file name.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty()
        || name.len() > 64
        || name.starts_with('.')
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    {
        return Err(format!(
            "--name {name:?}: use 1-64 letters, digits, '.', '_' or '-' (not starting with '.')"
        ));
    }
    Ok(())
}

/// The master's end of the control socket.
pub struct ControlServer {
    listener: UnixListener,
    path: PathBuf,
    lock_path: PathBuf,
    _lock: Flock<File>,
    clients: Conns<UnixStream>,
    owner: u32,
}

impl ControlServer {
    /// Takes the name's lock and listens on `path`.
    pub fn open(path: &Path, name: &str) -> anyhow::Result<ControlServer> {
        let dir = path.parent().unwrap_or(Path::new("/"));
        if dir == runtime_dir() {
            private_dir(dir)?;
        } else {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("creating {} for the control socket", dir.display()))?;
        }
        // Refuse before touching anything: a path that is not a socket must not cost the
        // user a lock file, or a truncated one.
        refuse_non_socket(path)?;
        let lock_path = lock_path(path);
        let lock = loop {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .read(true)
                .write(true)
                .mode(0o600)
                .custom_flags(nix::libc::O_NOFOLLOW)
                .open(&lock_path)
                .with_context(|| format!("opening {}", lock_path.display()))?;
            let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(lock) => lock,
                Err((mut file, _)) => {
                    let mut pid = String::new();
                    let _ = file.read_to_string(&mut pid);
                    bail!(
                        "another reuseport-cluster is already running as {name}, pid {}; stop it, \
                         or give this one another --name",
                        pid.trim()
                    );
                }
            };
            // A master that stopped removes its lock file (holding the lock): if the one we
            // locked is no longer at the path, it was removed meanwhile; lock the new one.
            let same = std::fs::symlink_metadata(&lock_path)
                .ok()
                .zip(lock.metadata().ok())
                .is_some_and(|(at_path, ours)| {
                    at_path.ino() == ours.ino() && at_path.dev() == ours.dev()
                });
            if !same {
                continue;
            }
            let mut old = String::new();
            let _ = lock.read_to_string(&mut old);
            if !old.trim().bytes().all(|b| b.is_ascii_digit()) || !lock.metadata()?.is_file() {
                bail!(
                    "--control {}: {} exists and is not a lock file of reuseport-cluster; \
                     pick another path",
                    path.display(),
                    lock_path.display()
                );
            }
            lock.set_len(0)?;
            lock.seek(std::io::SeekFrom::Start(0))?;
            write!(&mut *lock, "{}", std::process::id())?;
            break lock;
        };
        // The lock is ours: a socket file still there was left by a dead master. Anything
        // else at that path is not ours to delete.
        match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_socket() => std::fs::remove_file(path)
                .with_context(|| format!("removing the stale {}", path.display()))?,
            Ok(_) => bail!(
                "--control {}: a file that is not a socket is in the way; pick another path",
                path.display()
            ),
            Err(_) => {}
        }
        let listener = UnixListener::bind(path)
            .with_context(|| format!("listening on the control socket {}", path.display()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        listener.set_nonblocking(true)?;
        Ok(ControlServer {
            listener,
            path: path.to_path_buf(),
            lock_path,
            _lock: lock,
            clients: Conns::new(MAX_REQUEST),
            owner: nix::unistd::geteuid().as_raw(),
        })
    }

    /// The fds to poll, with the events that matter for each.
    pub fn poll_fds(&self) -> Vec<(BorrowedFd<'_>, PollFlags)> {
        let mut fds = Vec::new();
        if self.clients.accepting(Instant::now()) {
            fds.push((self.listener.as_fd(), PollFlags::POLLIN));
        }
        fds.extend(self.clients.poll_fds());
        fds
    }

    /// When the oldest client times out.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.clients.next_deadline()
    }

    /// The listening socket's fd (the master accepts only once it polls readable).
    pub fn listener_fd(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&self.listener)
    }

    /// Accepts new clients (when `listener_ready`), reads requests, writes answers, drops
    /// clients that are done or late. Returns the requests that came in, with the id to
    /// answer them by.
    pub fn service(&mut self, now: Instant, listener_ready: bool) -> Vec<(u64, Request)> {
        if listener_ready {
            self.accept(now);
        }
        let line_end = |input: &[u8]| input.iter().position(|b| *b == b'\n').map(|p| p + 1);
        let too_long = |max| format!("error: request longer than {max} bytes\n").into_bytes();
        let mut requests = Vec::new();
        for (id, line) in self.clients.read(now, line_end, too_long) {
            match Request::parse(String::from_utf8_lossy(&line).trim()) {
                Ok(request) => requests.push((id, request)),
                Err(e) => self
                    .clients
                    .respond(id, format!("error: {e}\n").into_bytes()),
            }
        }
        requests
    }

    /// Answers request `id` with `text`.
    pub fn respond(&mut self, id: u64, text: String) {
        self.clients.respond(id, text.into_bytes());
    }

    /// Keeps request `id`'s connection open for [`ControlServer::send`] and
    /// [`ControlServer::finish`]; false when too many clients are waiting already.
    pub fn hold(&mut self, id: u64) -> bool {
        self.clients.hold(id, Instant::now())
    }

    /// Sends one more line to a held connection.
    pub fn send(&mut self, id: u64, line: &str) {
        self.clients.send(id, format!("{line}\n").as_bytes());
    }

    /// Sends the last line to a held connection and closes it.
    pub fn finish(&mut self, id: u64, line: &str) {
        self.clients.finish(id, format!("{line}\n").as_bytes());
    }

    /// Whether request `id`'s client is still connected.
    pub fn is_open(&self, id: u64) -> bool {
        self.clients.is_open(id)
    }

    fn accept(&mut self, now: Instant) {
        let owner = self.owner;
        let listener = &self.listener;
        let accept = || {
            let (stream, _) = listener.accept()?;
            stream.set_nonblocking(true)?;
            Ok(stream)
        };
        let check = |stream: &UnixStream| {
            let refusal = match getsockopt(stream, sockopt::PeerCredentials).map(|c| c.uid()) {
                Ok(uid) if uid == 0 || uid == owner => return None,
                Ok(uid) => format!(
                    "error: permission denied: uid {uid} may not control this cluster \
                     (only root and uid {owner})\n"
                ),
                Err(e) => format!("error: reading peer credentials: {e}\n"),
            };
            Some(refusal.into_bytes())
        };
        self.clients.accept_all(
            now,
            accept,
            check,
            b"error: too many control connections; retry\n",
        );
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        // Removed while still locked: a master that opened it meanwhile sees it is gone once
        // it gets the lock, and takes a fresh one (see `open`).
        let _ = std::fs::remove_file(&self.lock_path);
    }
}

/// The lock file of the socket at `path`: `NAME.lock` for `NAME.sock`, else `PATH.lock`
/// (replacing another extension could name a file of the user's: `notes.txt` → `notes.lock`).
pub fn lock_path(path: &Path) -> PathBuf {
    match path.extension() {
        Some(ext) if ext == "sock" => path.with_extension("lock"),
        _ => {
            let mut p = path.as_os_str().to_owned();
            p.push(".lock");
            PathBuf::from(p)
        }
    }
}

/// Fails if something other than a socket is at `path`.
fn refuse_non_socket(path: &Path) -> anyhow::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => bail!(
            "--control {}: a file that is not a socket is in the way; pick another path",
            path.display()
        ),
        _ => Ok(()),
    }
}

/// Makes sure `dir` is a directory of ours that nobody else may write to, creating it
/// (0700) if need be: in /tmp, another user could otherwise have made it first and put a
/// symlink where the lock file goes, or replaced the socket.
fn private_dir(dir: &Path) -> anyhow::Result<()> {
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e).with_context(|| format!("creating {}", dir.display())),
    }
    let meta =
        std::fs::symlink_metadata(dir).with_context(|| format!("checking {}", dir.display()))?;
    let me = nix::unistd::geteuid().as_raw();
    if !meta.file_type().is_dir() || meta.uid() != me || meta.mode() & 0o022 != 0 {
        bail!(
            "{} is not a private directory of uid {me} (a symlink, someone else's, or writable by others); \
             remove it, or give --control a path in a directory of yours",
            dir.display()
        );
    }
    Ok(())
}

/// The client: sends `request` to the master at `path` and returns its answer.
pub fn request(path: &Path, request: &str) -> anyhow::Result<String> {
    let mut stream = connect(path)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    stream.write_all(format!("{request}\n").as_bytes())?;
    let mut answer = String::new();
    stream
        .read_to_string(&mut answer)
        .with_context(|| format!("reading the answer from {}", path.display()))?;
    Ok(answer)
}

/// Connects to the master at `path`.
pub fn connect(path: &Path) -> anyhow::Result<UnixStream> {
    UnixStream::connect(path).map_err(|e| match e.kind() {
        ErrorKind::NotFound | ErrorKind::ConnectionRefused => anyhow::anyhow!(
            "no reuseport-cluster is running at {} ({e}); give --name or --control",
            path.display()
        ),
        _ => anyhow::anyhow!("connecting to {}: {e}", path.display()),
    })
}

/// Whether a master holds the lock of the socket at `path` (a SIGKILLed one leaves its
/// files behind; the next master of that name replaces them).
fn is_live(path: &Path) -> bool {
    let Ok(file) = File::open(lock_path(path)) else {
        return false;
    };
    Flock::lock(file, FlockArg::LockSharedNonblock).is_err()
}

/// The socket a client talks to: `--control`, `--name`, or the only cluster running.
pub fn client_path(name: Option<&str>, control: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(path) = control {
        return Ok(path.to_path_buf());
    }
    if let Some(name) = name {
        return Ok(socket_path(name, None));
    }
    let dir = runtime_dir();
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .map(|d| {
            d.flatten()
                .filter_map(|e| {
                    e.file_name()
                        .to_str()?
                        .strip_suffix(".sock")
                        .map(String::from)
                })
                .filter(|name| is_live(&socket_path(name, None)))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    match &names[..] {
        [one] => Ok(socket_path(one, None)),
        [] => bail!(
            "no reuseport-cluster is running here (nothing in {})",
            dir.display()
        ),
        many => bail!(
            "several reuseport-clusters are running ({}); pick one with --name",
            many.join(", ")
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse() {
        assert_eq!(
            Request::parse("status"),
            Ok(Request::Status { json: false })
        );
        assert_eq!(
            Request::parse("status --json"),
            Ok(Request::Status { json: true })
        );
        let scale = |count, wait| Ok(Request::Scale { count, wait });
        assert_eq!(Request::parse("scale 4"), scale(Count::To(4), false));
        assert_eq!(Request::parse("scale +1 --wait"), scale(Count::Up(1), true));
        assert_eq!(Request::parse("scale -2"), scale(Count::Down(2), false));
        assert_eq!(
            Request::parse("reload --wait"),
            Ok(Request::Reload { wait: true })
        );
        assert_eq!(Request::parse("stop"), Ok(Request::Stop { wait: false }));
        for bad in [
            "scale many",
            "scale 0",
            "scale +0",
            "scale +-1",
            "scale 1.5",
            "rm -rf /",
        ] {
            assert!(Request::parse(bad).is_err(), "{bad}");
        }
        assert!(Request::parse("scale 0").unwrap_err().contains("stop"));
        assert!(Request::parse("status --wait").is_err());
    }

    #[test]
    fn relative_counts_resolve_against_the_current_size() {
        assert_eq!(Count::Up(1).resolve(2), Ok(3));
        assert_eq!(Count::Down(1).resolve(2), Ok(1));
        assert!(Count::Down(2)
            .resolve(2)
            .unwrap_err()
            .contains("at least 1"));
        assert_eq!(Count::To(5).resolve(2), Ok(5));
    }

    #[test]
    fn names_are_safe_file_names() {
        assert!(check_name("8000").is_ok() && check_name("web-1.prod").is_ok());
        assert!(
            check_name("../etc").is_err() && check_name("").is_err() && check_name("a b").is_err()
        );
    }

    #[test]
    fn a_second_server_with_the_same_name_is_refused_and_a_stale_socket_replaced() {
        let dir = std::env::temp_dir().join(format!("rc-control-{}", std::process::id()));
        let path = dir.join("t.sock");
        std::fs::create_dir_all(&dir).unwrap();
        // A stale socket file, as a SIGKILLed master leaves it.
        drop(UnixListener::bind(&path).unwrap());
        let mut server = ControlServer::open(&path, "t").unwrap();
        let err = ControlServer::open(&path, "t").err().unwrap().to_string();
        assert!(
            err.contains(&format!("already running as t, pid {}", std::process::id())),
            "{err}"
        );
        let path2 = path.clone();
        let client = std::thread::spawn(move || request(&path2, "status"));
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut got = Vec::new();
        while got.is_empty() && Instant::now() < deadline {
            got = server.service(Instant::now(), true);
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(got.len(), 1);
        server.respond(got[0].0, "fine\n".into());
        assert_eq!(client.join().unwrap().unwrap(), "fine\n");
        drop(server);
        assert!(!path.exists(), "the socket file is removed at exit");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
