//! fork/exec of one worker: the only module with `unsafe`, so it also holds the few other
//! raw calls the master needs (waitid/waitpid, fd flags, a signal counter).
//!
//! Between fork and exec the child may only make async-signal-safe calls: the master's
//! allocator or any lock may have been held by the forking thread at fork time. So every
//! byte the child needs (path, argv, envp, sockaddrs, CPU) is prepared in the master by
//! [`Spawner::spawn`] before it forks, and [`child`] only makes syscalls and plain stores.
//!
//! The child, in order: restores default signal dispositions and an empty mask, becomes its
//! own process group leader (so a stop signal reaches everything the app starts), opens its
//! listening sockets (socket2: SO_REUSEADDR, SO_REUSEPORT, bind, listen) and moves them to
//! fds 3.., marks every other fd close-on-exec, drops to `--user` if given, asks for SIGKILL
//! when the master dies (PR_SET_PDEATHSIG, after the drop, which would clear it), pins
//! itself to its CPU (core_affinity), fills in LISTEN_PID and execs.
//! Before exec the child writes each socket's inode to a close-on-exec socketpair (for
//! `--ready listening`, which looks for that socket in /proc), with the socket itself
//! attached (SCM_RIGHTS) when it opened it, so that the master can hold it for the slot's
//! next workers (sockets/slots.rs); a failing step writes (step, bind index, errno) and
//! `_exit`s. The master reads until EOF, which comes when exec succeeded, like
//! `std::process::Command` does. A worker given the slot's held sockets (`inherit`) moves
//! those to fds 3.. instead of opening new ones.
//!
//! **LISTEN_PID** must be the worker's own pid, known only after fork. The envp entry is
//! built before fork as `LISTEN_PID=` followed by room for 20 digits; the child writes its
//! pid's digits into its own copy-on-write copy of that buffer with plain stores. This
//! keeps one exec per worker (no helper re-exec), so the app's pid is the worker's pid, the
//! one the master supervises and signals.

use std::collections::BTreeMap;
use std::ffi::{CStr, CString, OsString};
use std::fmt;
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use anyhow::Context;
use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::libc::{self, c_char, c_int};
use nix::sys::signal::{sigprocmask, SigSet, SigmaskHow};
use nix::sys::socket::{
    recvmsg, socketpair, AddressFamily, ControlMessageOwned, MsgFlags, SockFlag, SockType,
};
use nix::sys::wait::waitpid;
use nix::unistd::{pipe2, ForkResult, Pid};

use crate::config::{App, Config, Credentials};
use crate::master::worker::{ExitReason, Generation};
use crate::sockets::listen::{self, ListenSpec, SocketStep};

/// Environment variables the master sets for each worker (and never passes through).
const MANAGED_ENV: &[&str] = &[
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "REUSEPORT_CLUSTER_WORKER",
    "REUSEPORT_CLUSTER_WORKERS",
    "REUSEPORT_CLUSTER_CPU",
    "REUSEPORT_CLUSTER_GENERATION",
    // The master's own supervisor (systemd) talks to the master, never to its workers.
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
];

/// Hidden sub-command that runs the built-in demo app.
pub const DEMO_SUBCOMMAND: &str = "__demo-worker";

const LISTEN_PID_PREFIX: &[u8] = b"LISTEN_PID=";
const PID_DIGITS: usize = 20;

/// A step of the child's way from fork to exec, as reported through the pipe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Step {
    /// setpgid(0, 0).
    ProcessGroup = 1,
    /// prctl(PR_SET_PDEATHSIG).
    DeathSignal,
    /// socket(2).
    Socket,
    /// setsockopt(2).
    SocketOptions,
    /// bind(2).
    Bind,
    /// listen(2).
    Listen,
    /// Moving a socket to its fd (fcntl/dup2).
    MoveFd,
    /// sched_setaffinity(2).
    Affinity,
    /// execve(2).
    Exec,
    /// dup2 of a `--log-prefix` pipe onto fd 1 or 2.
    Output,
    /// setgroups/setgid/setuid for `--user`.
    DropPrivileges,
}

impl Step {
    fn from_u8(b: u8) -> Option<Step> {
        use Step::*;
        [
            ProcessGroup,
            DeathSignal,
            Socket,
            SocketOptions,
            Bind,
            Listen,
            MoveFd,
            Affinity,
            Exec,
            Output,
            DropPrivileges,
        ]
        .into_iter()
        .find(|s| *s as u8 == b)
    }

    fn from_socket(step: SocketStep) -> Step {
        match step {
            SocketStep::Socket => Step::Socket,
            SocketStep::Options => Step::SocketOptions,
            SocketStep::Bind => Step::Bind,
            SocketStep::Listen => Step::Listen,
        }
    }
}

/// Why a worker could not be started.
#[derive(Debug)]
pub struct SpawnError(String);

