//! The master: one thread, one place where it waits.
//!
//! It blocks in poll(2) on signal-hook's self-pipe and the workers' notify socket, with the
//! nearest timer as the timeout; an idle cluster means a master asleep in poll with no
//! timeout at all. Each wake drains the signals and notify messages, reaps every exited
//! child, and feeds the resulting events to the [`Supervisor`], whose actions (prepare a
//! generation, fork, signal, log, exit) are carried out here. While a worker is starting in
//! `--ready listening|auto` mode the master also looks at /proc every few milliseconds
//! (there is no event for "a process waits on this socket").
//!
//! The master's loop runs on one thread, the process's main thread, which alone forks:
//! PR_SET_PDEATHSIG fires when the forking *thread* exits. The only other threads are the
//! reapers of master/reaper.rs (wait4(2) can take seconds), which start with every signal
//! blocked and take no lock a forked child could need: the child makes async-signal-safe
//! calls only and never allocates.

pub mod deaths;
pub mod event_waits;
pub mod procs;
pub mod readiness;
pub mod reaper;
pub mod recycle;
pub mod rolling;
pub mod spawn;
pub mod supervisor;
pub mod worker;
pub mod worker_output;

use std::collections::{BTreeSet, HashSet, VecDeque};
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use nix::errno::Errno;
use nix::poll::{ppoll, PollFd, PollFlags};
use nix::sys::signal::SigSet;
use nix::sys::signal::{killpg, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::unistd::Pid;
use signal_hook::consts::signal::{
    SIGALRM, SIGCHLD, SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGUSR1, SIGUSR2, SIGWINCH,
};
use signal_hook::iterator::backend::SignalDelivery;
use signal_hook::iterator::exfiltrator::SignalOnly;

use crate::config::{format_cpu_list, App, Config};
use crate::master::deaths::OomWitness;
use crate::master::procs::{Ending, Leftovers};
use crate::master::reaper::Reaper;
use crate::master::recycle::Recycler;
use crate::master::spawn::Spawner;
use crate::master::supervisor::{
    Action, Event, Outcome, Report, RolloutResult, Settings, Supervisor,
};
use crate::master::worker::{ExitReason, WorkerState};
use crate::master::worker_output::WorkerOutput;
use crate::ops::control::{ControlServer, Request};
use crate::ops::metrics::MetricsServer;
use crate::ops::notify::NotifySocket;
use crate::ops::status::ClusterStatus;
use crate::ops::systemd::{SystemdNotify, View};
use crate::ops::waiting::{Line, Wait, Waiters};
use crate::sockets::listen;
use crate::sockets::slots::SlotSockets;
use crate::{debug, info, log, warn};

/// Signals the master handles through signal-hook. USR1, USR2, WINCH and ALRM are sent by
/// habit (logrotate hooks, gunicorn and nginx habits, a resized terminal, a stray alarm):
/// each is handled so that none takes the cluster down (README, "Signals"). SIGPIPE is not
/// handled but stays ignored, as Rust's runtime set it: a handler would write to the signal
/// pipe, and once that pipe's read end is closed (at exit) the write raises SIGPIPE again,
/// for ever. SIGTTIN and SIGTTOU come through a signalfd instead (see `scale_signals`).
const HANDLED: [i32; 9] = [
    SIGTERM, SIGINT, SIGQUIT, SIGCHLD, SIGHUP, SIGUSR1, SIGUSR2, SIGWINCH, SIGALRM,
];

/// A SIGINT this soon after the stop began is the same request arriving twice (a tool that
/// signals the pid and its process group), not a person pressing Ctrl-C again.
const SAME_REQUEST: Duration = Duration::from_millis(500);

/// How often /proc is read for a starting worker's readiness.
const READINESS_SCAN: Duration = Duration::from_millis(5);
/// How long a starting worker may listen only on addresses of its own before it is told
/// (an app may open an admin port a moment before it serves fd 3).
const ELSEWHERE_AFTER: Duration = Duration::from_millis(500);
/// How often starting workers are looked at for that.
const ELSEWHERE_CHECK: Duration = Duration::from_millis(250);
/// How often a starting worker not seen waiting is checked for connections it already serves
/// (a sock_diag dump of every connection: dearer than the scan).
const SERVING_CHECK: Duration = Duration::from_millis(50);

/// Runs the cluster until it has stopped.
pub fn run(mut config: Config) -> anyhow::Result<Outcome> {
    spawn::cloexec_inherited_fds();
    nix::sys::prctl::set_child_subreaper(true)
        .context("becoming a child subreaper (PR_SET_CHILD_SUBREAPER)")?;
    // Held, bound but never listening, for the master's whole life: see sockets/listen.rs.
    let _reserved = listen::reserve(&mut config.binds)?;
    if let Some(holder) = crate::sockets::ports::foreign_listener(&config.binds) {
        match config.share_port {
            true => warn!(
                "--share-port: sharing port {} with pid {}",
                holder.ours.port(),
                holder
                    .owner
                    .as_ref()
                    .map_or("?".into(), |(pid, _)| pid.to_string())
            ),
            false => anyhow::bail!(holder.refusal()),
        }
    }
    if let Some(max) = listen::somaxconn().filter(|max| config.backlog > *max) {
        warn!(
            "--backlog {} is above net.core.somaxconn ({max}), which silently caps it; \
             raise it with: sysctl -w net.core.somaxconn={}",
            config.backlog, config.backlog
        );
    }
    if let Some((level, line)) = listen::apply_migrate(config.migrate)? {
        log::line(level, &line);
    }
    let name = config
        .name
        .clone()
        .unwrap_or_else(|| config.binds[0].addr.port().to_string());
    let control_path = crate::ops::control::socket_path(&name, config.control.as_deref());
    let mut control = ControlServer::open(&control_path, &name)?;
    let mut metrics = config.metrics.map(MetricsServer::bind).transpose()?;
    let started = Instant::now();
    install_node_preload(&mut config);
    let notify = match config.ready.uses_notify() {
        true => Some(match config.node.path().and_then(|p| p.parent()) {
            None => NotifySocket::bind(None)?,
            Some(dir) => NotifySocket::bind(Some(dir)).or_else(|e| {
                warn!("node workers' readiness is read from /proc: {e:#}");
                NotifySocket::bind(None)
            })?,
        }),
        false => None,
    };
    // Before any fork: workers inherit the limit.
    if let Some(line) = open_files_limit(config.nofile)? {
        info!("{line}");
    }
    let mut spawner = Spawner::new(&config, notify.as_ref())?;
    let (read, write) = UnixStream::pair().context("creating the signal pipe")?;
    let mut signals = SignalDelivery::with_pipe(read, write, SignalOnly, HANDLED)
        .context("installing signal handlers")?;
    let scale_signals = scale_signals()?;
    // Two SIGHUPs are two reloads, even when both arrive before the master wakes.
    let reloads = Arc::new(AtomicUsize::new(0));
    spawn::count_deliveries(SIGHUP, Arc::clone(&reloads)).context("counting SIGHUPs")?;

    announce(&config);
    if let Some(addr) = metrics.as_ref().and_then(|m| m.local_addr()) {
        info!("metrics at http://{addr}/metrics");
    }
    info!("control socket {} (name {name})", control_path.display());
    let (mut sockets, fallback) = SlotSockets::with_steering(
        SlotSockets::enabled_by_env(),
        config.binds.len(),
        config.steer,
        &config
            .binds
            .iter()
            .map(|b| listen::ListenSpec::new(b.addr).with_options(config.listen))
            .collect::<Vec<_>>(),
    )
    .map_err(anyhow::Error::msg)?;
    if let Some(line) = fallback {
        info!("{line}");
    }
    let settings = Settings {
        workers: config.workers,
        cpus: config.cpus.clone(),
        grace: config.grace,
        stop_signal: config.stop_signal,
        ready: config.ready,
        ready_timeout: config.ready_timeout,
        rolling_batch: config.rolling_batch,
        drain: sockets.steers(),
        min_uptime: config.min_uptime,
        max_memory: config.recycle.max_memory.is_some(),
    };
    let mut supervisor = Supervisor::new(settings, Instant::now());
    let mut recycler = Recycler::new(config.recycle, Instant::now());
    if !sockets.enabled() {
        info!(
            "socket takeover off ({}=0): each worker opens its own sockets",
            crate::sockets::slots::TAKEOVER_ENV
        );
    }
    let mut output = WorkerOutput::default();
    // From here on the master's own lines never block the loop (log.rs).
    crate::log::queue_own_lines();
    let mut systemd = SystemdNotify::from_env(Instant::now());
    let mut waiters = Waiters::default();
    let mut next_elsewhere_check = Instant::now();
    let mut next_serving_check = Instant::now();
    let mut events = VecDeque::from([Event::Start]);
    let mut leftovers = Leftovers::new(config.grace, config.stop_signal);
    let mut reaper = Reaper::new().context("creating the reaper's wake-up pipe")?;
    let mut oom = OomWitness::new();
    let mut notify_log = RateLimit::default();
    // Leftovers SIGKILLed before the stop began do not make it a forced one.
    let mut killed_before_stop = None;
    // When the stop began: a SIGINT soon after is the same request delivered twice.
    let mut stop_began: Option<Instant> = None;
    // The supervisor is done, but processes the workers left still run: waited for here.
    let mut exit: Option<Outcome> = None;
    loop {
        while let Some(event) = events.pop_front() {
            let actions = supervisor.step(event, Instant::now());
            // What an action answers (a fork's outcome) is handled before anything else.
            let mut done = Performed::default();
            let size = supervisor.slots().len();
            // Slots whose next worker surges beside a serving one (it gets fresh sockets under
            // steering, to drain the old ones); a hung worker's successor takes its socket over.
            let served: BTreeSet<usize> = supervisor
                .slots()
                .iter()
                .filter(|s| s.pid().is_some() && supervisor.replacing_hung() != Some(s.index))
                .map(|s| s.index)
                .collect();
            let outcome = perform(
                actions,
                &config,
                &mut spawner,
                &mut sockets,
                (size, &served),
                &mut output,
                &mut done,
            );
            for report in &done.reports {
                tell(&mut control, waiters.on_report(report));
            }
            if outcome.is_some() {
                exit = outcome;
            }
            for answer in done.answers.into_iter().rev() {
                events.push_front(answer);
            }
        }
        oom.note_ready(
            supervisor
                .workers()
                .filter(|w| w.state == WorkerState::Ready)
                .map(|w| w.pid),
        );
        if supervisor.is_stopping() && killed_before_stop.is_none() {
            killed_before_stop = Some(leftovers.killed());
            stop_began = Some(Instant::now());
        }
        let live: HashSet<i32> = supervisor.workers().map(|w| w.pid.as_raw()).collect();
        if !leftovers.is_empty() || exit.is_some() {
            for line in leftovers.advance(&live, Instant::now()) {
                info!("{line}");
            }
        }
        if let (Some(outcome), true) = (&exit, leftovers.is_empty()) {
            // Whatever ended since the last reap is a zombie child of the master by now (the
            // kernel reparents at exit, not at reaping): reap it, leave nothing to init.
            reap(
                &supervisor,
                &mut leftovers,
                &mut reaper,
                &mut oom,
                &mut events,
            );
            let forced = leftovers.killed() > killed_before_stop.unwrap_or(0);
            let outcome = match outcome {
                Outcome::Stopped if forced => Outcome::Killed,
                other => other.clone(),
            };
            tell(&mut control, waiters.on_exit(&outcome));
            output.flush();
            if let Some(sd) = systemd.as_mut() {
                sd.update(systemd_view(&supervisor));
            }
            // Clients have their answer; now the reaps under way, and the zombies they held
            // back (waitid reports one child until its reap begins): nothing is left to init.
            loop {
                reaper.finish();
                reap(
                    &supervisor,
                    &mut leftovers,
                    &mut reaper,
                    &mut oom,
                    &mut events,
                );
                if reaper.is_idle() {
                    break;
                }
            }
            return Ok(outcome);
        }
        if !waiters.is_empty() {
            waiters.retain_open(|id| control.is_open(id));
            tell(&mut control, waiters.check(&supervisor, Instant::now()));
        }

        sockets.set_serving(supervisor.ready_slots());
        if let Some(sd) = systemd.as_mut() {
            sd.update(systemd_view(&supervisor));
        }
        let scanning = config.ready.uses_listening() && supervisor.starting().next().is_some();
        let scan = scanning.then(|| Instant::now() + READINESS_SCAN);
        let metrics_deadline = metrics.as_ref().and_then(|m| m.next_deadline());
        let watchdog = systemd.as_ref().and_then(|sd| sd.next_deadline());
        let deadline = [
            supervisor.next_deadline(),
            recycler.next_deadline(),
            scan,
            control.next_deadline(),
            metrics_deadline,
            watchdog,
            leftovers.next_deadline(Instant::now()),
            sockets.next_deadline(),
        ]
        .into_iter()
        .flatten()
        .min();
        let mut fds = vec![
            PollFd::new(signals.get_read().as_fd(), PollFlags::POLLIN),
            PollFd::new(scale_signals.as_fd(), PollFlags::POLLIN),
            PollFd::new(reaper.poll_fd(), PollFlags::POLLIN),
        ];
        if let Some(n) = &notify {
            for fd in n.poll_fds() {
                fds.push(PollFd::new(fd, PollFlags::POLLIN));
            }
        }
        let metrics_fds = metrics.as_ref().map(|m| m.poll_fds()).unwrap_or_default();
        for (fd, events) in control
            .poll_fds()
            .into_iter()
            .chain(output.poll_fds())
            .chain(metrics_fds)
        {
            fds.push(PollFd::new(fd, events));
        }
        let held = sockets.poll_fds();
        for (fd, events) in &held {
            fds.push(PollFd::new(*fd, *events));
        }
        wait(&mut fds, deadline);
        // accept(2) only on a listener that polled readable, not on every pass.
        let readable = |listener: Option<i32>| {
            listener.is_some_and(|l| {
                fds.iter().any(|p| {
                    p.as_fd().as_raw_fd() == l && p.revents().is_some_and(|r| !r.is_empty())
                })
            })
        };
        let control_ready = readable(Some(control.listener_fd()));
        let metrics_ready = readable(metrics.as_ref().map(|m| m.listener_fd()));
        // A held socket that stopped listening reports POLLHUP, asked for or not.
        let held_woke = fds[fds.len() - held.len()..]
            .iter()
            .any(|p| p.revents().is_some_and(|r| !r.is_empty()));
        drop(fds);
        drop(held);

        output.service();
        if let Some(sd) = systemd.as_mut() {
            sd.tick(Instant::now());
        }
        // Drain the signal pipe before reaping: a child that exits after this writes a new
        // byte and wakes the next poll. (Reaping first, then draining, would swallow the
        // wake-up of a child that exited in between, and the master would sleep forever.)
        let arrived: Vec<i32> = signals.pending().collect();
        // Exits are queued before the signals: a stop request handled in the same wake as
        // the last worker's exit must find it gone (and not SIGKILL, nor exit 3, for nothing).
        reaper.service();
        reap(
            &supervisor,
            &mut leftovers,
            &mut reaper,
            &mut oom,
            &mut events,
        );
        for event in &events {
            if let Event::Exited { pid, .. } = event {
                sockets.exited(*pid);
            }
        }
        events.extend(sockets.service(Instant::now()));
        // A socket an app shut down is dead for every holder: it wakes the poll (POLLHUP),
        // and that wake checks, one getsockopt per held socket (not every wake: under load
        // the master wakes every few ms to sample).
        if held_woke {
            for (slot, inode) in sockets.lost() {
                events.push_back(Event::SocketLost { slot, inode });
            }
        }
        look_for_recycles(&mut recycler, &supervisor, &sockets, &mut events);
        if let Some(m) = metrics.as_mut() {
            let wanted = m.service(Instant::now(), metrics_ready);
            if !wanted.is_empty() {
                let status = ClusterStatus::collect(
                    &config,
                    &supervisor,
                    &sockets,
                    &name,
                    started,
                    Instant::now(),
                );
                for id in wanted {
                    m.respond(id, &status);
                }
            }
        }
        for (id, request) in control.service(Instant::now(), control_ready) {
            let answer = match request {
                Request::Status { json } => {
                    let status = ClusterStatus::collect(
                        &config,
                        &supervisor,
                        &sockets,
                        &name,
                        started,
                        Instant::now(),
                    );
                    match json {
                        true => serde_json::to_string_pretty(&status).unwrap_or_default() + "\n",
                        false => status.to_text(),
                    }
                }
                Request::Stop { wait } if supervisor.is_stopping() => match wait {
                    true => hold(&mut control, &mut waiters, id, Wait::Stop, None),
                    false => "ok: the cluster is already stopping\n".into(),
                },
                _ if supervisor.is_stopping() => "error: the cluster is stopping\n".into(),
                Request::Reload { wait } => {
                    events.push_back(Event::Reload);
                    let next = supervisor.generation() + 1;
                    let what = match supervisor.rolling() {
                        Some((g, _, _)) => format!("the rolling restart to generation {g} is under way; one more pass, to generation {next}, follows it"),
                        None => format!("rolling restart to generation {next} of {} workers started", supervisor.slots().len()),
                    };
                    match wait {
                        true => {
                            let first = format!("progress: {what}");
                            let wait = Wait::Reload { generation: next };
                            hold(&mut control, &mut waiters, id, wait, Some(&first))
                        }
                        false => format!("ok: {what}\n"),
                    }
                }
                Request::Scale { count, wait } => {
                    let have = supervisor.slots().len();
                    match count.resolve(have) {
                        Err(e) => format!("error: {e}\n"),
                        Ok(n) if n > crate::config::MAX_WORKERS => format!(
                            "error: scale to {n}: at most {} workers\n",
                            crate::config::MAX_WORKERS
                        ),
                        Ok(n) if supervisor.rolling().is_some() => {
                            format!("error: scale to {n}: a rolling restart is under way; try again once it is done (reuseport-cluster status shows it)\n")
                        }
                        Ok(n) => {
                            events.push_back(Event::Scale(n));
                            match wait {
                                true => {
                                    let first =
                                        format!("progress: scaling from {have} to {n} workers");
                                    let wait = Wait::Scale { from: have, to: n };
                                    hold(&mut control, &mut waiters, id, wait, Some(&first))
                                }
                                false => format!("ok: scaling from {have} to {n} workers\n"),
                            }
                        }
                    }
                }
                Request::Stop { wait } => {
                    events.push_back(Event::StopGracefully);
                    match wait {
                        true => hold(
                            &mut control,
                            &mut waiters,
                            id,
                            Wait::Stop,
                            Some("progress: stopping"),
                        ),
                        false => "ok: stopping\n".into(),
                    }
                }
            };
            if answer.is_empty() {
                continue; // held: answered as it goes
            }
            control.respond(id, answer);
        }
        for signal in arrived {
            match signal {
                SIGINT if stop_began.is_some_and(|t| t.elapsed() >= SAME_REQUEST) => {
                    info!("second Ctrl-C (SIGINT) during the stop: killing every worker now");
                    events.push_back(Event::StopNow)
                }
                SIGTERM | SIGINT => events.push_back(Event::StopGracefully),
                SIGQUIT => events.push_back(Event::StopNow),
                SIGUSR1 => info!(
                    "SIGUSR1: nothing to reopen (the master logs to stderr); not forwarded to \
                     the workers (Node opens its inspector on it)"
                ),
                SIGUSR2 => info!("SIGUSR2 ignored: send SIGHUP for a rolling restart"),
                SIGALRM => info!("SIGALRM ignored"),
                SIGWINCH => debug!("signal {signal} ignored"),
                _ => {} // SIGCHLD: reaped above; SIGHUP: counted below
            }
        }
        // Scale requests: only from kill(2). The kernel sends SIGTTIN/SIGTTOU itself to a
        // background process that touches its terminal; that is no request.
        while let Ok(Some(info)) = scale_signals.read_signal() {
            let have = supervisor.slots().len();
            match (info.ssi_code, info.ssi_signo as i32) {
                (nix::libc::SI_USER, nix::libc::SIGTTIN) => {
                    events.push_back(Event::Scale(have + 1))
                }
                (nix::libc::SI_USER, nix::libc::SIGTTOU) => {
                    events.push_back(Event::Scale(have.saturating_sub(1)))
                }
                (code, signo) => {
                    debug!("signal {signo} (si_code {code}) ignored: not sent by kill(2)")
                }
            }
        }
        for _ in 0..reloads.swap(0, Ordering::SeqCst) {
            events.push_back(Event::Reload);
        }
        if let Some(notify) = &notify {
            for message in notify.receive() {
                notify_events(&supervisor, message, &mut notify_log, &mut events);
            }
        }
        if scanning {
            let now = Instant::now();
            let look_elsewhere = now >= next_elsewhere_check;
            if look_elsewhere {
                next_elsewhere_check = now + ELSEWHERE_CHECK;
            }
            let look_at_conns = now >= next_serving_check;
            if look_at_conns {
                next_serving_check = now + SERVING_CHECK;
            }
            // One dump of the host's TCP sockets serves every starting worker, taken only
            // if one of them is not seen waiting.
            let mut tcp = None;
            for w in supervisor.starting() {
                let leader = w.pid.as_raw() as u32;
                if readiness::is_listening(leader, &w.sockets)
                    || (look_at_conns
                        && readiness::serves_connections(
                            leader,
                            &w.sockets,
                            tcp.get_or_insert_with(crate::sockets::diag::Snapshot::take),
                        ))
                {
                    events.push_back(Event::Ready { pid: w.pid });
                } else if look_elsewhere
                    && w.listens_elsewhere.is_none()
                    && w.uptime(now) >= ELSEWHERE_AFTER
                {
                    let addrs = readiness::listens_elsewhere(leader, &w.sockets);
                    if !addrs.is_empty() {
                        let addrs: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
                        events.push_back(Event::ListensElsewhere {
                            pid: w.pid,
                            addrs: addrs.join(", "),
                        });
                    }
                }
            }
        }
        events.push_back(Event::Tick);
    }
}

/// When a look is due, checks every serving worker against --max-memory, --max-lifetime
/// and --hung-after (master/recycle.rs); the supervisor decides whether a recycle may start now.
fn look_for_recycles(
    recycler: &mut Recycler,
    supervisor: &Supervisor,
    sockets: &crate::sockets::slots::SlotSockets,
    events: &mut VecDeque<Event>,
) {
    let now = Instant::now();
    let Some(read_memory) = recycler.begin_look(now) else {
        return;
    };
    recycler.retain(|pid| supervisor.is_worker(pid));
    let queues = match recycler.policy().hung_after {
        Some(_) => crate::ops::status::accept_queues(),
        None => Default::default(),
    };
    let mut due = Vec::new();
    for w in supervisor.serving() {
        let queued = w
            .sockets
            .iter()
            .filter_map(|inode| queues.get(inode))
            .map(|(depth, _)| *depth)
            .max()
            .unwrap_or(0)
            // What steering moved off it while it stalled still counts: that queue was its.
            .saturating_add(sockets.moved_while_stalled(w.slot));
        let look = recycle::observe_tree(w.pid, read_memory, queued);
        if let Some(reason) = recycler.observe(w.pid, w.started, look, now) {
            due.push((w.pid, reason));
        }
    }
    // The supervisor starts the first and ignores the rest while it runs.
    due.sort_by(|a, b| a.1.precedes(&b.1));
    events.extend(
        due.into_iter()
            .map(|(pid, reason)| Event::Recycle { pid, reason }),
    );
}

/// SIGTTIN and SIGTTOU, blocked and read from a signalfd, which tells who sent them. Blocked,
/// they also let the master write to a terminal whose `stty tostop` would otherwise stop it
/// (or, with a handler installed, restart its write for ever): the kernel treats a blocked
/// SIGTTOU as ignored. Workers start with an empty mask (master/spawn.rs).
fn scale_signals() -> anyhow::Result<SignalFd> {
    let mut mask = SigSet::empty();
    mask.add(Signal::SIGTTIN);
    mask.add(Signal::SIGTTOU);
    mask.thread_block().context("blocking SIGTTIN/SIGTTOU")?;
    SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
        .context("creating the signalfd for SIGTTIN/SIGTTOU")
}

/// Sets the open-files limit the master and its workers run with: `--nofile N`, else the
/// soft limit raised to the hard one (as Go's runtime does for itself: servers need more than
/// the 1024 a login session starts with). Returns a line to log when `--nofile` was given.
fn open_files_limit(wanted: Option<u64>) -> anyhow::Result<Option<String>> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource, RLIM_INFINITY};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).context("reading RLIMIT_NOFILE")?;
    // An unlimited hard limit cannot be the soft one: the kernel caps fds at fs.nr_open.
    let ceiling = match hard {
        RLIM_INFINITY => std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(1024 * 1024),
        hard => hard,
    };
    match wanted {
        None if soft < ceiling => {
            setrlimit(Resource::RLIMIT_NOFILE, ceiling, hard).with_context(|| {
                format!("raising the open-files limit from {soft} to {ceiling}")
            })?;
            Ok(None)
        }
        None => Ok(None),
        Some(n) => {
            // Above the hard limit only root may go (and raises the hard limit with it).
            let new_hard = if n > hard { n } else { hard };
            setrlimit(Resource::RLIMIT_NOFILE, n, new_hard).map_err(|e| {
                anyhow::anyhow!(
                    "--nofile {n}: {e}; the hard limit is {hard}: raise it (ulimit -Hn, \
                     LimitNOFILE= in a systemd unit, --ulimit nofile= for docker) or run as root"
                )
            })?;
            Ok(Some(format!(
                "open-files limit {n} (--nofile) for the master and its workers"
            )))
        }
    }
}

