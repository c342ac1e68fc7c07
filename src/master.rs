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
//! The master must stay single-threaded: `fork` is only safe without other threads, and
//! PR_SET_PDEATHSIG fires when the forking *thread* exits.

use std::collections::{BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use signal_hook::consts::signal::{SIGCHLD, SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGTTIN, SIGTTOU};
use signal_hook::iterator::backend::SignalDelivery;
use signal_hook::iterator::exfiltrator::SignalOnly;

use crate::config::{format_cpu_list, App, Config};
use crate::control::{ControlServer, Request};
use crate::metrics::MetricsServer;
use crate::notify::NotifySocket;
use crate::readiness;
use crate::recycle::{self, Recycler};
use crate::slot_sockets::SlotSockets;
use crate::socket;
use crate::spawn::{self, Spawner};
use crate::status::ClusterStatus;
use crate::supervisor::{Action, Event, Outcome, Settings, Supervisor};
use crate::systemd::{SystemdNotify, View};
use crate::worker_output::WorkerOutput;
use crate::{debug, info, log, warn};

/// Signals the master handles; every other one keeps its default action.
const HANDLED: [i32; 7] = [SIGTERM, SIGINT, SIGQUIT, SIGCHLD, SIGHUP, SIGTTIN, SIGTTOU];

/// How often /proc is read for a starting worker's readiness.
const READINESS_SCAN: Duration = Duration::from_millis(5);

/// Runs the cluster until it has stopped.
pub fn run(mut config: Config) -> anyhow::Result<Outcome> {
    spawn::cloexec_inherited_fds();
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
    if let Some((level, line)) = socket::apply_migrate(config.migrate)? {
        log::line(level, &line);
    }
    let name = config
        .name
        .clone()
        .unwrap_or_else(|| config.binds[0].addr.port().to_string());
    let control_path = crate::control::socket_path(&name, config.control.as_deref());
    let mut control = ControlServer::open(&control_path, &name)?;
    let mut metrics = config.metrics.map(MetricsServer::bind).transpose()?;
    let started = Instant::now();
    let notify = match config.ready.uses_notify() {
        true => Some(NotifySocket::bind()?),
        false => None,
    };
    let mut spawner = Spawner::new(&config, notify.as_ref().map(|n| n.env_value()).as_deref())?;
    let (read, write) = UnixStream::pair().context("creating the signal pipe")?;
    let mut signals = SignalDelivery::with_pipe(read, write, SignalOnly, HANDLED)
        .context("installing signal handlers")?;
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
    };
    let mut supervisor = Supervisor::new(settings, Instant::now());
    let mut recycler = Recycler::new(config.recycle, Instant::now());
    if !sockets.enabled() {
        info!(
            "socket takeover off ({}=0): each worker opens its own sockets",
            crate::slot_sockets::TAKEOVER_ENV
        );
    }
    let mut output = WorkerOutput::default();
    if config.log_prefix {
        crate::log::queue_own_lines();
    }
    let mut systemd = SystemdNotify::from_env(Instant::now());
    let mut events = VecDeque::from([Event::Start]);
    loop {
        while let Some(event) = events.pop_front() {
            let actions = supervisor.step(event, Instant::now());
            // What an action answers (a fork's outcome) is handled before anything else.
            let mut answers = Vec::new();
            let size = supervisor.slots().len();
            let served: BTreeSet<usize> = supervisor
                .slots()
                .iter()
                .filter(|s| s.pid().is_some())
                .map(|s| s.index)
                .collect();
            let outcome = perform(
                actions,
                &config,
                &mut spawner,
                &mut sockets,
                (size, &served),
                &mut output,
                &mut answers,
            );
            if let Some(outcome) = outcome {
                output.flush();
                if let Some(sd) = systemd.as_mut() {
                    sd.update(systemd_view(&supervisor));
                }
                return Ok(outcome);
            }
            for answer in answers.into_iter().rev() {
                events.push_front(answer);
            }
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
            sockets.next_deadline(),
        ]
        .into_iter()
        .flatten()
        .min();
        let mut fds = vec![PollFd::new(signals.get_read().as_fd(), PollFlags::POLLIN)];
        if let Some(n) = &notify {
            fds.push(PollFd::new(n.as_fd(), PollFlags::POLLIN));
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
        reap(&supervisor, &mut events);
        for event in &events {
            if let Event::Exited { pid, .. } = event {
                sockets.exited(*pid);
            }
        }
        events.extend(sockets.service(Instant::now()));
        // A socket an app shut down is dead for every holder: it wakes the poll (POLLHUP),
        // and every wake checks, one getsockopt per held socket.
        for (slot, inode) in sockets.lost() {
            events.push_back(Event::SocketLost { slot, inode });
        }
        look_for_recycles(&mut recycler, &supervisor, &mut events);
        if let Some(m) = metrics.as_mut() {
            let wanted = m.service(Instant::now());
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
        for (id, request) in control.service(Instant::now()) {
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
                _ if supervisor.is_stopping() => "error: the cluster is stopping\n".into(),
                Request::Reload => {
                    events.push_back(Event::Reload);
                    match supervisor.rolling() {
                        Some((g, _, _)) => format!("ok: the rolling restart to generation {g} is under way; one more pass follows it\n"),
                        None => "ok: rolling restart started\n".into(),
                    }
                }
                Request::Scale(n) if n > crate::config::MAX_WORKERS => format!(
                    "error: scale {n}: at most {} workers\n",
                    crate::config::MAX_WORKERS
                ),
                Request::Scale(n) if supervisor.rolling().is_some() => {
                    format!("error: scale {n}: a rolling restart is under way; try again once it is done\n")
                }
                Request::Scale(n) => {
                    events.push_back(Event::Scale(n));
                    format!("ok: scaling to {} workers\n", n.max(1))
                }
                Request::Stop => {
                    events.push_back(Event::StopGracefully);
                    "ok: stopping\n".into()
                }
            };
            control.respond(id, answer);
        }
        for signal in arrived {
            match signal {
                SIGTERM | SIGINT => events.push_back(Event::StopGracefully),
                SIGQUIT => events.push_back(Event::StopNow),
                SIGTTIN => events.push_back(Event::Scale(supervisor.slots().len() + 1)),
                SIGTTOU => {
                    events.push_back(Event::Scale(supervisor.slots().len().saturating_sub(1)))
                }
                _ => {} // SIGCHLD: reaped above; SIGHUP: counted below
            }
        }
        for _ in 0..reloads.swap(0, Ordering::SeqCst) {
            events.push_back(Event::Reload);
        }
        if let Some(notify) = &notify {
            for message in notify.receive() {
                notify_events(&supervisor, message, &mut events);
            }
        }
        if scanning {
            for w in supervisor.starting() {
                if readiness::is_listening(w.pid.as_raw() as u32, &w.sockets) {
                    events.push_back(Event::Ready { pid: w.pid });
                }
            }
        }
        events.push_back(Event::Tick);
    }
}

/// When a look is due, checks every serving worker against --max-memory, --max-lifetime
/// and --hung-after (recycle.rs); the supervisor decides whether a recycle may start now.
fn look_for_recycles(
    recycler: &mut Recycler,
    supervisor: &Supervisor,
    events: &mut VecDeque<Event>,
) {
    let now = Instant::now();
    let Some(read_memory) = recycler.begin_look(now) else {
        return;
    };
    recycler.retain(|pid| supervisor.is_worker(pid));
    let queues = match recycler.policy().hung_after {
        Some(_) => crate::status::accept_queues(),
        None => Default::default(),
    };
    for w in supervisor.serving() {
        let queued = w
            .sockets
            .iter()
            .filter_map(|inode| queues.get(inode))
            .map(|(depth, _)| *depth)
            .max()
            .unwrap_or(0);
        let look = recycle::observe_tree(w.pid, read_memory, queued);
        if let Some(reason) = recycler.observe(w.pid, w.started, look, now) {
            events.push_back(Event::Recycle { pid: w.pid, reason });
        }
    }
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
        status: format!(
            "{ready}/{slots} workers ready, generation {}",
            supervisor.serving_generation()
        ),
    }
}