impl fmt::Display for SpawnError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Forks workers for one configuration; holds what every worker shares, prepared once.
pub struct Spawner {
    /// The program of each generation: a rolling restart looks it up in PATH again.
    paths: BTreeMap<Generation, CString>,
    argv: Vec<CString>,
    base_env: Vec<CString>,
    listen_fds: CString,
    listen_fdnames: CString,
    notify_socket: Option<CString>,
    /// `--log-prefix`: give each worker pipes as stdout and stderr.
    log_pipes: bool,
    /// `--user`: who workers run as.
    credentials: Option<Credentials>,
    /// /dev/null, given to workers as stdin when the master's stdin is a terminal: a worker
    /// is in a background process group, and reading the terminal would stop it (SIGTTIN).
    null_stdin: Option<OwnedFd>,
    binds: Vec<(SocketAddr, ListenSpec)>,
    backlog: c_int,
}

/// A worker that exec'd.
#[derive(Debug)]
pub struct Spawned {
    /// Its pid.
    pub pid: Pid,
    /// Inodes of its listening sockets, in fd order.
    pub sockets: Vec<u64>,
    /// The sockets it opened itself, as the master's close-on-exec copies (none when it
    /// inherited them, or with `send_sockets` off).
    pub opened: Vec<OwnedFd>,
    /// With `--log-prefix`: the read ends of its stdout and stderr (non-blocking).
    pub output: Option<[OwnedFd; 2]>,
}

impl Spawner {
    /// Prepares argv, the shared environment and the sockaddrs of `config`; workers get
    /// `notify_socket` as NOTIFY_SOCKET.
    pub fn new(
        config: &Config,
        notify: Option<&crate::ops::notify::NotifySocket>,
    ) -> anyhow::Result<Spawner> {
        let (path, argv) = program_of(&config.app);
        let notify_socket = notify.map(|n| n.env_value());
        let ready_socket = notify
            .and_then(|n| n.ready_path())
            .map(|p| p.display().to_string());
        let node_options = std::env::var("NODE_OPTIONS").ok();
        let port = std::env::var("PORT").ok();
        let stop_signal = config.stop_signal.as_str();
        let node: Vec<(String, String)> = match &config.node {
            crate::node::Preload::On {
                launch,
                path: Some(path),
                ..
            } => crate::node::env(&crate::node::NodeEnv {
                path,
                launch: *launch,
                binds: &config.binds,
                stop_signal,
                backlog: config.backlog,
                ready_socket: ready_socket.as_deref(),
                node_options: node_options.as_deref(),
                port: port.as_deref(),
            }),
            _ => Vec::new(),
        };
        // `--user`: the user's HOME, USER and LOGNAME, as runuser and systemd's User= set them.
        let identity: Vec<(&str, OsString)> = match &config.credentials {
            Some(c) => vec![
                ("HOME", c.home.clone().into_os_string()),
                ("USER", c.user.clone().into()),
                ("LOGNAME", c.user.clone().into()),
            ],
            None => Vec::new(),
        };
        let base_env = std::env::vars_os()
            .filter(|(k, _)| !MANAGED_ENV.iter().any(|m| k.as_bytes() == m.as_bytes()))
            .filter(|(k, _)| {
                !crate::node::MANAGED_ENV
                    .iter()
                    .any(|m| k.as_bytes() == m.as_bytes())
            })
            .filter(|(k, _)| !node.iter().any(|(name, _)| k.as_bytes() == name.as_bytes()))
            .filter(|(k, _)| {
                !identity
                    .iter()
                    .any(|(name, _)| k.as_bytes() == name.as_bytes())
            })
            .chain(identity.iter().map(|(k, v)| (OsString::from(k), v.clone())))
            .chain(
                node.iter()
                    .map(|(k, v)| (OsString::from(k), OsString::from(v))),
            )
            .map(|(k, v)| {
                let mut kv = k.into_vec();
                kv.push(b'=');
                kv.extend(v.into_vec());
                cstring(kv)
            })
            .collect::<anyhow::Result<_>>()?;
        let names: Vec<&str> = config.binds.iter().map(|b| b.name.as_str()).collect();
        Ok(Spawner {
            paths: BTreeMap::from([(1, cstring(path.into_vec())?)]),
            argv: argv
                .into_iter()
                .map(|a| cstring(a.into_bytes()))
                .collect::<anyhow::Result<_>>()?,
            base_env,
            listen_fds: env_entry("LISTEN_FDS", config.binds.len()),
            listen_fdnames: env_entry("LISTEN_FDNAMES", names.join(":")),
            notify_socket: notify_socket.map(|n| env_entry("NOTIFY_SOCKET", n)),
            log_pipes: config.log_prefix,
            credentials: config.credentials.clone(),
            null_stdin: match nix::unistd::isatty(std::io::stdin()) {
                Ok(true) => Some(null_stdin(3 + config.binds.len() as c_int)?),
                _ => None,
            },
            binds: config
                .binds
                .iter()
                .map(|b| (b.addr, ListenSpec::new(b.addr).with_options(config.listen)))
                .collect(),
            backlog: c_int::try_from(config.backlog).unwrap_or(c_int::MAX),
        })
    }

