//! fork/exec of one worker: the only module with `unsafe`.
//!
//! Between fork and exec the child may only make async-signal-safe calls: the master's
//! allocator or any lock may have been held by the forking thread at fork time. So every
//! byte the child needs (path, argv, envp, sockaddrs, CPU) is prepared in the master by
//! [`Spawner::spawn`] before it forks, and [`child`] only makes syscalls and plain stores.
//!
//! The child, in order: restores default signal dispositions and an empty mask, becomes its
//! own process group leader (so a stop signal reaches everything the app starts), asks for
//! SIGKILL when the master dies (PR_SET_PDEATHSIG), opens its listening sockets (socket2:
//! SO_REUSEADDR, SO_REUSEPORT, bind, listen) and moves them to fds 3.., marks every other
//! fd close-on-exec, pins itself to its CPU (core_affinity), fills in LISTEN_PID and execs.
//! A failing step writes (step, bind index, errno) to a close-on-exec pipe and `_exit`s;
//! the master reads EOF when exec succeeded, like `std::process::Command` does.
//!
//! **LISTEN_PID** must be the worker's own pid, known only after fork. The envp entry is
//! built before fork as `LISTEN_PID=` followed by room for 20 digits; the child writes its
//! pid's digits into its own copy-on-write copy of that buffer with plain stores. This
//! keeps one exec per worker (no helper re-exec), so the app's pid is the worker's pid, the
//! one the master supervises and signals.

use std::ffi::{CStr, CString, OsString};
use std::fmt;
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};

use anyhow::Context;
use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::libc::{self, c_char, c_int};
use nix::sys::signal::{sigprocmask, SigSet, SigmaskHow};
use nix::sys::wait::waitpid;
use nix::unistd::{pipe2, ForkResult, Pid};

use crate::config::{App, Config};
use crate::socket::{self, ListenSpec, SocketStep};

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
    path: CString,
    argv: Vec<CString>,
    base_env: Vec<CString>,
    listen_fds: CString,
    listen_fdnames: CString,
    workers: CString,
    binds: Vec<(SocketAddr, ListenSpec)>,
    backlog: c_int,
}

impl Spawner {
    /// Prepares argv, the shared environment and the sockaddrs of `config`.
    pub fn new(config: &Config) -> anyhow::Result<Spawner> {
        let (path, argv) = match &config.app {
            App::Demo => (
                OsString::from("/proc/self/exe"),
                vec!["reuseport-cluster".into(), DEMO_SUBCOMMAND.into()],
            ),
            App::Program { path, argv } => (path.clone().into_os_string(), argv.clone()),
        };
        let cstring = |bytes: Vec<u8>| CString::new(bytes).context("a NUL byte in the command");
        let base_env = std::env::vars_os()
            .filter(|(k, _)| !MANAGED_ENV.iter().any(|m| k.as_bytes() == m.as_bytes()))
            .map(|(k, v)| {
                let mut kv = k.into_vec();
                kv.push(b'=');
                kv.extend(v.into_vec());
                cstring(kv)
            })
            .collect::<anyhow::Result<_>>()?;
        let names: Vec<&str> = config.binds.iter().map(|b| b.name.as_str()).collect();
        Ok(Spawner {
            path: cstring(path.into_vec())?,
            argv: argv
                .into_iter()
                .map(|a| cstring(a.into_bytes()))
                .collect::<anyhow::Result<_>>()?,
            base_env,
            listen_fds: env_entry("LISTEN_FDS", config.binds.len()),
            listen_fdnames: env_entry("LISTEN_FDNAMES", names.join(":")),
            workers: env_entry("REUSEPORT_CLUSTER_WORKERS", config.workers),
            binds: config
                .binds
                .iter()
                .map(|b| (b.addr, ListenSpec::new(b.addr)))
                .collect(),
            backlog: c_int::try_from(config.backlog).unwrap_or(c_int::MAX),
        })
    }