/// Sends each waiting client its lines.
fn tell(control: &mut ControlServer, lines: Vec<(u64, Line)>) {
    for (id, line) in lines {
        match line {
            Line::Progress(text) => control.send(id, &text),
            Line::Final(text) => control.finish(id, &text),
        }
    }
}

/// `cpu` if the master may still run there; else (its affinity mask or cpuset shrank since
/// start-up, and pinning there would fail or go against the operator) one it may, picked by
/// slot among the CPUs allowed now, and said in the log.
fn allowed_cpu(cpu: usize, slot: usize) -> usize {
    let Ok(set) = nix::sched::sched_getaffinity(Pid::from_raw(0)) else {
        return cpu;
    };
    if set.is_set(cpu).unwrap_or(true) {
        return cpu;
    }
    let allowed: Vec<usize> = (0..nix::sched::CpuSet::count())
        .filter(|c| set.is_set(*c).unwrap_or(false))
        .collect();
    let Some(&other) = allowed.get(slot % allowed.len().max(1)) else {
        return cpu;
    };
    warn!(
        "worker {slot}: CPU {cpu} is no longer allowed (the affinity mask or cpuset shrank; \
         allowed now: {}); pinning to CPU {other}",
        format_cpu_list(&allowed)
    );
    other
}

/// Adds how to raise the limit to an error that is about running out of fds.
pub fn with_emfile_hint(error: String) -> String {
    // Both io::Error's and nix's wording of EMFILE hold this.
    match error.contains(Errno::EMFILE.desc()) {
        true => {
            let limit = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
                .map_or("?".into(), |(soft, _)| soft.to_string());
            format!("{error} (the open-files limit is {limit}: raise it with --nofile N)")
        }
        false => error,
    }
}