    /// Makes workers of `generation` run `app` (found in PATH again by the caller).
    pub fn set_program(&mut self, generation: Generation, app: &App) -> anyhow::Result<()> {
        let (path, _) = program_of(app);
        self.paths.insert(generation, cstring(path.into_vec())?);
        Ok(())
    }

    /// Forks and execs the worker for `slot`; returns once it has exec'd or failed. With
    /// `inherit` (one fd per bind), the worker gets those sockets at fds 3.. instead of
    /// opening its own; otherwise it opens them and, with `send_sockets`, sends them to the
    /// master.
    pub fn spawn(
        &self,
        slot: usize,
        cpu: Option<usize>,
        generation: Generation,
        workers: usize,
        inherit: Option<&[RawFd]>,
        send_sockets: bool,
    ) -> Result<Spawned, SpawnError> {
        if inherit.is_some_and(|fds| fds.len() != self.binds.len()) {
            return Err(SpawnError("held sockets do not match the binds".into()));
        }
        let path = self
            .paths
            .range(..=generation)
            .next_back()
            .map(|(_, p)| p)
            .ok_or_else(|| SpawnError(format!("no program for generation {generation}")))?;
        let per_worker = [
            Some(env_entry("REUSEPORT_CLUSTER_WORKER", slot)),
            cpu.map(|c| env_entry("REUSEPORT_CLUSTER_CPU", c)),
            Some(env_entry("REUSEPORT_CLUSTER_GENERATION", generation)),
            Some(env_entry("REUSEPORT_CLUSTER_WORKERS", workers)),
            self.notify_socket.clone(),
        ];
        let mut envp: Vec<*const c_char> = self
            .base_env
            .iter()
            .chain([&self.listen_fds, &self.listen_fdnames])
            .chain(per_worker.iter().flatten())
            .map(|c| c.as_ptr())
            .collect();
        let mut listen_pid = LISTEN_PID_PREFIX.to_vec();
        listen_pid.resize(LISTEN_PID_PREFIX.len() + PID_DIGITS + 1, 0);
        let listen_pid_index = envp.len();
        envp.push(std::ptr::null()); // becomes LISTEN_PID once the child knows its pid
        envp.push(std::ptr::null());
        let mut argv: Vec<*const c_char> = self.argv.iter().map(|a| a.as_ptr()).collect();
        argv.push(std::ptr::null());

        let fail = |what: &str, e: Errno| SpawnError(format!("{what}: {}", io::Error::from(e)));
        // A socketpair rather than a pipe: the child attaches the sockets it opened.
        let (report_read, report_write) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(|e| fail("creating the start-up pipe", e))?;
        // Keep the write end above the fds the sockets move to, so no dup2 can replace it.
        let first_free = 3 + self.binds.len() as c_int;
        let report_write = move_above(report_write, first_free)
            .map_err(|e| fail("creating the start-up pipe", e))?;
        let mut output = Vec::new();
        if self.log_pipes {
            for _ in 0..2 {
                let (read, write) =
                    pipe2(OFlag::O_CLOEXEC).map_err(|e| fail("creating an output pipe", e))?;
                fcntl(&read, FcntlArg::F_SETFL(OFlag::O_NONBLOCK))
                    .map_err(|e| fail("creating an output pipe", e))?;
                let write = move_above(write, first_free)
                    .map_err(|e| fail("creating an output pipe", e))?;
                output.push((read, write));
            }
        }

        let mut plan = ChildPlan {
            path,
            argv: &argv,
            envp,
            listen_pid,
            listen_pid_index,
            binds: &self.binds,
            backlog: self.backlog,
            inherit,
            send_sockets: send_sockets && inherit.is_none(),
            moved: vec![-1; self.binds.len()],
            cpu,
            report: report_write.as_raw_fd(),
            credentials: self.credentials.as_ref(),
            stdin: self.null_stdin.as_ref().map(|fd| fd.as_raw_fd()),
            output: match &output[..] {
                [(_, out), (_, err)] => Some([out.as_raw_fd(), err.as_raw_fd()]),
                _ => None,
            },
            master: nix::unistd::getpid(),
        };

        // Block every signal across fork so that no handler of the master runs in the child
        // before the child has reset the dispositions; the child unblocks after resetting.
        let mut old_mask = SigSet::empty();
        let _ = sigprocmask(
            SigmaskHow::SIG_SETMASK,
            Some(&SigSet::all()),
            Some(&mut old_mask),
        );
        // SAFETY: the child runs only `child`, which makes async-signal-safe calls, never
        // allocates and never returns, so a lock another thread held at fork (a reaper of
        // master/reaper.rs, the only other threads) is never needed in the child.
        let forked = unsafe { nix::unistd::fork() };
        if let Ok(ForkResult::Child) = forked {
            child(&mut plan);
        }
        let _ = sigprocmask(SigmaskHow::SIG_SETMASK, Some(&old_mask), None);
        let pid = match forked {
            Ok(ForkResult::Parent { child }) => child,
            Ok(ForkResult::Child) => unreachable!("the child never returns"),
            Err(e) => return Err(fail("fork", e)),
        };
        drop(report_write);
        drop(plan);
        let output = match <[_; 2]>::try_from(output) {
            Ok([(out, _), (err, _)]) => Some([out, err]), // the write ends close here
            Err(_) => None,
        };

        match read_report(&report_read, self.binds.len()) {
            Ok((sockets, opened)) => Ok(Spawned {
                pid,
                sockets,
                opened,
                output,
            }),
            Err((step, index, errno)) => {
                // The child has _exit'ed or is about to: reap it here, not as a crash.
                let _ = waitpid(pid, None);
                Err(SpawnError(self.describe(path, step, index, errno)))
            }
        }
    }