    /// Forks and execs the worker for `slot`; returns once it has exec'd or failed.
    pub fn spawn(
        &self,
        slot: usize,
        cpu: Option<usize>,
        generation: u64,
    ) -> Result<Pid, SpawnError> {
        let per_worker = [
            Some(env_entry("REUSEPORT_CLUSTER_WORKER", slot)),
            cpu.map(|c| env_entry("REUSEPORT_CLUSTER_CPU", c)),
            Some(env_entry("REUSEPORT_CLUSTER_GENERATION", generation)),
        ];
        let mut envp: Vec<*const c_char> = self
            .base_env
            .iter()
            .chain([&self.listen_fds, &self.listen_fdnames, &self.workers])
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
        let (report_read, report_write) =
            pipe2(OFlag::O_CLOEXEC).map_err(|e| fail("creating the start-up pipe", e))?;
        // Keep the write end above the fds the sockets move to, so no dup2 can replace it.
        let first_free = 3 + self.binds.len() as c_int;
        let report_write = move_above(report_write, first_free)
            .map_err(|e| fail("creating the start-up pipe", e))?;

        let mut plan = ChildPlan {
            path: &self.path,
            argv: &argv,
            envp,
            listen_pid,
            listen_pid_index,
            binds: &self.binds,
            backlog: self.backlog,
            moved: vec![-1; self.binds.len()],
            cpu,
            report: report_write.as_raw_fd(),
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
        // SAFETY: the master is single-threaded (see master.rs), so no other thread can hold
        // a lock or be inside the allocator at fork; the child runs only `child`, which makes
        // async-signal-safe calls and never returns.
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

        match read_report(&report_read) {
            None => Ok(pid),
            Some((step, index, errno)) => {
                // The child has _exit'ed or is about to: reap it here, not as a crash.
                let _ = waitpid(pid, None);
                Err(SpawnError(self.describe(step, index, errno)))
            }
        }
    }

    fn describe(&self, step: Step, index: usize, errno: i32) -> String {
        let err = io::Error::from_raw_os_error(errno);
        let bind = self.binds.get(index).map(|(addr, _)| *addr);
        match (step, bind) {
            (Step::Socket, Some(a)) => socket::explain(SocketStep::Socket, a, &err),
            (Step::SocketOptions, Some(a)) => socket::explain(SocketStep::Options, a, &err),
            (Step::Bind, Some(a)) => socket::explain(SocketStep::Bind, a, &err),
            (Step::Listen, Some(a)) => socket::explain(SocketStep::Listen, a, &err),
            (Step::MoveFd, Some(a)) => {
                format!("moving the socket of {a} to fd {}: {err}", 3 + index)
            }
            (Step::Exec, _) => format!(
                "exec {}: {err}{}",
                self.path.to_string_lossy(),
                if errno == libc::ENOEXEC {
                    " (a script needs a #! line)"
                } else {
                    ""
                }
            ),
            (Step::Affinity, _) => format!("pinning to its CPU (sched_setaffinity): {err}"),
            (Step::ProcessGroup, _) => format!("setpgid: {err}"),
            (Step::DeathSignal, _) => format!("prctl(PR_SET_PDEATHSIG): {err}"),
            (_, None) => format!("{step:?}: {err}"),
        }
    }
}

fn env_entry(key: &str, value: impl fmt::Display) -> CString {
    CString::new(format!("{key}={value}")).expect("keys and numbers hold no NUL")
}

/// Duplicates `fd` to the lowest free fd >= `min` (close-on-exec) and closes the original.
fn move_above(fd: OwnedFd, min: c_int) -> Result<OwnedFd, Errno> {
    let raw = fcntl(&fd, FcntlArg::F_DUPFD_CLOEXEC(min))?;
    // SAFETY: F_DUPFD_CLOEXEC returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Reads the child's report: `None` on EOF (exec succeeded).
fn read_report(fd: &OwnedFd) -> Option<(Step, usize, i32)> {
    let mut buf = [0u8; 8];
    let mut got = 0;
    while got < buf.len() {
        match nix::unistd::read(fd, &mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(Errno::EINTR) => continue,
            Err(_) => break,
        }
    }
    if got < buf.len() {
        return None;
    }
    let step = Step::from_u8(buf[0]).unwrap_or(Step::Exec);
    let index = u16::from_ne_bytes([buf[2], buf[3]]) as usize;
    Some((
        step,
        index,
        i32::from_ne_bytes([buf[4], buf[5], buf[6], buf[7]]),
    ))
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
    /// Scratch space for the sockets' temporary fds, so the child never allocates.
    moved: Vec<RawFd>,
    cpu: Option<usize>,
    report: RawFd,
    master: Pid,
}

/// The forked child: async-signal-safe calls only, never returns.
fn child(plan: &mut ChildPlan) -> ! {
    reset_signals();

    // SAFETY (whole function): every call below is a direct syscall wrapper
    // (setpgid, prctl, getppid, socket, setsockopt, bind, listen, fcntl, close, dup2,
    // close_range, sched_setaffinity, getpid, execve, write, _exit), all async-signal-safe;
    // nothing allocates, locks or panics, and the buffers they read were filled before fork.
    if nix::unistd::setpgid(Pid::from_raw(0), Pid::from_raw(0)).is_err() {
        fail(plan.report, Step::ProcessGroup, 0, Errno::last_raw());
    }
    if nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL).is_err() {
        fail(plan.report, Step::DeathSignal, 0, Errno::last_raw());
    }
    if nix::unistd::getppid() != plan.master {
        // The master died before PR_SET_PDEATHSIG took effect: nobody to serve for.
        exit_now(1);
    }

    let first_free = 3 + plan.binds.len() as c_int;
    for (i, (_, spec)) in plan.binds.iter().enumerate() {
        let sock = match socket::open(spec, Some(plan.backlog)) {
            Ok(s) => s,
            Err((step, e)) => fail(
                plan.report,
                Step::from_socket(step),
                i,
                e.raw_os_error().unwrap_or(0),
            ),
        };
        // Park every socket above 3..3+n first, so that moving one into place can never
        // replace another.
        let raw = sock.into_raw_fd();
        // SAFETY: see the function comment; fcntl(F_DUPFD_CLOEXEC) and close are syscalls.
        let parked = unsafe { libc::fcntl(raw, libc::F_DUPFD_CLOEXEC, first_free) };
        if parked < 0 {
            fail(plan.report, Step::MoveFd, i, Errno::last_raw());
        }
        // SAFETY: `raw` is the socket's original fd, which nothing else uses.
        unsafe { libc::close(raw) };
        plan.moved[i] = parked;
    }
    for (i, &parked) in plan.moved.iter().enumerate() {
        // dup2 clears FD_CLOEXEC on the target: exactly fds 3..3+n survive exec.
        // SAFETY: dup2 is a syscall; `parked` is a valid fd from the loop above.
        if unsafe { libc::dup2(parked, 3 + i as c_int) } < 0 {
            fail(plan.report, Step::MoveFd, i, Errno::last_raw());
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
    for sig in 1..32 {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        // SAFETY: signal(2) with SIG_DFL is async-signal-safe (glibc's signal is sigaction).
        unsafe { libc::signal(sig, libc::SIG_DFL) };
    }
    let empty = SigSet::empty();
    let _ = sigprocmask(SigmaskHow::SIG_SETMASK, Some(&empty), None);
}

/// Writes the failed step to the master and exits; async-signal-safe.
fn fail(report: RawFd, step: Step, index: usize, errno: i32) -> ! {
    let index = (index as u16).to_ne_bytes();
    let e = errno.to_ne_bytes();
    let buf = [step as u8, 0, index[0], index[1], e[0], e[1], e[2], e[3]];
    // SAFETY: write(2) on our own pipe fd from a stack buffer of the given length.
    unsafe { libc::write(report, buf.as_ptr().cast(), buf.len()) };
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

    #[test]
    fn steps_round_trip_through_the_report_byte() {
        for s in [Step::ProcessGroup, Step::Bind, Step::Exec, Step::Affinity] {
            assert_eq!(Step::from_u8(s as u8), Some(s));
        }
        assert_eq!(Step::from_u8(0), None);
    }
}