/// Holds request `id`'s connection for `wait`, sending `first`; returns the answer to
/// give instead (empty once held).
fn hold(
    control: &mut ControlServer,
    waiters: &mut Waiters,
    id: u64,
    wait: Wait,
    first: Option<&str>,
) -> String {
    if !control.hold(id) {
        return "error: too many clients are waiting already; retry, or use --no-wait\n".into();
    }
    waiters.add(id, wait);
    if let Some(line) = first {
        control.send(id, line);
    }
    String::new()
}

/// What systemd is told about the cluster now.
fn systemd_view(supervisor: &Supervisor) -> View {
    let slots = supervisor.slots().len();
    let ready = supervisor.ready_count();
    View {
        all_ready: ready == slots,
        reloading: supervisor.rolling().is_some(),
        rolling_started: supervisor.rolling_counts().0,
        stopping: supervisor.is_stopping(),
        status: systemd_status(supervisor, ready, slots),
    }
}

/// The STATUS= line: readiness, what serves, and the rolling restart under way or the
/// last one's result.
fn systemd_status(supervisor: &Supervisor, ready: usize, slots: usize) -> String {
    let serving: Vec<String> = supervisor
        .serving_generations()
        .iter()
        .map(|g| g.to_string())
        .collect();
    let serving = match serving.is_empty() {
        true => supervisor.serving_generation().to_string(),
        false => serving.join(" and "),
    };
    let mut status = format!("{ready}/{slots} workers ready, generation {serving}");
    if let Some((generation, _, total)) = supervisor.rolling() {
        let done = supervisor.rolling_taken_over();
        status.push_str(&format!(
            "; rolling restart to generation {generation}: {done}/{total} slots done"
        ));
    } else if let Some(r) = supervisor.last_rollout() {
        if let RolloutResult::RolledBack { why, .. } = &r.result {
            status.push_str(&format!(
                "; rolling restart to generation {} rolled back: {why}",
                r.generation
            ));
        }
    }
    status
}