    fn describe(&self, path: &CStr, step: Step, index: usize, errno: i32) -> String {
        let err = io::Error::from_raw_os_error(errno);
        let bind = self.binds.get(index).map(|(addr, _)| *addr);
        match (step, bind) {
            (Step::Socket, Some(a)) => listen::explain(SocketStep::Socket, a, &err),
            (Step::SocketOptions, Some(a)) => listen::explain(SocketStep::Options, a, &err),
            (Step::Bind, Some(a)) => listen::explain(SocketStep::Bind, a, &err),
            (Step::Listen, Some(a)) => listen::explain(SocketStep::Listen, a, &err),
            (Step::MoveFd, Some(a)) => {
                format!("moving the socket of {a} to fd {}: {err}", 3 + index)
            }
            (Step::Exec, _) => format!(
                "exec {}: {err}{}",
                path.to_string_lossy(),
                if errno == libc::ENOEXEC {
                    " (a script needs a #! line)"
                } else {
                    ""
                }
            ),
            (Step::Affinity, _) => format!("pinning to its CPU (sched_setaffinity): {err}"),
            (Step::ProcessGroup, _) => format!("setpgid: {err}"),
            (Step::DeathSignal, _) => format!("prctl(PR_SET_PDEATHSIG): {err}"),
            (Step::Output, _) => format!("connecting stdout/stderr to the master: {err}"),
            (Step::DropPrivileges, _) => match &self.credentials {
                Some(c) => format!(
                    "dropping to user {} (uid {}, gid {}): {err}",
                    c.user, c.uid, c.gid
                ),
                None => format!("dropping privileges: {err}"),
            },
            (_, None) => format!("{step:?}: {err}"),
        }
    }
}

/// The path to exec and argv of `app`.
fn program_of(app: &App) -> (OsString, Vec<String>) {
    match app {
        App::Demo => (
            OsString::from("/proc/self/exe"),
            vec!["reuseport-cluster".into(), DEMO_SUBCOMMAND.into()],
        ),
        App::Program { path, argv } => (path.clone().into_os_string(), argv.clone()),
    }
}

fn cstring(bytes: Vec<u8>) -> anyhow::Result<CString> {
    CString::new(bytes).context("a NUL byte in the command")
}

fn env_entry(key: &str, value: impl fmt::Display) -> CString {
    CString::new(format!("{key}={value}")).expect("keys and numbers hold no NUL")
}

/// /dev/null, close-on-exec, at an fd >= `min` (clear of the fds the sockets move to).
fn null_stdin(min: c_int) -> anyhow::Result<OwnedFd> {
    let null = std::fs::File::open("/dev/null").context("opening /dev/null")?;
    move_above(null.into(), min).context("moving /dev/null")
}