/// Carries out `actions`; what they answer (a fork's outcome) goes to `answers`.
fn perform(
    actions: Vec<Action>,
    config: &Config,
    spawner: &mut Spawner,
    sockets: &mut SlotSockets,
    (size, served): (usize, &BTreeSet<usize>),
    output: &mut WorkerOutput,
    answers: &mut Vec<Event>,
) -> Option<Outcome> {
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
                                output.add(slot, spawned.pid.as_raw(), pipes);
                            }
                            Event::Spawned {
                                sockets: spawned.sockets,
                                slot,
                                generation,
                                pid: spawned.pid,
                            }
                        }
                        Err(e) => Event::SpawnFailed {
                            slot,
                            generation,
                            error: e.to_string(),
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
            Action::Exit(outcome) => return Some(outcome),
        }
    }
    None
}

/// Turns one sd_notify datagram into events, if a worker (or a process of its group) sent it.
fn notify_events(
    supervisor: &Supervisor,
    message: crate::notify::Message,
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

/// Sleeps until one of `fds` is ready or `deadline` passes.
fn wait(fds: &mut [PollFd], deadline: Option<Instant>) {
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
    match poll(fds, timeout) {
        Ok(_) | Err(Errno::EINTR) => {}
        Err(e) => warn!("poll: {e}"),
    }
}

/// Reaps every exited child: workers become events, adopted orphans are just reaped.
fn reap(supervisor: &Supervisor, events: &mut VecDeque<Event>) {
    loop {
        let pid = match spawn::exited_child() {
            Ok(Some(pid)) => pid,
            Ok(None) | Err(Errno::ECHILD) => return,
            Err(Errno::EINTR) => continue,
            Err(e) => return warn!("waitid: {e}"),
        };
        if supervisor.is_worker(pid) {
            // While the worker is an unreaped zombie its pid (= its group id) cannot be
            // reused, so this reaches exactly what it left behind in its group.
            let _ = signal_group(pid, Signal::SIGKILL);
        }
        match spawn::reap(pid) {
            Ok(Some(reason)) => {
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