/// What carrying out actions gave: events they answer (a fork's outcome), and reports for
/// waiting clients.
#[derive(Default)]
struct Performed {
    answers: Vec<Event>,
    reports: Vec<Report>,
}

/// Carries out `actions`; what they give goes to `done`.
fn perform(
    actions: Vec<Action>,
    config: &Config,
    spawner: &mut Spawner,
    sockets: &mut SlotSockets,
    (size, served): (usize, &BTreeSet<usize>),
    output: &mut WorkerOutput,
    done: &mut Performed,
) -> Option<Outcome> {
    let answers = &mut done.answers;
    for action in actions {
        match action {
            Action::PrepareGeneration { generation } => {
                let prepared = config
                    .resolve_app_again()
                    .map_err(|e| e.to_string())
                    .and_then(|app| {
                        spawner
                            .set_program(generation, &app)
                            .map_err(|e| format!("{e:#}"))
                    });
                answers.push(match prepared {
                    Ok(()) => Event::GenerationPrepared { generation },
                    Err(error) => Event::GenerationFailed { generation, error },
                });
            }
            Action::Spawn {
                slot,
                cpu,
                generation,
            } => {
                let surge = served.contains(&slot);
                let grant = sockets.grant(slot, &format!("worker {slot}"), surge);
                if let Some(note) = grant.note {
                    info!("{note}");
                }
                let inherit = grant.inherit.as_deref();
                let cpu = cpu.map(|c| allowed_cpu(c, slot));
                let send = sockets.enabled();
                answers.push(
                    match spawner.spawn(slot, cpu, generation, size, inherit, send) {
                        Ok(spawned) => {
                            let note = sockets.started(
                                slot,
                                spawned.pid,
                                inherit.is_some(),
                                spawned.opened,
                                &spawned.sockets,
                            );
                            if let Some(note) = note {
                                warn!("{note}");
                            }
                            if let Some(pipes) = spawned.output {
                                output.add(slot, spawned.pid.as_raw(), generation, pipes);
                            }
                            Event::Spawned {
                                sockets: spawned.sockets,
                                slot,
                                generation,
                                cpu,
                                pid: spawned.pid,
                            }
                        }
                        Err(e) => Event::SpawnFailed {
                            slot,
                            generation,
                            error: with_emfile_hint(e.to_string()),
                        },
                    },
                );
            }
            Action::ReleaseSockets { slot, why } => {
                if let Some(line) = sockets.release(slot, &why, &format!("worker {slot}")) {
                    info!("{line}");
                }
            }
            Action::ReleaseAllSockets => sockets.release_all(),
            Action::Drain { slot, pid, wait } => {
                match sockets.begin_drain(slot, pid, wait, slot >= size, Instant::now()) {
                    Some(answer) => answers.push(answer),
                    None => info!(
                        "worker {slot} (pid {pid}): its socket left the rotation; it stops once \
                         its queue is empty"
                    ),
                }
            }
            Action::Signal { pgid, signal } => match signal_group(pgid, signal) {
                Ok(()) | Err(Errno::ESRCH) => {}
                Err(e) => warn!("sending {signal} to process group {pgid}: {e}"),
            },
            Action::Log(line) => info!("{line}"),
            Action::Report(report) => done.reports.push(report),
            Action::Exit(outcome) => return Some(outcome),
        }
    }
    None
}