/// Duplicates `fd` to the lowest free fd >= `min` (close-on-exec) and closes the original.
fn move_above(fd: OwnedFd, min: c_int) -> Result<OwnedFd, Errno> {
    let raw = fcntl(&fd, FcntlArg::F_DUPFD_CLOEXEC(min))?;
    // SAFETY: F_DUPFD_CLOEXEC returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// One record of the child's report: a socket's inode, or the step that failed.
const RECORD: usize = 16;
const RECORD_SOCKET: u8 = 1;
const RECORD_FAILURE: u8 = 2;

/// Encodes a record: kind, step, bind index, errno, inode.
fn record(kind: u8, step: u8, index: usize, errno: i32, inode: u64) -> [u8; RECORD] {
    let mut r = [0u8; RECORD];
    r[0] = kind;
    r[1] = step;
    r[2..4].copy_from_slice(&(index as u16).to_ne_bytes());
    r[4..8].copy_from_slice(&errno.to_ne_bytes());
    r[8..16].copy_from_slice(&inode.to_ne_bytes());
    r
}

/// Reads the child's report until EOF: the sockets' inodes (and the sockets it attached)
/// when exec succeeded, or the failed (step, bind index, errno).
#[allow(clippy::type_complexity)]
fn read_report(fd: &OwnedFd, binds: usize) -> Result<(Vec<u64>, Vec<OwnedFd>), (Step, usize, i32)> {
    let mut sockets = Vec::with_capacity(binds);
    let mut opened = Vec::new();
    loop {
        let mut buf = [0u8; RECORD];
        let mut cmsg = nix::cmsg_space!([RawFd; 1]);
        let mut iov = [io::IoSliceMut::new(&mut buf)];
        // MSG_CMSG_CLOEXEC: the master's copy of a socket must never reach a later worker
        // except through an explicit dup2.
        let got = match recvmsg::<()>(
            fd.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(msg) => {
                for c in msg.cmsgs().into_iter().flatten() {
                    if let ControlMessageOwned::ScmRights(fds) = c {
                        // SAFETY: the kernel just installed these fds in this process for us.
                        opened.extend(fds.into_iter().map(|f| unsafe { OwnedFd::from_raw_fd(f) }));
                    }
                }
                msg.bytes
            }
            Err(Errno::EINTR) => continue,
            Err(_) => 0,
        };
        if got < RECORD {
            return Ok((sockets, opened)); // EOF: the exec succeeded
        }
        let index = u16::from_ne_bytes([buf[2], buf[3]]) as usize;
        let errno = i32::from_ne_bytes([buf[4], buf[5], buf[6], buf[7]]);
        let mut inode = [0u8; 8];
        inode.copy_from_slice(&buf[8..16]);
        match buf[0] {
            RECORD_SOCKET => sockets.push(u64::from_ne_bytes(inode)),
            _ => return Err((Step::from_u8(buf[1]).unwrap_or(Step::Exec), index, errno)),
        }
    }
}

/// Everything the child uses, owned or borrowed by the master before fork.
struct ChildPlan<'a> {
    path: &'a CStr,
    argv: &'a [*const c_char],
    envp: Vec<*const c_char>,
    listen_pid: Vec<u8>,
    listen_pid_index: usize,
    binds: &'a [(SocketAddr, ListenSpec)],
    backlog: c_int,
    /// The slot's held sockets, to use instead of opening new ones.
    inherit: Option<&'a [RawFd]>,
    /// Attach each socket opened here to its report record, for the master to hold.
    send_sockets: bool,
    /// Scratch space for the sockets' temporary fds, so the child never allocates.
    moved: Vec<RawFd>,
    cpu: Option<usize>,
    report: RawFd,
    /// `--log-prefix` pipes to become fds 1 and 2.
    output: Option<[RawFd; 2]>,
    /// `--user`: dropped to after the sockets are bound.
    credentials: Option<&'a Credentials>,
    /// /dev/null to become fd 0 (when the master's stdin is a terminal).
    stdin: Option<RawFd>,
    master: Pid,
}

