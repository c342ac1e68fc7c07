//! The master: one thread, one place where it waits.
//!
//! It blocks in poll(2) on signal-hook's self-pipe, with the supervisor's next timer as the
//! timeout; an idle cluster means a master asleep in poll with no timeout at all. Each wake
//! drains the signals, reaps every exited child, and feeds the resulting events to the
//! [`Supervisor`], whose actions (fork, signal, log, exit) are carried out here.
//!
//! The master must stay single-threaded: `fork` is only safe without other threads, and
//! PR_SET_PDEATHSIG fires when the forking *thread* exits.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::time::Instant;

use anyhow::Context;
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{killpg, Signal};
use nix::sys::wait::{waitid, waitpid, Id, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use signal_hook::consts::signal::{SIGCHLD, SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGTTIN, SIGTTOU};
use signal_hook::iterator::backend::SignalDelivery;
use signal_hook::iterator::exfiltrator::SignalOnly;

use crate::config::{format_cpu_list, App, Config};
use crate::socket;
use crate::spawn::Spawner;
use crate::supervisor::{Action, Event, Outcome, Settings, Supervisor};
use crate::worker::ExitReason;
use crate::{debug, info, warn};

/// Signals the master handles; every other one keeps its default action.
const HANDLED: [i32; 7] = [SIGTERM, SIGINT, SIGQUIT, SIGCHLD, SIGHUP, SIGTTIN, SIGTTOU];

/// Runs the cluster until it has stopped.
pub fn run(mut config: Config) -> anyhow::Result<Outcome> {
    nix::sys::prctl::set_child_subreaper(true)
        .context("becoming a child subreaper (PR_SET_CHILD_SUBREAPER)")?;
    // Held, bound but never listening, for the master's whole life: see socket.rs.
    let _reserved = socket::reserve(&mut config.binds)?;
    if let Some(max) = socket::somaxconn().filter(|max| config.backlog > *max) {
        warn!(
            "--backlog {} is above net.core.somaxconn ({max}), which silently caps it; \
             raise it with: sysctl -w net.core.somaxconn={}",
            config.backlog, config.backlog
        );
    }
    let spawner = Spawner::new(&config)?;
    let (read, write) = UnixStream::pair().context("creating the signal pipe")?;
    let mut signals = SignalDelivery::with_pipe(read, write, SignalOnly, HANDLED)
        .context("installing signal handlers")?;

    announce(&config);
    let settings = Settings {
        workers: config.workers,
        cpus: (0..config.workers).map(|i| config.cpu_of(i)).collect(),
        grace: config.grace,
        stop_signal: config.stop_signal,
    };
    let mut supervisor = Supervisor::new(settings, Instant::now());
    let mut events = VecDeque::from([Event::Start]);
    loop {
        while let Some(event) = events.pop_front() {
            let actions = supervisor.step(event, Instant::now());
            if let Some(outcome) = perform(actions, &spawner, &mut events) {
                return Ok(outcome);
            }
        }
        wait(&signals, supervisor.next_deadline());
        for signal in signals.pending() {
            match signal {
                SIGTERM | SIGINT => events.push_back(Event::StopGracefully),
                SIGQUIT => events.push_back(Event::StopNow),
                SIGHUP => info!("SIGHUP ignored: this version has no rolling restart"),
                SIGTTIN | SIGTTOU => info!("SIGTTIN/SIGTTOU ignored: this version does not scale"),
                _ => {} // SIGCHLD: reaped below, on every wake
            }
        }
        reap(&supervisor, &mut events);
        events.push_back(Event::Tick);
    }
}

/// Carries out `actions`; a fork's result comes back as an event.
fn perform(
    actions: Vec<Action>,
    spawner: &Spawner,
    events: &mut VecDeque<Event>,
) -> Option<Outcome> {
    for action in actions {
        match action {
            Action::Spawn {
                slot,
                cpu,
                generation,
            } => events.push_back(match spawner.spawn(slot, cpu, generation) {
                Ok(pid) => Event::Spawned { slot, pid },
                Err(e) => Event::SpawnFailed {
                    slot,
                    error: e.to_string(),
                },
            }),
            Action::Signal { pgid, signal } => match signal_group(pgid, signal) {
                Ok(()) | Err(Errno::ESRCH) => {}
                Err(e) => warn!("sending {signal} to process group {pgid}: {e}"),
            },
            Action::Log(line) => info!("{line}"),
            Action::Exit(outcome) => return Some(outcome),
        }
    }
    None
}

/// killpg(2) for a worker's group. A group id of 0 or 1 would mean our own group or every
/// process (killpg(1) is kill(-1)); no worker has one, and this makes sure of it.
fn signal_group(pgid: Pid, signal: Signal) -> Result<(), Errno> {
    if pgid.as_raw() <= 1 {
        return Err(Errno::EINVAL);
    }
    killpg(pgid, signal)
}

/// Sleeps until a signal arrives or `deadline` passes.
fn wait(signals: &SignalDelivery<UnixStream, SignalOnly>, deadline: Option<Instant>) {
    let timeout = match deadline {
        None => PollTimeout::NONE,
        Some(d) => {
            // Round up: waking a little early would spin until the deadline.
            let ms = d
                .saturating_duration_since(Instant::now())
                .as_micros()
                .div_ceil(1000);
            PollTimeout::try_from(ms.min(i32::MAX as u128) as i32).unwrap_or(PollTimeout::MAX)
        }
    };
    let mut fds = [PollFd::new(signals.get_read().as_fd(), PollFlags::POLLIN)];
    match poll(&mut fds, timeout) {
        Ok(_) | Err(Errno::EINTR) => {}
        Err(e) => warn!("poll: {e}"),
    }
}

/// Reaps every exited child: workers become events, adopted orphans are just reaped.
fn reap(supervisor: &Supervisor, events: &mut VecDeque<Event>) {
    let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
    loop {
        let pid = match waitid(Id::All, flags) {
            Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
            Err(Errno::EINTR) => continue,
            Err(e) => return warn!("waitid: {e}"),
            Ok(status) => match status.pid() {
                Some(pid) => pid,
                None => return,
            },
        };
        if supervisor.is_worker(pid) {
            // While the worker is an unreaped zombie its pid (= its group id) cannot be
            // reused, so this reaches exactly what it left behind in its group.
            let _ = signal_group(pid, Signal::SIGKILL);
        }
        match waitpid(pid, Some(WaitPidFlag::WNOHANG)).map(ExitReason::from_wait_status) {
            Ok(Some((pid, reason))) => {
                if !supervisor.is_worker(pid) {
                    debug!("reaped orphan pid {pid} ({reason})");
                }
                events.push_back(Event::Exited { pid, reason });
            }
            Ok(None) | Err(Errno::EINTR) => continue,
            Err(e) => return warn!("waitpid {pid}: {e}"),
        }
    }
}

/// The start-up lines: what runs where.
fn announce(config: &Config) {
    let sockets: Vec<String> = config
        .binds
        .iter()
        .enumerate()
        .map(|(i, b)| format!("fd {} {b}", 3 + i))
        .collect();
    let pinning = match &config.cpus {
        Some(cpus) => format!("pinned to CPUs {}", format_cpu_list(cpus)),
        None => "not pinned".into(),
    };
    info!(
        "reuseport-cluster {}: master pid {}, {} workers {pinning}; sockets: {}",
        env!("CARGO_PKG_VERSION"),
        std::process::id(),
        config.workers,
        sockets.join(", ")
    );
    if config.app == App::Demo {
        info!(
            "running the built-in demo app: try curl -i http://{}/ ; run your own app with \
             --cmd \"PROGRAM ARGS\" or -- PROGRAM ARGS (it gets the socket as fd 3, LISTEN_FDS=1)",
            client_addr(config.binds[0].addr)
        );
    }
}

/// The address a local client uses to reach `addr` (a wildcard becomes loopback).
fn client_addr(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V4(a) if a.ip().is_unspecified() => {
            SocketAddr::from(([127, 0, 0, 1], a.port()))
        }
        SocketAddr::V6(a) if a.ip().is_unspecified() => {
            SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, a.port()))
        }
        other => other,
    }
}