/// At most one line per [`RateLimit::EVERY`] about one kind of thing; the next one says how
/// many were left out meanwhile.
#[derive(Debug, Default)]
struct RateLimit {
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimit {
    const EVERY: Duration = Duration::from_secs(10);

    /// The line to write now, if any.
    fn admit(&mut self, line: String, now: Instant) -> Option<String> {
        if self.last.is_some_and(|t| now < t + Self::EVERY) {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(match std::mem::take(&mut self.suppressed) {
            0 => line,
            n => format!("{line} ({n} more like it left out of the log)"),
        })
    }
}

/// Turns one sd_notify datagram into events, if a worker (or a process of its group) sent it.
/// Anyone on the host may send to the socket: nothing from others reaches the log but at
/// debug level, and a worker's oversized messages are rate-limited.
fn notify_events(
    supervisor: &Supervisor,
    message: crate::ops::notify::Message,
    rate: &mut RateLimit,
    events: &mut VecDeque<Event>,
) {
    let sender = Pid::from_raw(message.pid as i32);
    let worker = if supervisor.is_worker(sender) {
        Some(sender)
    } else {
        readiness::process_group(message.pid)
            .map(|g| Pid::from_raw(g as i32))
            .filter(|g| supervisor.is_worker(*g))
    };
    let Some(pid) = worker else {
        return debug!(
            "notify message from pid {} ignored: not a worker",
            message.pid
        );
    };
    if message.truncated {
        let line = format!(
            "notify message from worker pid {} longer than {} bytes ignored",
            message.pid,
            crate::ops::notify::MAX_DATAGRAM
        );
        if let Some(line) = rate.admit(line, Instant::now()) {
            warn!("{line}");
        }
        return;
    }
    for (key, value) in message.fields {
        match key.as_str() {
            "READY" if value == "1" => events.push_back(Event::Ready { pid }),
            "STATUS" => events.push_back(Event::Status { pid, text: value }),
            _ => {} // STOPPING=1, WATCHDOG=1, …: nothing to act on yet
        }
    }
}

/// killpg(2) for a worker's group. A group id of 0 or 1 would mean our own group or every
/// process (killpg(1) is kill(-1)); no worker has one, and this makes sure of it.
fn signal_group(pgid: Pid, signal: Signal) -> Result<(), Errno> {
    if pgid.as_raw() <= 1 {
        return Err(Errno::EINVAL);
    }
    killpg(pgid, signal)
}

/// Sleeps until one of `fds` is ready or `deadline` passes. ppoll(2), not poll(2): poll's
/// timeout is in whole milliseconds, rounded up, so a deadline 0.2 ms away slept 1 ms, and
/// samples meant for every 1 ms while connections were parked came every 1-2 ms
/// (sockets/slots.rs, `SAMPLE_WHILE_PARKED`, now 0.5 ms).
fn wait(fds: &mut [PollFd], deadline: Option<Instant>) {
    let timeout = deadline.map(|d| {
        nix::sys::time::TimeSpec::from_duration(d.saturating_duration_since(Instant::now()))
    });
    match ppoll(fds, timeout, None) {
        Ok(_) | Err(Errno::EINTR) => {}
        Err(e) => warn!("poll: {e}"),
    }
}

/// Finds every exited child: workers become events (what they leave behind is handed to
/// `leftovers`), adopted orphans are just reaped; the reaps run off the loop (reaper.rs).
fn reap(
    supervisor: &Supervisor,
    leftovers: &mut Leftovers,
    reaper: &mut Reaper,
    oom: &mut OomWitness,
    events: &mut VecDeque<Event>,
) {
    // Workers first, one by one: waitid on any child reports one at a time, and the same
    // one until its reap has begun, so a worker's exit never waits behind a slow reap.
    let workers: Vec<Pid> = supervisor.workers().map(|w| w.pid).collect();
    for pid in workers {
        if reaper.is_reaping(pid) {
            continue;
        }
        match spawn::exited_child(Some(pid)) {
            Ok(Some((pid, reason))) => {
                exited(supervisor, leftovers, reaper, oom, events, pid, reason)
            }
            Ok(None) | Err(Errno::ECHILD) | Err(Errno::EINTR) => {}
            Err(e) => warn!("waitid {pid}: {e}"),
        }
    }
    loop {
        match spawn::exited_child(None) {
            // Still being handed to its thread: the others wait for the wake its reap sends.
            Ok(Some((pid, _))) if reaper.is_reaping(pid) => return,
            Ok(Some((pid, reason))) => {
                exited(supervisor, leftovers, reaper, oom, events, pid, reason)
            }
            Ok(None) | Err(Errno::ECHILD) => return,
            Err(Errno::EINTR) => continue,
            Err(e) => return warn!("waitid: {e}"),
        }
    }
}

/// Child `pid` exited (still a zombie: its pid, its group id, cannot be reused yet).
fn exited(
    supervisor: &Supervisor,
    leftovers: &mut Leftovers,
    reaper: &mut Reaper,
    oom: &mut OomWitness,
    events: &mut VecDeque<Event>,
    pid: Pid,
    reason: ExitReason,
) {
    let mut killer = None;
    if let Some(w) = supervisor.workers().find(|w| w.pid == pid) {
        // While the worker is an unreaped zombie its pid (= its group id) cannot be
        // reused, so its group is exactly what it left behind in it.
        let ending = match w.state {
            WorkerState::Stopping {
                killed: false,
                since,
            } => Ending::Stopping {
                since,
                grace: w.stop_grace,
            },
            WorkerState::Stopping { killed: true, .. } => Ending::Killed,
            _ => Ending::Unasked,
        };
        // A SIGKILL the master did not send: the kernel's records say whose it was.
        let ours = matches!(w.state, WorkerState::Stopping { killed: true, .. });
        match reason {
            ExitReason::Signal(nix::libc::SIGKILL) if !ours => {
                killer = Some(oom.sigkill_cause(pid));
            }
            _ => oom.forget(pid),
        }
        let live = supervisor
            .workers()
            .filter(|o| o.pid != pid)
            .map(|o| o.pid.as_raw())
            .collect();
        let label = w.to_string();
        for line in leftovers.worker_ended(label, pid.as_raw(), ending, &live, Instant::now()) {
            info!("{line}");
        }
    } else {
        debug!("reaped orphan pid {pid} ({reason})");
    }
    reaper.reap(pid);
    events.push_back(Event::Exited {
        pid,
        reason,
        killer,
    });
}

/// The start-up lines: what runs where.
/// Writes the Node preload where the workers can read it; says so, or why not.
fn install_node_preload(config: &mut Config) {
    use crate::node::Preload;
    let Preload::On { path, .. } = &mut config.node else {
        if config.node == Preload::Disabled {
            info!("node preload off (--no-node-preload): a Node app must serve fd 3 itself, e.g. server.listen({{fd: 3}})");
        }
        return;
    };
    match crate::node::install(&crate::node::dir(), config.credentials.as_ref()) {
        Ok(p) => *path = Some(p),
        Err(e) => {
            let why = format!("{e:#}");
            warn!(
                "node preload off: {why}; listen(PORT) in the app will fail with EADDRINUSE: \
                 make it serve fd 3 (server.listen({{fd: 3}})), or fix the directory"
            );
            config.node = Preload::Failed(why);
            return;
        }
    }
    info!("node preload {}", config.node);
}

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
        "reuseport-cluster {}: master pid {}, {} workers {pinning}, ready: {}; sockets: {}",
        env!("CARGO_PKG_VERSION"),
        std::process::id(),
        config.workers,
        config.ready,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limited_lines_come_once_per_period_and_count_what_was_left_out() {
        let mut rate = RateLimit::default();
        let t = Instant::now();
        assert_eq!(rate.admit("a".into(), t), Some("a".into()));
        for i in 1..=500 {
            assert_eq!(rate.admit("a".into(), t + Duration::from_millis(i)), None);
        }
        assert_eq!(
            rate.admit("a".into(), t + RateLimit::EVERY),
            Some("a (500 more like it left out of the log)".into())
        );
    }
}