/// The forked child: async-signal-safe calls only, never returns.
fn child(plan: &mut ChildPlan) -> ! {
    reset_signals();
    if let Some(null) = plan.stdin {
        // SAFETY: dup2(2) is a syscall; `null` is a valid fd opened before fork.
        if unsafe { libc::dup2(null, 0) } < 0 {
            fail(plan.report, Step::Output, 0, Errno::last_raw());
        }
    }
    if let Some(pipes) = plan.output {
        for (pipe, target) in pipes.into_iter().zip([1, 2]) {
            // SAFETY: dup2(2) is a syscall; `pipe` is a valid fd made before fork.
            if unsafe { libc::dup2(pipe, target) } < 0 {
                fail(plan.report, Step::Output, 0, Errno::last_raw());
            }
        }
    }

    // SAFETY (whole function): every call below is a direct syscall wrapper
    // (setpgid, prctl, getppid, socket, setsockopt, bind, listen, fcntl, close, dup2,
    // close_range, setgroups, setgid, setuid, sched_setaffinity, getpid, execve, write,
    // _exit), all async-signal-safe in this single-threaded child;
    // nothing allocates, locks or panics, and the buffers they read were filled before fork.
    if nix::unistd::setpgid(Pid::from_raw(0), Pid::from_raw(0)).is_err() {
        fail(plan.report, Step::ProcessGroup, 0, Errno::last_raw());
    }

    let first_free = 3 + plan.binds.len() as c_int;
    for (i, (_, spec)) in plan.binds.iter().enumerate() {
        let raw = match plan.inherit {
            Some(held) => held[i],
            None => match listen::open(spec, Some(plan.backlog)) {
                Ok(s) => s.into_raw_fd(),
                Err((step, e)) => fail(
                    plan.report,
                    Step::from_socket(step),
                    i,
                    e.raw_os_error().unwrap_or(0),
                ),
            },
        };
        // Park every socket above 3..3+n first, so that moving one into place can never
        // replace another (a held socket may well be at fd 3 of the master).
        // SAFETY: see the function comment; fcntl(F_DUPFD_CLOEXEC) and close are syscalls.
        let parked = unsafe { libc::fcntl(raw, libc::F_DUPFD_CLOEXEC, first_free) };
        if parked < 0 {
            fail(plan.report, Step::MoveFd, i, Errno::last_raw());
        }
        if plan.inherit.is_none() {
            // SAFETY: `raw` is the socket's original fd, which nothing else uses. (A held
            // socket's fd is the master's, close-on-exec: exec closes this copy.)
            unsafe { libc::close(raw) };
        }
        plan.moved[i] = parked;
    }
    for (i, &parked) in plan.moved.iter().enumerate() {
        // dup2 clears FD_CLOEXEC on the target: exactly fds 3..3+n survive exec.
        // SAFETY: dup2 is a syscall; `parked` is a valid fd from the loop above.
        if unsafe { libc::dup2(parked, 3 + i as c_int) } < 0 {
            fail(plan.report, Step::MoveFd, i, Errno::last_raw());
        }
        // SAFETY: fstat(2) is a syscall; `st` is a plain C struct on this stack frame.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: as above; fd 3+i was just made a copy of the socket.
        if unsafe { libc::fstat(3 + i as c_int, &mut st) } == 0 {
            let record = record(RECORD_SOCKET, 0, i, 0, st.st_ino);
            match plan.send_sockets {
                true => report_with_fd(plan.report, &record, 3 + i as c_int),
                false => report(plan.report, &record),
            }
        }
    }
    // Any fd the master inherited without FD_CLOEXEC would leak into the app: mark them all.
    // Errors (kernels before 5.11) are ignored: every fd the master itself opens is CLOEXEC.
    // SAFETY: close_range(2) is a syscall and only sets flags.
    unsafe {
        libc::syscall(
            libc::SYS_close_range,
            first_free as libc::c_uint,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC as libc::c_uint,
        )
    };

    // Sockets are bound as the master's user (a root master can bind port 80, and the kernel
    // groups SO_REUSEPORT sockets of one effective uid only); then the worker drops to
    // --user, failing closed: supplementary groups, group, user, in that order.
    if let Some(c) = plan.credentials {
        if let Err(e) = nix::unistd::setgroups(&c.groups)
            .and_then(|()| nix::unistd::setgid(c.gid))
            .and_then(|()| nix::unistd::setuid(c.uid))
        {
            fail(plan.report, Step::DropPrivileges, 0, e as i32);
        }
    }
    // After the drop: a change of credentials clears the parent-death signal.
    if let Err(e) = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL) {
        fail(plan.report, Step::DeathSignal, 0, e as i32);
    }
    if nix::unistd::getppid() != plan.master {
        // The master died before PR_SET_PDEATHSIG took effect: nobody to serve for.
        exit_now(1);
    }

    if let Some(cpu) = plan.cpu {
        if !core_affinity::set_for_current(core_affinity::CoreId { id: cpu }) {
            fail(plan.report, Step::Affinity, 0, Errno::last_raw());
        }
    }

    let digits = &mut plan.listen_pid[LISTEN_PID_PREFIX.len()..];
    write_decimal(digits, std::process::id());
    plan.envp[plan.listen_pid_index] = plan.listen_pid.as_ptr().cast();

    // SAFETY: path, argv and envp are NUL-terminated C strings in NULL-terminated arrays,
    // all alive (owned by the master's stack frame, copied into this process by fork).
    unsafe { libc::execve(plan.path.as_ptr(), plan.argv.as_ptr(), plan.envp.as_ptr()) };
    fail(plan.report, Step::Exec, 0, Errno::last_raw())
}

/// Restores default dispositions and an empty mask, as a freshly exec'd program expects
/// (Rust's runtime ignores SIGPIPE; the master blocked everything around fork).
fn reset_signals() {
    for sig in 1..=libc::SIGRTMAX() {
        // KILL and STOP cannot be changed; 32 and 33 belong to glibc's threads.
        if sig == libc::SIGKILL || sig == libc::SIGSTOP || sig == 32 || sig == 33 {
            continue;
        }
        // SAFETY: signal(2) with SIG_DFL is async-signal-safe (glibc's signal is sigaction).
        unsafe { libc::signal(sig, libc::SIG_DFL) };
    }
    let empty = SigSet::empty();
    let _ = sigprocmask(SigmaskHow::SIG_SETMASK, Some(&empty), None);
}

/// Writes one record to the master; async-signal-safe (16 bytes < PIPE_BUF: atomic).
fn report(fd: RawFd, record: &[u8; RECORD]) {
    // SAFETY: write(2) on our own pipe fd from a stack buffer of the given length.
    unsafe { libc::write(fd, record.as_ptr().cast(), RECORD) };
}

/// Writes one record with `pass` attached (SCM_RIGHTS); async-signal-safe: the control
/// buffer is on this stack frame and sendmsg(2) is a syscall.
fn report_with_fd(fd: RawFd, record: &[u8; RECORD], pass: RawFd) {
    // Aligned like a cmsghdr, and large enough for one header and one fd.
    #[repr(C)]
    union Control {
        _align: libc::cmsghdr,
        bytes: [u8; 64],
    }
    let mut control = Control { bytes: [0; 64] };
    let mut iov = libc::iovec {
        iov_base: record.as_ptr() as *mut libc::c_void,
        iov_len: RECORD,
    };
    // SAFETY: msghdr is a plain C struct; all zeroes is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = (&mut control as *mut Control).cast();
    // SAFETY: CMSG_SPACE is arithmetic on its argument.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(size_of::<c_int>() as u32) } as usize;
    // SAFETY: msg_control points at `control`, which has room for one header and one int
    // (checked by msg_controllen above); CMSG_FIRSTHDR and CMSG_DATA only compute pointers
    // into it, and the writes stay inside it. sendmsg(2) reads `msg`, `iov`, `record` and
    // `control`, all alive on this stack frame.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<c_int>() as u32) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<c_int>(), pass);
        libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL);
    }
}

/// Writes the failed step to the master and exits; async-signal-safe.
fn fail(fd: RawFd, step: Step, index: usize, errno: i32) -> ! {
    report(fd, &record(RECORD_FAILURE, step as u8, index, errno, 0));
    exit_now(127)
}

fn exit_now(code: c_int) -> ! {
    // SAFETY: _exit(2) ends the process without running the master's atexit handlers or
    // flushing its stdio buffers, which belong to the master.
    unsafe { libc::_exit(code) }
}

/// Writes `n` in decimal followed by NUL into `buf`, without allocating.
fn write_decimal(buf: &mut [u8], mut n: u32) {
    let mut tmp = [0u8; 10];
    let mut len = 0;
    loop {
        tmp[len] = b'0' + (n % 10) as u8;
        len += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for i in 0..len {
        buf[i] = tmp[len - 1 - i];
    }
    buf[len] = 0;
}

/// A child that has exited (`who`: that one; `None`: any), with how it ended, left
/// unreaped (waitid with WNOWAIT) so that its pid, which is also its process group id,
/// cannot be reused while the caller acts on it. A child another thread is reaping (in
/// wait4, master/reaper.rs) is no longer reported: the kernel marks it dead first.
///
/// Raw libc rather than nix: nix turns the exit signal into its `Signal` enum, which has no
/// real-time signals, and fails with EINVAL on a child killed by one, leaving it unreaped.
pub fn exited_child(who: Option<Pid>) -> Result<Option<(Pid, ExitReason)>, Errno> {
    // SAFETY: siginfo_t is a plain C struct; all zeroes is a valid value.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    let flags = libc::WEXITED | libc::WNOHANG | libc::WNOWAIT;
    let (idtype, id) = match who {
        Some(pid) => (libc::P_PID, pid.as_raw() as libc::id_t),
        None => (libc::P_ALL, 0),
    };
    // SAFETY: waitid(2) writes only into `info`, which lives on this stack frame.
    if unsafe { libc::waitid(idtype, id, &mut info, flags) } < 0 {
        return Err(Errno::last());
    }
    // SAFETY: after a successful waitid, si_pid is set (0 when no child has exited), and
    // for an exited child si_code and si_status say how.
    let (pid, code, status) = unsafe { (info.si_pid(), info.si_code, info.si_status()) };
    if pid == 0 {
        return Ok(None);
    }
    let reason = match code {
        libc::CLD_EXITED => ExitReason::Code(status),
        _ => ExitReason::Signal(status), // CLD_KILLED, CLD_DUMPED
    };
    Ok(Some((Pid::from_raw(pid), reason)))
}

/// Reaps `pid`, an exited child (see [`exited_child`]). This can take seconds: the kernel
/// flushes the child's /proc entries here, measured at 1.4 to 9.7 s for a Node worker under
/// load on a busy 2-core machine; hence master/reaper.rs calls it off the master's loop.
pub fn release(pid: Pid) -> Result<(), Errno> {
    loop {
        let mut status = 0;
        // SAFETY: waitpid(2) writes only into `status`, on this stack frame.
        let r = unsafe { libc::waitpid(pid.as_raw(), &mut status, 0) };
        match r {
            r if r >= 0 => return Ok(()),
            _ if Errno::last() == Errno::EINTR => continue,
            _ => return Err(Errno::last()),
        }
    }
}

/// Marks every fd this process inherited (3 and up) close-on-exec, so that none reaches a
/// worker even where close_range(2) is missing (kernels before 5.11, some seccomp profiles).
pub fn cloexec_inherited_fds() {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    let fds: Vec<RawFd> = dir
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|fd| *fd >= 3)
        .collect();
    for fd in fds {
        // SAFETY: fcntl(F_GETFD/F_SETFD) only reads and sets a flag; an fd that is no longer
        // open (the directory's own) makes it fail with EBADF, which is ignored.
        unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFD);
            if flags >= 0 {
                libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC);
            }
        }
    }
}

/// Counts every delivery of `signal` in `counter`. signal-hook's self-pipe reports a
/// signal once however often it came between two reads; a reload must not be lost that way.
pub fn count_deliveries(signal: c_int, counter: Arc<AtomicUsize>) -> io::Result<()> {
    // SAFETY: the handler only does an atomic add, which is async-signal-safe; the counter
    // is kept alive by the Arc the handler owns.
    unsafe {
        signal_hook::low_level::register(signal, move || {
            counter.fetch_add(1, Ordering::SeqCst);
        })
    }?;
    Ok(())
}

/// The app side of the hand-off: takes the sockets named by LISTEN_FDS/LISTEN_PID.
pub fn listeners_from_env() -> anyhow::Result<Vec<TcpListener>> {
    let pid: u32 = std::env::var("LISTEN_PID")
        .context("LISTEN_PID is not set: run this under reuseport-cluster")?
        .parse()
        .context("LISTEN_PID is not a number")?;
    anyhow::ensure!(
        pid == std::process::id(),
        "LISTEN_PID {pid} is not this process"
    );
    let n: i32 = std::env::var("LISTEN_FDS")
        .context("LISTEN_FDS is not set")?
        .parse()
        .context("LISTEN_FDS is not a number")?;
    (3..3 + n)
        .map(|fd| {
            fcntl(
                // SAFETY: borrowed only for this call, to check that the fd is open.
                unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) },
                FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
            )
            .with_context(|| format!("LISTEN_FDS names fd {fd}, which is not open"))?;
            // SAFETY: LISTEN_PID says these fds were handed to this process, which owns them
            // from here on; nothing else in the demo app refers to fds 3.. .
            Ok(unsafe { TcpListener::from_raw_fd(fd) })
        })
        .collect()
}

/// setsockopt(2) of an `int` option, for the socket options neither socket2 nor nix
/// wraps (TCP_DEFER_ACCEPT, TCP_FASTOPEN). One syscall, no allocation: safe between fork
/// and exec.
pub fn set_int_option(
    fd: &impl AsRawFd,
    level: c_int,
    name: c_int,
    value: c_int,
) -> io::Result<()> {
    // SAFETY: setsockopt reads exactly `size_of::<c_int>()` bytes from a live local; a bad
    // fd or option is reported as an error, not undefined behaviour.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&value as *const c_int).cast(),
            std::mem::size_of::<c_int>() as libc::socklen_t,
        )
    };
    match rc {
        0 => Ok(()),
        _ => Err(io::Error::last_os_error()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_digits_are_written_in_place() {
        let mut buf = [0xffu8; 11];
        write_decimal(&mut buf, 4_294_967_295);
        assert_eq!(&buf, b"4294967295\0");
        write_decimal(&mut buf, 0);
        assert_eq!(&buf[..2], b"0\0");
        write_decimal(&mut buf, 4312);
        assert_eq!(
            CStr::from_bytes_until_nul(&buf).unwrap().to_str().unwrap(),
            "4312"
        );
    }

    fn report_channel() -> (OwnedFd, OwnedFd) {
        socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap()
    }

    #[test]
    fn report_records_round_trip_through_the_channel() {
        let (r, w) = report_channel();
        report(
            w.as_raw_fd(),
            &record(RECORD_SOCKET, 0, 0, 0, 0xdead_beef_1234),
        );
        report(w.as_raw_fd(), &record(RECORD_SOCKET, 0, 1, 0, 7));
        drop(w);
        let (inodes, opened) = read_report(&r, 2).unwrap();
        assert_eq!(inodes, vec![0xdead_beef_1234, 7]);
        assert!(opened.is_empty());
        let (r, w) = report_channel();
        report(w.as_raw_fd(), &record(RECORD_SOCKET, 0, 0, 0, 9));
        report(
            w.as_raw_fd(),
            &record(RECORD_FAILURE, Step::Exec as u8, 0, libc::ENOENT, 0),
        );
        drop(w);
        assert_eq!(
            read_report(&r, 1).map(|(i, _)| i),
            Err((Step::Exec, 0, libc::ENOENT))
        );
    }

    #[test]
    fn an_attached_socket_arrives_as_a_close_on_exec_copy_of_the_same_socket() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let (r, w) = report_channel();
        report_with_fd(
            w.as_raw_fd(),
            &record(RECORD_SOCKET, 0, 0, 0, 5),
            listener.as_raw_fd(),
        );
        drop(w);
        let (inodes, opened) = read_report(&r, 1).unwrap();
        assert_eq!((inodes, opened.len()), (vec![5], 1));
        let flags = fcntl(&opened[0], FcntlArg::F_GETFD).unwrap();
        assert_ne!(flags & libc::FD_CLOEXEC, 0, "close-on-exec in the master");
        let ino = |fd: RawFd| std::fs::metadata(format!("/proc/self/fd/{fd}")).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!(
            ino(opened[0].as_raw_fd()).ino(),
            ino(listener.as_raw_fd()).ino()
        );
    }

    #[test]
    fn steps_round_trip_through_the_report_byte() {
        for s in [Step::ProcessGroup, Step::Bind, Step::Exec, Step::Affinity] {
            assert_eq!(Step::from_u8(s as u8), Some(s));
        }
        assert_eq!(Step::from_u8(0), None);
    }
}
